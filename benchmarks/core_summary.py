"""The core suites against issue 15's targets, over the seeds their results files hold:

    python benchmarks/core_summary.py      # reads benchmarks/results/{vision,text}-core.json -> core-summary.md

Per backbone and setting: ACC(all) and ASR(b) as mean ± sd over seeds for every row, then the checks
- AdaMerging layer-wise ACC(all) >= RegMean - 2;
- succession: ASR(b) >= 60 for task arithmetic, TIES and AdaMerging layer-wise;
- DAM vs Concrete AM layer-wise (its paper's comparator): ASR(b) at least 8 points lower at no more than 1 point of
  ACC(all) lost, the ASR(b) gap larger than twice the pooled sd; and DAM vs the best baseline by ACC(all);
- every backdoored model within 2 points of its clean twin's ACC.
Differences are taken per seed (the methods share each seed's zoo), then averaged; "pooled sd" is
sqrt((sd_a^2 + sd_b^2) / 2) of the two rows' own sds."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from safemerge.bench.report import mean_sd, summarize
from safemerge.io import atomic_write_text

BASELINES = ["task_arithmetic", "ties", "fisher", "regmean", "adamerging_layer"]


def per_seed_summaries(results: dict, setting: str) -> dict[int, dict]:
    """seed -> {method: summary} for one setting."""
    out = {}
    for seed, res in results["per_seed"].items():
        st = next((s for s in res["settings"] if s["name"] == setting), None)
        if st is not None:
            out[int(seed)] = summarize(st["rows"], st["backdoored_tasks"])
    return out


def pm(xs: list[float]) -> str:
    m, sd = mean_sd(xs)
    return f"{m:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def diff(per: dict[int, dict], a: str, b: str, key: str) -> list[float]:
    return [s[a][key] - s[b][key] for s in per.values() if a in s and b in s]


def pooled(per: dict[int, dict], a: str, b: str, key: str) -> float | None:
    sds = [mean_sd([s[m][key] for s in per.values() if m in s])[1] for m in (a, b)]
    return None if None in sds else math.sqrt((sds[0] ** 2 + sds[1] ** 2) / 2)


def setting_section(results: dict, setting: str) -> list[str]:
    per = per_seed_summaries(results, setting)
    seeds = sorted(per)
    methods = list(dict.fromkeys(m for s in per.values() for m in s))
    lines = [f"### {results['suite']} · {setting} · seeds {', '.join(map(str, seeds))}", "",
             "| method | ACC(all) | ASR(b) | ACC(b) | ASR(all) |", "|---|---|---|---|---|"]
    for m in methods:
        col = lambda k: pm([per[x][m][k] for x in seeds if m in per[x]])
        lines.append(f"| {m} | {col('acc_all')} | {col('asr_b')} | {col('acc_b')} | {col('asr_all')} |")
    lines += ["", "Checks (differences per seed, then mean ± sd):", ""]
    mean = lambda xs: sum(xs) / len(xs)
    ada_reg = diff(per, "adamerging_layer", "regmean", "acc_all")
    if ada_reg:
        lines.append(f"- AdaMerging layer-wise − RegMean, ACC(all): {pm(ada_reg)} → "
                     f"{'met' if mean(ada_reg) >= -2 else 'not met'} (target ≥ −2)")
    succ = {m: [per[x][m]["asr_b"] for x in seeds if m in per[x]] for m in ("task_arithmetic", "ties", "adamerging_layer")}
    if all(succ.values()):
        ok = all(mean(v) >= 60 for v in succ.values())
        lines.append("- Succession, ASR(b) of TA / TIES / AdaMerging layer-wise: "
                     + " / ".join(pm(v) for v in succ.values()) + f" → {'met' if ok else 'not met'} (target ≥ 60 each)")
    d_asr = diff(per, "concrete_am_layer", "dam", "asr_b")
    d_acc = diff(per, "dam", "concrete_am_layer", "acc_all")
    if d_asr:
        p = pooled(per, "dam", "concrete_am_layer", "asr_b")
        big = p is not None and mean(d_asr) > 2 * p
        ok = mean(d_asr) >= 8 and mean(d_acc) >= -1 and big
        lines.append(f"- DAM vs Concrete AM layer-wise: ASR(b) lower by {pm(d_asr)}, ACC(all) {pm(d_acc)} "
                     f"(pooled sd of ASR(b) {'n/a' if p is None else f'{p:.1f}'}) → {'met' if ok else 'not met'} "
                     "(target: ≥ 8 lower, ≥ −1 ACC, gap > 2 × pooled sd)")
    base = [m for m in BASELINES if m in methods]
    if base and "dam" in methods:
        best = max(base, key=lambda m: mean([per[x][m]["acc_all"] for x in seeds if m in per[x]]))
        lines.append(f"- DAM vs the best baseline by ACC(all) ({best}): ACC(all) {pm(diff(per, 'dam', best, 'acc_all'))}, "
                     f"ASR(b) {pm(diff(per, 'dam', best, 'asr_b'))}")
    twins = twin_diffs(results, setting)
    if twins:
        lines.append(f"- Backdoored model − clean twin, test ACC (per task, over seeds): "
                     + ", ".join(f"{t} {pm(v)} ({min(v):+.1f} … {max(v):+.1f})" for t, v in twins.items())
                     + f" → {'met' if all(abs(x) <= 2 for v in twins.values() for x in v) else 'not met'} "
                     "(target: within 2 points; every seed)")
    return lines + [""]


def twin_diffs(results: dict, setting: str) -> dict[str, list[float]]:
    """task -> [backdoored ACC − clean ACC per seed] for the setting's backdoored tasks."""
    out: dict[str, list[float]] = {}
    for res in results["per_seed"].values():
        st = next((s for s in res["settings"] if s["name"] == setting), None)
        if st is None:
            continue
        acc = {(m["task"], m["attack"]): m["acc"] for m in res["models"]}
        for t, a in st["attacks"].items():
            if (t, a) in acc and (t, None) in acc:
                out.setdefault(t, []).append(round(acc[(t, a)] - acc[(t, None)], 2))
    return out


def wide_table(results: dict[str, dict]) -> list[str]:
    """ACC(all) and ASR(b), mean ± sd, one column pair per suite and setting."""
    cols = [(name, st["name"]) for name, res in results.items() for st in res["settings"]]
    per = {c: per_seed_summaries(results[c[0]], c[1]) for c in cols}
    methods = list(dict.fromkeys(m for c in cols for s in per[c].values() for m in s))
    lines = ["| method | " + " | ".join(f"{n.split('-')[0]} {st} ACC(all) | ASR(b)" for n, st in cols) + " |",
             "|---|" + "---|---|" * len(cols)]
    for m in methods:
        cells = [pm([per[c][x][m][k] for x in sorted(per[c]) if m in per[c][x]]) for c in cols
                 for k in ("acc_all", "asr_b")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    seeds = ", ".join(f"{n} {st}: {len(per[(n, st)])}" for n, st in cols)
    return lines + ["", f"Seeds per column: {seeds}.", ""]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--suites", default="vision-core,text-core")
    args = ap.parse_args(argv)
    out = Path(args.results)
    lines = ["# The core suites against issue 15's targets", "",
             "`python benchmarks/core_summary.py` from the results files below; every number is a mean ± sd over "
             "the seeds listed (sd omitted for one seed).", ""]
    results = {}
    for name in args.suites.split(","):
        path = out / f"{name}.json"
        if not path.exists():
            sys.exit(f"error: {path}: no such results file (run: safemerge bench --suite {name} --seeds 0,1,2)")
        results[name] = json.loads(path.read_text())
    lines += ["ACC(all) and ASR(b) in %:", "", *wide_table(results)]
    for name, res in results.items():
        lines += [f"## {name}: `{res['command']}`" + (f" (incomplete: {res['incomplete']})" if res.get("incomplete")
                                                      else ""), ""]
        for st in res["settings"]:
            lines += setting_section(res, st["name"])
    text = "\n".join(lines)
    atomic_write_text(out / "core-summary.md", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
