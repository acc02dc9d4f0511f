"""Results in the paper's style: the results JSON contract, a Markdown table per setting (per-task ACC and
ASR, then ACC(b), ACC(all), ASR(b), ASR(all); b = the tasks whose model was backdoored), and an
ACC(all)-vs-ASR(b) scatter plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


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


def setting_table(setting: dict) -> str:
    rows, bd = setting["rows"], setting["backdoored_tasks"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["task"]): r for r in rows}
    nb = len(bd)
    head = "| method | " + " | ".join(f"{t} ({'bd' if t in bd else 'clean'}) ACC | ASR" for t in tasks) + \
        f" | ACC({nb}) | ACC(all) | ASR({nb}) | ASR(all) |"
    sep = "|---" * (1 + 2 * len(tasks) + 4) + "|"
    lines = [head, sep]
    summ = summarize(rows, bd)
    for m in methods:
        vals = []
        for t in tasks:
            r = cell.get((m, t))
            vals += [f"{r['acc']:.2f}", f"{r['asr']:.2f}"] if r else ["", ""]
        s = summ[m]
        vals += [f"{s['acc_b']:.2f}", f"{s['acc_all']:.2f}", f"{s['asr_b']:.2f}", f"{s['asr_all']:.2f}"]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    out = [f"# {results['suite']}", "",
           f"Backbone `{results['backbone']}`; regenerate with `{results['command']}`; created {results['created']}"
           + (f" on {results['device']}" if results.get("device") else "") + ".", "",
           "## Individual models", "",
           "Measured when each model was built, on its task's whole test split"
           + (f"; the settings' `individual_*` rows below use the first {results['eval_examples_per_task']} test "
              "examples per task like every merged row, so the two can differ by a few points"
              if results.get("eval_examples_per_task") else "") + ".", "",
           "| task | attack | ACC | ASR |", "|---|---|---|---|"]
    for m in results["models"]:
        out.append(f"| {m['task']} | {m['attack'] or 'clean'} | {m['acc']:.2f} | {m['asr']:.2f} |")
    for s in results["settings"]:
        out += ["", f"## Setting `{s['name']}` (backdoored: {', '.join(s['backdoored_tasks']) or 'none'})", "",
                setting_table(s)]
        if s.get("note"):
            out += ["", s["note"]]
        if s.get("lambda_adv_curve"):
            out += ["", "DAM over lambda_adv:", "", "| lambda_adv | ACC(all) | ASR(b) | ASR(all) |", "|---|---|---|---|"]
            out += [f"| {c['lambda_adv']:g} | {c['acc_all']:.2f} | {c['asr_b']:.2f} | {c['asr_all']:.2f} |"
                    for c in s["lambda_adv_curve"]]
        if s.get("mask_ablation"):
            out += ["", "Mask ablation (the DAM paper's Table 7):", "", "| masks | method row | ACC(all) | ASR(b) |",
                    "|---|---|---|---|"]
            out += [f"| {k} | {v['method']} | {v['acc_all']:.2f} | {v['asr_b']:.2f} |" for k, v in s["mask_ablation"].items()]
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
        summ = summarize(s["rows"], s["backdoored_tasks"])
        for m, v in summ.items():
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
    ax.plot(lam, [c["acc_all"] for c in curve], "o-", label="ACC(all)")
    ax.plot(lam, [c["asr_b"] for c in curve], "s-", label="ASR(b)")
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel("lambda_adv")
    ax.set_ylabel("%")
    ax.set_title(f"{suite}: DAM over lambda_adv ({setting['name']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
