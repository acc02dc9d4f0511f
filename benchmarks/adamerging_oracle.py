"""Why AdaMerging layer-wise trails RegMean: its entropy objective, or the layer-wise task-arithmetic family?

    python benchmarks/adamerging_oracle.py --suite vision-core --seed 0   # -> benchmarks/results/adamerging-oracle-vision-core-2bd+4clean-s0.{json,md}
    python benchmarks/adamerging_oracle.py --suite vision-core --summarize   # mean ± sd over the seeds written

On the VALIDATION split of one core-suite setting, next to task arithmetic, RegMean and AdaMerging layer-wise
(entropy on the unlabeled validation inputs, the suite's budget), it fits the same layer-wise coefficients with
the LABELS: cross-entropy on the very examples that are scored (an in-sample oracle, an upper bound on any
objective AdaMerging could use), and on as many labeled training examples (out of sample). If the oracle stays
below RegMean, no choice of layer-wise coefficients reaches it and the entropy objective is not to blame; if it
reaches RegMean, the objective is. Each row also reports the mean prediction entropy on the scored inputs (what
AdaMerging minimises)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safemerge.bench.report import mean_sd, summarize
from safemerge.bench.suites import PoolEvaluator, _pool_for, device_description, get_suite, setting_models
from safemerge.errors import SafeMergeError
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.adamerging import MergedEncoder, entropy, frozen_heads
from safemerge.merging.pool import run_pool_method


def oracle_lambdas(merged: MergedEncoder, heads, splits, encode, granularity: str, steps: int, lr: float,
                   batch_size: int, seed: int) -> torch.Tensor:
    """AdaMerging's loop with cross-entropy on labeled examples in place of the entropy."""
    shape = (merged.n_tasks,) if granularity == "task" else (merged.n_tasks, len(merged.names))
    lam = torch.full(shape, 0.3, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        params = merged.params(lam)
        loss = torch.zeros(())
        for i, sp in enumerate(splits):
            idx = torch.randint(len(sp), (batch_size,), generator=g)
            x = sp.x[idx] if isinstance(sp.x, torch.Tensor) else [sp.x[j] for j in idx.tolist()]
            loss = loss + F.cross_entropy(merged.logits(heads[i], params, encode(x)), sp.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
    return lam.detach()


@torch.inference_mode()
def mean_entropy(ev: PoolEvaluator, state, head, task: str) -> float:
    """Mean prediction entropy (nats) of `state` under `head` on the scored split of `task`."""
    ev._enc.load_state_dict(state)
    sp = ev.eval_split(task)
    out = []
    for i in range(0, len(sp), 256):
        inputs = ev.encode(sp.x[i:i + 256])
        out.append(entropy(head(ev._enc(**inputs), inputs)).item() * len(sp.y[i:i + 256]))
    return sum(out) / len(sp)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vision-core")
    ap.add_argument("--setting", default="2bd+4clean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=250, help="the first N validation examples of each task")
    ap.add_argument("--oracle-steps", type=int, default=60)
    ap.add_argument("--oracle-lr", type=float, default=1e-2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--summarize", action="store_true",
                    help="only print mean ± sd over the seed files already written for --suite / --setting")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize_seeds(Path(args.out), args.suite, args.setting)
    t_start = time.time()
    suite = get_suite(args.suite)
    try:
        sm = setting_models(suite, args.setting, args.seed)
    except SafeMergeError as e:
        sys.exit(f"error: {e}")
    zoo, setting, trig, heads, bd = sm.zoo, sm.setting, sm.triggers, sm.heads, list(sm.setting.backdoored)
    pool, tasks = _pool_for(suite, setting, zoo, sm.models, progress=False, split="val")
    ev = PoolEvaluator(zoo, args.limit, "val")
    params = {label: p for label, _, p in suite.methods}
    rows, info = [], {}

    def score(label: str, state, seconds: float) -> None:
        ent = []
        for t in suite.tasks:
            acc, asr = ev.evaluate(state, heads[t], t, trig.get(t))
            rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
            ent.append(mean_entropy(ev, state, heads[t], t))
        s = summarize(rows, bd)[label]
        info[label] = {"acc_all": s["acc_all"], "asr_b": s["asr_b"], "entropy": round(sum(ent) / len(ent), 4),
                       "entropy_per_task": dict(zip(suite.tasks, (round(e, 4) for e in ent))),
                       "seconds": round(seconds, 1)}
        print(f"{label:28s} ACC(all) {s['acc_all']:6.2f}  ASR(b) {s['asr_b']:6.2f}  entropy "
              f"{info[label]['entropy']:.3f}  {seconds:6.1f} s", flush=True)

    for label in ("task_arithmetic", "regmean", "adamerging_layer"):
        name = next(m for lab, m, _ in suite.methods if lab == label)
        t0 = time.time()
        state, _ = run_pool_method(name, pool, **params[label])
        score(label, state, time.time() - t0)
    merged = MergedEncoder(pool.encoder, pool.base, pool.models, pool.encode.modality)
    hs = frozen_heads(pool.heads, pool.encode.modality)
    scored = [ev.eval_split(t) for t in tasks]
    train = [zoo.data(t).train.subset(list(range(args.limit))) for t in tasks]  # as many labeled examples, not scored
    for label, gran, splits in (("oracle_task", "task", scored), ("oracle_layer", "layer", scored),
                                ("oracle_layer_train", "layer", train)):
        t0 = time.time()
        lam = oracle_lambdas(merged, hs, splits, pool.encode, gran, args.oracle_steps, args.oracle_lr, 16, args.seed)
        with torch.no_grad():
            state = merged.state_dict(merged.params(lam), pool.base)
        score(label, state, time.time() - t0)
    result = {"suite": suite.name, "setting": setting.name, "seed": args.seed, "backbone": zoo.backbone.name,
              "backdoored_tasks": bd, "eval_limit": args.limit, "split": "val",
              "oracle": {"steps": args.oracle_steps, "lr": args.oracle_lr, "batch_size": 16,
                         "objective": "cross-entropy on labels: oracle_task / oracle_layer on the scored validation "
                                      "examples (in-sample), oracle_layer_train on as many training examples"},
              "budget": params.get("adamerging_layer"), "summary": info, "rows": rows,
              "command": "python benchmarks/adamerging_oracle.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "seconds": round(time.time() - t_start, 1)}
    name = f"adamerging-oracle-{suite.name}-{setting.name}-s{args.seed}"
    out = Path(args.out)
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_text(out / f"{name}.md", markdown(result))
    return result


def summarize_seeds(out: Path, suite: str, setting: str) -> dict:
    """Mean ± sd of every row's ACC(all), ASR(b) and entropy over the seed files of one suite and setting."""
    files = sorted(out.glob(f"adamerging-oracle-{suite}-{setting}-s*.json"))
    if not files:
        sys.exit(f"error: no adamerging-oracle-{suite}-{setting}-s*.json in {out}")
    runs = [json.loads(f.read_text()) for f in files]
    labels = list(runs[0]["summary"])
    table = {label: {k: mean_sd([r["summary"][label][k] for r in runs]) for k in ("acc_all", "asr_b", "entropy")}
             for label in labels}
    seeds = [r["seed"] for r in runs]
    print(f"{suite} {setting}, validation, seeds {seeds}: mean ± sd")
    for label, v in table.items():
        print(f"{label:22s} ACC(all) {v['acc_all'][0]:6.2f} ± {v['acc_all'][1] or 0:4.2f}  ASR(b) {v['asr_b'][0]:6.2f} ± "
              f"{v['asr_b'][1] or 0:5.2f}  entropy {v['entropy'][0]:.3f} ± {v['entropy'][1] or 0:.3f}")
    return {"seeds": seeds, "summary": table}


def markdown(r: dict) -> str:
    tasks = list(next(iter(r["summary"].values()))["entropy_per_task"])
    lines = [f"# AdaMerging's objective vs layer-wise coefficients fitted on labels: {r['suite']}, {r['setting']}, "
             f"seed {r['seed']}", "",
             f"Validation split, first {r['eval_limit']} examples per task; oracle: {r['oracle']['objective']}, "
             f"{r['oracle']['steps']} steps, lr {r['oracle']['lr']}. `{r['command']}` ({r['seconds']} s, "
             f"{r['device']}).", "",
             "| method | ACC(all) | ASR(b) | mean entropy | " + " | ".join(f"{t} ACC" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for label, s in r["summary"].items():
        accs = [next(x["acc"] for x in r["rows"] if x["method"] == label and x["task"] == t) for t in tasks]
        lines.append(f"| {label} | {s['acc_all']:.1f} | {s['asr_b']:.1f} | {s['entropy']:.3f} | "
                     + " | ".join(f"{a:.1f}" for a in accs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
