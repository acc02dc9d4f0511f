"""Results in the paper's style: the results JSON contract, a Markdown table per setting (per-task ACC and
ASR, then ACC(b), ACC(all), ASR(b), ASR(all); b = the tasks whose model was backdoored), and an
ACC(all)-vs-ASR(b) scatter plot.

Over several seeds (one zoo per seed), each seed's results are kept under `per_seed`; a setting's `rows` are
the mean over seeds with a sample sd (`"sd": {"acc", "asr"}`, null for one seed), and its `summary` holds
ACC(b), ACC(all), ASR(b), ASR(all) computed per seed, then mean and sd."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

SUMMARY_KEYS = ("acc_b", "acc_all", "asr_b", "asr_all")


def summarize(rows: list[dict], backdoored: list[str]) -> dict[str, dict[str, float]]:
    """Per method: ACC/ASR averaged over the backdoored tasks (b) and over all tasks."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 2) if xs else float("nan")

    out = {}
    for m, rs in by_method.items():
        b = [r for r in rs if r["task"] in backdoored]
        out[m] = {"acc_b": mean([r["acc"] for r in b]), "acc_all": mean([r["acc"] for r in rs]),
                  "asr_b": mean([r["asr"] for r in b]), "asr_all": mean([r["asr"] for r in rs])}
    return out


def mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample sd (None for fewer than two values), rounded to 2 decimals."""
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return round(m, 2), None
    return round(m, 2), round(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)), 2)


def _mean_sd_dicts(ds: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None) -> dict:
    """{k: mean, ..., "sd": {k: sd}, "n": len(ds)} over dicts with the same numeric keys."""
    keys = list(keys or ds[0])
    out: dict = {}
    sd: dict = {}
    for k in keys:
        out[k], sd[k] = mean_sd([d[k] for d in ds if k in d])
    return {**out, "sd": sd, "n": len(ds)}


def aggregate_models(per_seed: Mapping[int, dict]) -> list[dict]:
    """The individual models' ACC/ASR, mean and sd over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for seed in sorted(per_seed):
        for m in per_seed[seed]["models"]:
            cells.setdefault((m["task"], m["attack"]), []).append(m)
    out = []
    for (task, attack), ms in cells.items():
        (acc, acc_sd), (asr, asr_sd) = mean_sd([m["acc"] for m in ms]), mean_sd([m["asr"] for m in ms])
        out.append({"task": task, "attack": attack, "acc": acc, "asr": asr, "sd": {"acc": acc_sd, "asr": asr_sd},
                    "n": len(ms), "asr_trigger": ms[0].get("asr_trigger")})
    return out


def aggregate_heads(per_seed: Mapping[int, dict]) -> dict[str, dict]:
    """Per task: the head's kind and the pre-trained encoder's ACC under it, mean and sd over seeds."""
    tasks = list(dict.fromkeys(t for seed in sorted(per_seed) for t in per_seed[seed].get("heads", {})))
    out = {}
    for t in tasks:
        hs = [per_seed[seed]["heads"][t] for seed in sorted(per_seed) if t in per_seed[seed].get("heads", {})]
        acc, sd = mean_sd([h["pretrained_acc"] for h in hs])
        out[t] = {"kind": hs[0]["kind"], "pretrained_acc": acc, "sd": {"pretrained_acc": sd}, "n": len(hs)}
    return out


def aggregate_setting(copies: Sequence[tuple[int, dict]]) -> dict:
    """One setting over the seeds that ran it ((seed, setting) pairs): mean rows with sd, per-seed summaries'
    mean and sd, and the curves, ablation and perturbation effects on those summaries."""
    first = copies[0][1]
    bd = first["backdoored_tasks"]
    out = {k: first[k] for k in ("name", "backdoored_tasks", "attacks", "note") if k in first}
    out["seeds"] = [seed for seed, _ in copies]
    cells: dict[tuple[str, str], list[dict]] = {}
    for _, st in copies:
        for r in st["rows"]:
            cells.setdefault((r["method"], r["task"]), []).append(r)
    rows = []
    for (method, task), rs in cells.items():
        (acc, acc_sd), (asr, asr_sd) = mean_sd([r["acc"] for r in rs]), mean_sd([r["asr"] for r in rs])
        rows.append({"method": method, "task": task, "acc": acc, "asr": asr, "sd": {"acc": acc_sd, "asr": asr_sd},
                     "n": len(rs)})
    out["rows"] = rows
    summaries = [summarize(st["rows"], bd) for _, st in copies]
    methods = list(dict.fromkeys(m for s in summaries for m in s))
    summary = {m: _mean_sd_dicts([s[m] for s in summaries if m in s], SUMMARY_KEYS) for m in methods}
    out["summary"] = summary
    seconds = [st.get("seconds", {}) for _, st in copies]
    out["seconds"] = {k: mean_sd([s[k] for s in seconds if k in s])[0] for k in dict.fromkeys(k for s in seconds for k in s)}
    defended = {seed: st["defended_method"] for seed, st in copies if st.get("defended_method")}
    if defended:
        out["defended_method"] = Counter(defended.values()).most_common(1)[0][0]
        if len(set(defended.values())) > 1:
            out["defended_method_per_seed"] = {str(k): v for k, v in defended.items()}
    if first.get("lambda_adv_curve"):
        out["lambda_adv_curve"] = [{"lambda_adv": c["lambda_adv"], "method": c["method"], **summary[c["method"]]}
                                   for c in first["lambda_adv_curve"] if c["method"] in summary]
    if first.get("mask_ablation"):
        out["mask_ablation"] = {k: {"method": v["method"], **summary[v["method"]]}
                                for k, v in first["mask_ablation"].items() if v["method"] in summary}
    effects: dict[str, list[dict]] = {}
    for _, st in copies:
        for label, e in st.get("perturbation_effect", {}).items():
            effects.setdefault(label, []).append(e)
    if effects:
        out["perturbation_effect"] = {}
        for label, es in effects.items():
            agg = _mean_sd_dicts([e["mean"] for e in es])
            tasks = list(dict.fromkeys(t for e in es for t in e["per_task"]))
            agg["per_task"] = {t: {k: v for k, v in _mean_sd_dicts([e["per_task"][t] for e in es
                                                                     if t in e["per_task"]]).items() if k != "n"}
                               for t in tasks}
            out["perturbation_effect"][label] = agg
    return out


def aggregate_settings(per_seed: Mapping[int, dict]) -> list[dict]:
    """Every setting any seed ran (in the seeds' order), aggregated over the seeds that ran it."""
    names = list(dict.fromkeys(st["name"] for seed in sorted(per_seed) for st in per_seed[seed]["settings"]))
    return [aggregate_setting([(seed, st) for seed in sorted(per_seed) for st in per_seed[seed]["settings"]
                               if st["name"] == name]) for name in names]


def _pm(mean: float, sd: float | None) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def setting_table(setting: dict) -> str:
    """The Table-2-style table of one setting; cells are 'mean ± sd' when the setting has several seeds."""
    rows, bd = setting["rows"], setting["backdoored_tasks"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["task"]): r for r in rows}
    nb = len(bd)
    head = "| method | " + " | ".join(f"{t} ({'bd' if t in bd else 'clean'}) ACC | ASR" for t in tasks) + \
        f" | ACC({nb}) | ACC(all) | ASR({nb}) | ASR(all) |"
    sep = "|---" * (1 + 2 * len(tasks) + 4) + "|"
    lines = [head, sep]
    summ = setting.get("summary") or summarize(rows, bd)
    for m in methods:
        vals = []
        for t in tasks:
            r = cell.get((m, t))
            sd = (r or {}).get("sd") or {}
            vals += [_pm(r["acc"], sd.get("acc")), _pm(r["asr"], sd.get("asr"))] if r else ["", ""]
        s = summ[m]
        sd = s.get("sd") or {}
        vals += [_pm(s[k], sd.get(k)) for k in SUMMARY_KEYS]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _seeds_line(results: dict) -> list[str]:
    seeds = results.get("seeds") or []
    if len(seeds) < 2:
        return []
    return [f"Mean ± sample sd over {len(seeds)} seeds ({', '.join(map(str, seeds))}); each seed has its own zoo "
            "(data split, heads, fine-tuning, attacks) and merges; ACC(b), ACC(all), ASR(b), ASR(all) are computed "
            "per seed, then averaged.", ""]


def markdown_report(results: dict) -> str:
    out = [f"# {results['suite']}", "",
           f"Backbone `{results['backbone']}`; regenerate with `{results['command']}`; created {results['created']}"
           + (f" on {results['device']}" if results.get("device") else "") + ".", "",
           *_seeds_line(results), "## Individual models", "",
           "Measured when each model was built, on its task's whole test split"
           + (f"; the settings' `individual_*` rows below use the first {results['eval_examples_per_task']} test "
              "examples per task like every merged row, so the two can differ by a few points"
              if results.get("eval_examples_per_task") else "") + ".", "",
           "| task | attack | ACC | ASR |", "|---|---|---|---|"]
    for m in results["models"]:
        sd = m.get("sd") or {}
        out.append(f"| {m['task']} | {m['attack'] or 'clean'} | {_pm(m['acc'], sd.get('acc'))} | "
                   f"{_pm(m['asr'], sd.get('asr'))} |")
    if results.get("heads"):
        kinds = sorted({h["kind"] for h in results["heads"].values()})
        out += ["", f"Frozen task heads ({', '.join(kinds)}): ACC of the PRE-TRAINED encoder under each head on the "
                "task's test split (the papers' zero-shot row):", "", "| task | pre-trained ACC |", "|---|---|"]
        out += [f"| {t} | {_pm(h['pretrained_acc'], (h.get('sd') or {}).get('pretrained_acc'))} |"
                for t, h in results["heads"].items()]
    for s in results["settings"]:
        out += ["", f"## Setting `{s['name']}` (backdoored: {', '.join(s['backdoored_tasks']) or 'none'})", "",
                setting_table(s)]
        if s.get("note"):
            out += ["", s["note"]]
        if s.get("lambda_adv_curve"):
            out += ["", "DAM over lambda_adv:", "", "| lambda_adv | ACC(all) | ASR(b) | ASR(all) |", "|---|---|---|---|"]
            out += [f"| {c['lambda_adv']:g} | " + " | ".join(_pm(c[k], (c.get("sd") or {}).get(k))
                                                            for k in ("acc_all", "asr_b", "asr_all")) + " |"
                    for c in s["lambda_adv_curve"]]
        if s.get("mask_ablation"):
            out += ["", "Mask ablation (the DAM paper's Table 7):", "", "| masks | method row | ACC(all) | ASR(b) |",
                    "|---|---|---|---|"]
            out += [f"| {k} | {v['method']} | {_pm(v['acc_all'], (v.get('sd') or {}).get('acc_all'))} | "
                    f"{_pm(v['asr_b'], (v.get('sd') or {}).get('asr_b'))} |" for k, v in s["mask_ablation"].items()]
        if s.get("perturbation_effect"):
            out += ["", "DAM's perturbation on the merged model (first inputs of each task, fed as the mask step feeds "
                    "them): flip rate of predictions on x + delta vs x (%), mean entropy change (nats), mean |delta| "
                    "(vision: in 0-255 pixel units; clamp only: the reference's [0, 1] clamp with delta = 0):", "",
                    "| row | flip rate | entropy change | mean abs delta | clamp-only flip rate |", "|---|---|---|---|---|"]
            for label, e in s["perturbation_effect"].items():
                sd = e.get("sd") or {}
                size = "delta_mean_abs_255" if "delta_mean_abs_255" in e else "delta_mean_abs"
                clamp = _pm(e["flip_rate_clamp_only"], sd.get("flip_rate_clamp_only")) if "flip_rate_clamp_only" in e else "-"
                out.append(f"| {label} | {_pm(e['flip_rate'], sd.get('flip_rate'))} | "
                           f"{_pm(e['entropy_change'], sd.get('entropy_change'))} | {_pm(e[size], sd.get(size))} | {clamp} |")
        if s.get("seconds"):
            out += ["", "Seconds per method: " + ", ".join(f"{k} {v:g}" for k, v in s["seconds"].items()) + "."]
    return "\n".join(out) + "\n"


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def scatter_plot(results: dict, path: str | Path, only: int | None = None) -> Path:
    """ACC(all) against ASR(b) for every method, one panel per setting (or only setting number `only`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"] if only is None else [results["settings"][only]]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.5), squeeze=False)
    for ax, s in zip(axes[0], settings):
        summ = s.get("summary") or summarize(s["rows"], s["backdoored_tasks"])
        for m, v in summ.items():
            sd = v.get("sd") or {}
            if sd.get("asr_b") is not None or sd.get("acc_all") is not None:  # error bars: sd over seeds
                ax.errorbar(v["asr_b"], v["acc_all"], xerr=sd.get("asr_b") or 0.0, yerr=sd.get("acc_all") or 0.0,
                            fmt="o", ms=6, capsize=3, elinewidth=1)
            else:
                ax.scatter(v["asr_b"], v["acc_all"], s=40)
            ax.annotate(m, (v["asr_b"], v["acc_all"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ASR on backdoored tasks (%)  -> worse")
        ax.set_ylabel("ACC on all tasks (%)  -> better")
        ax.set_title(f"{results['suite']}: {s['name']}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def lambda_curve_plot(suite: str, setting: dict, path: str | Path) -> Path:
    """DAM's ACC(all) and ASR(b) against lambda_adv (the safety/accuracy trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = setting["lambda_adv_curve"]
    lam = [c["lambda_adv"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, fmt, name in (("acc_all", "o-", "ACC(all)"), ("asr_b", "s-", "ASR(b)")):
        err = [(c.get("sd") or {}).get(key) or 0.0 for c in curve]
        ax.errorbar(lam, [c[key] for c in curve], yerr=err if any(err) else None, fmt=fmt, capsize=3, label=name)
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel("lambda_adv")
    ax.set_ylabel("%")
    ax.set_title(f"{suite}: DAM over lambda_adv ({setting['name']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
