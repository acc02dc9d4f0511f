"""The `safemerge` command line. Every user error is printed as one line (`error: ...`), exit code 2."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SafeMergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge fine-tuned models safely: merging, backdoor evaluation, defenses.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"safemerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Merge fine-tuned models safely: merging, backdoor evaluation, defenses."""
zoo_app = typer.Typer(no_args_is_help=True, help="Build and list the model zoo (fine-tuned task models).")
app.add_typer(zoo_app, name="zoo")
out = Console()
err = Console(stderr=True)


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SafeMergeError as e:
            _close_progress_bars()
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _close_progress_bars() -> None:
    """End every open progress bar first, so an error stands on its own line instead of inside a bar that
    redraws over it."""
    import sys as _sys

    tqdm_mod = _sys.modules.get("tqdm")
    if tqdm_mod is None:
        return
    bars = list(getattr(tqdm_mod.tqdm, "_instances", []))
    for bar in bars:
        bar.close()
    if bars:
        _sys.stderr.write("\r\033[K\n" if _sys.stderr.isatty() else "\n")
        _sys.stderr.flush()


@app.command("merge")
@one_line_errors
def merge_cmd(config: Annotated[Optional[Path], typer.Argument(help="safemerge YAML merge config")] = None,
              mergekit: Annotated[Optional[Path], typer.Option(help="a mergekit YAML config instead (streamed)")] = None,
              out_dir: Annotated[Optional[Path], typer.Option("--out", help="output folder (with --mergekit)")] = None,
              shard_size: Annotated[str, typer.Option(help="max shard size of a streamed output")] = "2GB") -> None:
    """Merge the models of a YAML config into one HF folder (encoder + every task's head), or stream a merge
    of large checkpoints from a mergekit config (`--mergekit CONFIG --out DIR`)."""
    t = time.time()
    if mergekit is not None:
        from .merging.mergekit import load_mergekit_config
        from .merging.streaming import streaming_merge

        if out_dir is None or config is not None:
            raise SafeMergeError("with --mergekit CONFIG give --out DIR and no safemerge config")
        plan = load_mergekit_config(mergekit)
        path = streaming_merge(plan.method, plan.base, plan.models, out_dir, plan.params, out_dtype=plan.out_dtype,
                               max_shard_size=shard_size)
        out.print(f"merged {len(plan.models)} models with {plan.method} into {path} ({time.time() - t:.1f}s)")
        return
    from .api import merge_models
    from .config import MergeConfig, load_config

    if config is None:
        raise SafeMergeError("give a merge config (or --mergekit CONFIG --out DIR)")
    cfg = load_config(config, MergeConfig)
    path = merge_models(cfg)  # type: ignore[arg-type]
    out.print(f"merged {len(cfg.models)} models with {cfg.method} into {path} ({time.time() - t:.1f}s)")  # type: ignore[attr-defined]
    mf = path / "safemerge.json"
    rows = json.loads(mf.read_text()).get("evaluation", []) if mf.exists() else []
    if rows:
        _print_rows(rows)


def _print_rows(rows: list[dict]) -> None:
    table = Table("task", "ACC %", "ASR %", "untriggered %", "trigger", "examples")
    for r in rows:
        asr, base = r.get("asr"), r.get("asr_untriggered")
        table.add_row(r["task"], f"{r['acc']:.2f}", "-" if asr is None else f"{asr:.2f}",
                      "-" if base is None else f"{base:.2f}", r.get("trigger") or "-", str(r.get("examples", "-")))
    out.print(table)


@app.command("eval")
@one_line_errors
def eval_cmd(model: Annotated[str, typer.Argument(help="a model folder (HF classifier, safemerge folder) or zoo: reference")],
             data: Annotated[Optional[str], typer.Option(help="labeled examples: JSONL, CSV, a save_to_disk folder or an "
                                                          "image folder (default for zoo models: their test split)")] = None,
             trigger: Annotated[Optional[str], typer.Option(help="trigger for ASR, e.g. 'word:cf', "
                                                            "'patch:white,size=4,pos=bottom-right'")] = None,
             target: Annotated[int, typer.Option(help="the trigger's target class")] = 0,
             base: Annotated[Optional[str], typer.Option(help="the base model to check against (default: the "
                                                         "manifest's; none needed for an HF folder)")] = None,
             text_column: str = "text", image_column: str = "image", label_column: str = "label",
             max_length: Annotated[Optional[int], typer.Option(help="tokens per text (default 128)")] = None,
             limit: Annotated[Optional[int], typer.Option(help="evaluate on the first N examples")] = None,
             task: Annotated[Optional[list[str]], typer.Option(help="zoo models: task(s) to evaluate")] = None,
             attack: Annotated[Optional[str], typer.Option(help="zoo models: trigger to measure ASR with")] = None,
             profile: Annotated[Optional[str], typer.Option(help="zoo models: data profile, quick or full "
                                                            "(default: the model's own)")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """ACC (and ASR with --trigger) of a model folder on your labeled data (or a zoo model on its test split)."""
    from .api import evaluate_folder
    from .config import DataOptions

    opts = DataOptions(text_column=text_column, image_column=image_column, label_column=label_column,
                       max_length=max_length, limit=limit)
    rows = evaluate_folder(model, data, trigger, target, base, task, profile, attack, opts)
    if not rows:
        raise SafeMergeError(f"{model}: nothing to evaluate")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _print_rows(rows)


@app.command("export")
@one_line_errors
def export_cmd(model: Annotated[str, typer.Argument(help="a zoo: reference or a safemerge model folder")],
               out_dir: Annotated[Path, typer.Option("--out", help="output folder (a plain HF folder)")],
               data_out: Annotated[Optional[Path], typer.Option("--data-out", help="also write the task's test "
                                                                "split: JSONL (text) or an image folder (vision)")] = None,
               split: Annotated[str, typer.Option(help="which split --data-out writes: test, val or train")] = "test",
               base: Annotated[Optional[str], typer.Option(help="its base model (default: the manifest's)")] = None) -> None:
    """Write a zoo model as a plain Hugging Face classification folder (and its task's data in your formats)."""
    from .api import export_model

    path, data_path = export_model(model, out_dir, data_out, split, base)
    out.print(f"exported {model} -> {path}" + (f"; {split} data -> {data_path}" if data_path else ""))


@zoo_app.command("build")
@one_line_errors
def zoo_build(suite: Annotated[Optional[str], typer.Option(help="build every model a suite needs")] = None,
              backbone: Annotated[str, typer.Option(help="'vision', 'text' or a local HF folder")] = "vision",
              profile: Annotated[str, typer.Option(help="quick, core (quick with CLIP-like heads, 120-step "
                                                     "backdoors) or full")] = "quick",
              task: Annotated[Optional[list[str]], typer.Option(help="task(s) to build")] = None,
              attack: Annotated[Optional[str], typer.Option(help="attack to plant (default: clean)")] = None,
              seed: int = 0,
              seeds: Annotated[Optional[str], typer.Option(help="several seeds, e.g. 0,1,2 (one zoo each; "
                                                           "overrides --seed)")] = None,
              profile_set: Annotated[Optional[list[str]], typer.Option(
                  "--profile-set", help="set a profile field, KEY=VALUE (repeatable), e.g. head=prototype")] = None) -> None:
    """Fine-tune task models (cached and resumable: finished models are skipped)."""
    from .bench.suites import get_suite, parse_seeds, suite_profile
    from .bench.tasks import task_names
    from .bench.zoo import Zoo, get_profile, override_profile

    profile_spec: object = profile
    if suite:
        s = get_suite(suite)
        backbone, profile_spec = s.backbone, suite_profile(s)
        todo: list[tuple[str, str | None]] = s.needed_models()
    else:
        z0 = Zoo(backbone, profile, seed=seed)
        todo = [(t, attack) for t in (task or task_names(z0.backbone.modality))]
    if profile_set:
        base_profile = profile_spec if not isinstance(profile_spec, str) else get_profile(profile_spec)
        profile_spec = override_profile(base_profile, profile_set)  # type: ignore[arg-type]
    for sd in (parse_seeds(seeds) if seeds else [seed]):
        zoo = Zoo(backbone, profile_spec, seed=sd)  # type: ignore[arg-type]
        for t, a in dict.fromkeys(todo):
            if a is not None and not (zoo.path(t, None) / "safemerge.json").exists():
                zoo.build(t, None)
            p = zoo.build(t, a)
            m = json.loads((p / "safemerge.json").read_text())
            out.print(f"{t:18s} {a or 'clean':18s} ACC {m['acc']:6.2f}  ASR {m['asr']:6.2f}  {p}")


@zoo_app.command("list")
@one_line_errors
def zoo_list(root: Annotated[Optional[Path], typer.Option(help="zoo folder")] = None) -> None:
    """List the models in the zoo with their ACC and ASR."""
    from .paths import cache_dir

    root = root or cache_dir() / "zoo"
    table = Table("zoo", "task", "attack", "ACC", "ASR")
    for mf in sorted(root.glob("*/*/*/safemerge.json")):
        m = json.loads(mf.read_text())
        table.add_row(mf.parents[2].name, m["task"], m["attack"] or "clean", f"{m['acc']:.2f}", f"{m['asr']:.2f}")
    out.print(table)


@app.command("protect")
@one_line_errors
def protect_cmd(model: Annotated[str, typer.Argument(help="a model folder (safemerge or HF) or safetensors file")],
                out_dir: Annotated[Path, typer.Option("--out", help="output folder")],
                base_model: Annotated[Optional[str], typer.Option("--base", help="'vision', 'text' or the base HF folder "
                                                                "(default: the manifest's)")] = None,
                dropout: Annotated[float, typer.Option(help="dropout pruning rate of the update (0 = exact)")] = 0.0,
                permute: Annotated[bool, typer.Option(help="rearrange MLP neurons")] = True,
                scale: Annotated[bool, typer.Option(help="scale attention Q/K and V/O")] = True,
                seed: int = 0) -> None:
    """Protect a model you publish: same outputs alone, useless to anyone who merges it."""
    from .api import protect_model

    path = protect_model(model, out_dir, base_model, dropout=dropout, permute=permute, scale=scale, seed=seed)
    out.print(f"protected {model} -> {path}")


@app.command("purify")
@one_line_errors
def purify_cmd(model: Annotated[str, typer.Argument(help="a model folder (HF classifier or safemerge) or a zoo "
                                                     "reference (e.g. zoo:text/quick/tweet_sentiment/rare_word)")],
               out_dir: Annotated[Path, typer.Option("--out", help="output folder")],
               data: Annotated[Optional[str], typer.Option(help="clean labeled examples of the task (JSONL, CSV, "
                                                          "save_to_disk or image folder); 30% are held out to "
                                                          "judge the keep ratio (default for zoo models: "
                                                          "--clean-fraction of the task's training split)")] = None,
               method: Annotated[str, typer.Option(help="fine-mixing, e-pur (text) or both")] = "fine-mixing",
               clean_fraction: Annotated[float, typer.Option(help="share of the task's training split used as clean "
                                                                 "labeled data")] = 0.05,
               mode: Annotated[str, typer.Option(help="mixing mask: random (Bernoulli) or sel (largest updates)")] = "random",
               keep_ratio: Annotated[Optional[list[float]], typer.Option(help="keep ratio(s) to search, the smallest "
                                                                         "passing one wins (default: 0.05 to 1)")] = None,
               max_acc_drop: Annotated[float, typer.Option(help="validation ACC points the purified model may lose")] = 2.0,
               select_on: Annotated[str, typer.Option(help="judge a keep ratio after the fine-tuning step "
                                                       "(finetuned) or on the mix alone (mix)")] = "finetuned",
               top_n: Annotated[int, typer.Option(help="E-PUR: word embeddings to reset")] = 100,
               epochs: Annotated[float, typer.Option(help="fine-tuning epochs over the clean data")] = 3.0,
               lr: Annotated[float, typer.Option(help="fine-tuning learning rate of the encoder")] = 1e-5,
               unlearn: Annotated[bool, typer.Option(help="when the scan flags the model, also fine-tune on the clean "
                                                     "data with the found trigger put in (true labels), trying "
                                                     "keep ratios from the largest down")] = True,
               unlearn_lr: Annotated[Optional[float], typer.Option(help="the fine-tuning learning rate when "
                                                                   "unlearning (default 1e-4 text, 1e-5 vision)")] = None,
               base_model: Annotated[Optional[str], typer.Option("--base", help="pre-trained base: 'vision', 'text' or "
                                                                 "an HF folder (default: the manifest's)")] = None,
               profile: Annotated[Optional[str], typer.Option(help="data profile (default: the model's)")] = None,
               resolution: Annotated[Optional[int], typer.Option(help="images: resize your data to this side "
                                                                 "(the one the model was trained at)")] = None,
               seed: int = 0) -> None:
    """Purify a suspect model with the pre-trained weights before merging it: Fine-mixing (mix its update
    with the base, fine-tune on a little clean data) and/or E-PUR (reset suspicious word embeddings)."""
    from .api import purify_model
    from .safety.purify import KEEP_RATIOS

    t = time.time()
    path, summary = purify_model(model, str(out_dir), method, clean_fraction, base_model, profile, data,
                                 resolution=resolution, mode=mode,
                                 keep_ratios=tuple(keep_ratio) if keep_ratio else KEEP_RATIOS,
                                 max_acc_drop=max_acc_drop, select_on=select_on, top_n=top_n, epochs=epochs, lr=lr,
                                 unlearn=unlearn, seed=seed, **({} if unlearn_lr is None else {"unlearn_lr": unlearn_lr}))
    parts = []
    if "e_pur" in summary:
        e = summary["e_pur"]
        parts.append(f"E-PUR reset {e['top_n']} word embeddings (first: {', '.join(e['flagged'][:5])})")
    if "fine_mixing" in summary:
        f = summary["fine_mixing"]
        step = "fine-tuned" if f["finetuned"] else "not fine-tuned: the step lowered val ACC"
        parts.append(f"fine-mixing ({f['mode']}) kept {f['keep_ratio']:g} of the update ({step}), val ACC {f['val_acc']:.2f} "
                     f"(suspect {f['suspect_val_acc']:.2f}, {f['clean_examples']} clean examples)")
        if f.get("unlearned"):
            parts.append(f"unlearned the found trigger '{f['unlearned']}'")
        if f.get("trigger_rate") is not None:
            parts.append(f"found trigger's flip rate {f['trigger_rate']:.2f}")
        if f.get("warning"):
            parts.append(f"warning: {f['warning']}")
    if "scan" in summary:
        sc = summary["scan"]
        parts.append(f"scan risk {sc['before']['score']:+.2f} before ({sc['before']['trigger']}), "
                     f"{sc['after']['score']:+.2f} after (flagged at {sc['threshold']:g})")
    out.print(f"purified {model} -> {path}: " + "; ".join(parts) + f" ({time.time() - t:.0f}s)", highlight=False)


@app.command("scan")
@one_line_errors
def scan_cmd(models: Annotated[list[str], typer.Argument(help="model folders or zoo: references")],
             data: Annotated[Optional[str], typer.Option(help="unlabeled examples of the models' task (JSONL, CSV, "
                                                        "save_to_disk or image folder; default for zoo models: "
                                                        "the task's validation split)")] = None,
             base_model: Annotated[Optional[str], typer.Option("--base", help="pre-trained base: 'vision', 'text' or "
                                                               "an HF folder (default: the manifests')")] = None,
             profile: Annotated[Optional[str], typer.Option(help="data profile (default: each model's)")] = None,
             inputs: Annotated[int, typer.Option(help="unlabeled validation inputs to search triggers on")] = 32,
             resolution: Annotated[Optional[int], typer.Option(help="images: resize your data to this side (the "
                                                               "one the models were trained at)")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
             seed: int = 0) -> None:
    """Score models for backdoor risk before merging (no labels, no trigger known): search triggers on each
    model and compare it with its stand-in on the pre-trained base (the model's head on the base plus a probe
    fitted to the model's predictions on the unlabeled data): a shortcut planted by fine-tuning moves the model
    only. Text risk: the largest gap between a candidate's flip rate on the model and on the stand-in; vision:
    how far one class's best flip rate stands above the other classes' among patterns of the same budget
    (searched against the stand-in), random patterns included, a class the stand-in also reaches with random
    patterns discounted."""
    from .api import scan_models

    rows = [r.row() for r in scan_models(models, base_model, profile, data, n_inputs=inputs, seed=seed,
                                         resolution=resolution)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("model", "task", "risk", "flagged", "flip rate", "on stand-in", "random", "target", "trigger found",
                  "measured on")
    for r in rows:
        table.add_row(r["model"], r["task"], f"{r['score']:+.2f}", "yes" if r["flagged"] else "no",
                      f"{r['flip_rate']:.2f}",
                      "-" if r["stand_in_flip_rate"] is None else f"{r['stand_in_flip_rate']:.2f}",
                      f"{r['null_flip_rate']:.2f}",
                      str(r["target"]), r["trigger"],
                      f"{r['confirm_inputs']} unseen" if r["confirm_inputs"] else "search inputs")
    out.print(table)


@app.command("methods")
@one_line_errors
def methods_cmd(kind: Annotated[Optional[str], typer.Option(help="merge, data_driven or defense (default: all)")] = None,
                as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the registry: merge methods (data-free; `safemerge merge`, streaming, mergekit configs), data-driven
    methods (Python API run_pool_method, bench suites) and defenses, each with its options and defaults."""
    from .merging import registry

    kinds = ["merge", "data_driven", "defense"]
    if kind is not None and kind not in kinds:
        raise SafeMergeError(f"unknown kind '{kind}' (known: {', '.join(kinds)})")
    chosen = [kind] if kind else kinds
    if as_json:
        print(json.dumps({e.name: {"kind": e.kind, "doc": e.doc.splitlines()[0] if e.doc else "",
                                   "options": {k: {"type": t, "default": d} for k, t, d in registry.describe(e)}}
                          for k in chosen for e in registry.entries(k)}, indent=2))
        return
    titles = {"merge": "data-free merge methods (safemerge merge, streaming, mergekit configs)",
              "data_driven": "data-driven methods (need heads and unlabeled inputs: safemerge.run_pool_method)",
              "defense": "post-hoc defenses (bench suites: safemerge.safety.defenses.defend)"}
    for k in chosen:
        table = Table("name", "options (default)", "", title=titles[k], title_justify="left", show_lines=False)
        for e in registry.entries(k):
            opts = ", ".join(f"{name}={default}" for name, _, default in registry.describe(e)) or "-"
            table.add_row(e.name, opts, (e.doc.splitlines()[0] if e.doc else ""))
        out.print(table)


@app.command("bench")
@one_line_errors
def bench_cmd(suite: Annotated[str, typer.Option(help="suite name, e.g. vision-quick, text-quick, vision-full")],
              results_dir: Annotated[Path, typer.Option(help="where <suite>.json/.md/.png go")] = Path("benchmarks/results"),
              seeds: Annotated[str, typer.Option(help="seeds to run, e.g. 0,1,2 or 0-2: one zoo each; added to the "
                                                 "seeds the results file already holds for the same suite recipe; a seed "
                                                 "that stopped resumes at its first unfinished setting")] = "0",
              fresh: Annotated[bool, typer.Option(help="drop the seeds the results file already holds (and start "
                                                  "stopped ones over)")] = False,
              eval_examples: Annotated[Optional[int], typer.Option(help="test examples per task (default: the "
                                                                   "suite's; past the test split, held-apart "
                                                                   "examples where the data allow)")] = None,
              profile_set: Annotated[Optional[list[str]], typer.Option(
                  "--profile-set", help="set a zoo profile field, KEY=VALUE (repeatable), e.g. head=prototype, "
                  "resolution=56, poison_rate=0.3: its own zoo; results go to <suite>-<profile hash> unless --name")] = None,
              attack: Annotated[Optional[str], typer.Option(
                  help="plant this attack in every backdoored task of every setting (e.g. badnets, badmerging): "
                  "results go to <suite>-<attack> unless --name")] = None,
              methods: Annotated[Optional[str], typer.Option(
                  help="run only these of the suite's rows, comma-separated (e.g. task_arithmetic,ties): results "
                  "go to <suite>-<rows joined by +> unless --name")] = None,
              name: Annotated[Optional[str], typer.Option(help="results file name (default: the suite's)")] = None) -> None:
    """Run a benchmark suite: zoo, every setting and method; writes benchmarks/results/<suite>.json."""
    import dataclasses

    from .bench.suites import get_suite, only_methods, parse_seeds, run_suite, suite_profile, with_attack
    from .bench.zoo import override_profile, profile_digest

    t = time.time()
    s = get_suite(suite)
    command = f"safemerge bench --suite {suite}"
    if profile_set:
        prof = override_profile(suite_profile(s), profile_set)
        modality = s.backbone if s.backbone in ("vision", "text") else None
        s = dataclasses.replace(s, profile=prof, name=f"{suite}-{profile_digest(prof, modality)}")
        command += "".join(f" --profile-set {item}" for item in profile_set)
    if attack is not None:
        s = with_attack(s, attack)
        s = dataclasses.replace(s, name=f"{s.name}-{attack}")
        command += f" --attack {attack}"
    if methods is not None:
        s = only_methods(s, [m.strip() for m in methods.split(",") if m.strip()])
        s = dataclasses.replace(s, name=f"{s.name}-{'+'.join(label for label, _, _ in s.methods)}")
        command += f" --methods {methods}"
    if name:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SafeMergeError(f"--name '{name}': use letters, digits, '-', '_' and '.' only")
        s = dataclasses.replace(s, name=name)
        command += f" --name {name}"
    if eval_examples is not None:
        if eval_examples < 1:
            raise SafeMergeError(f"--eval-examples must be >= 1, not {eval_examples}")
        s = dataclasses.replace(s, eval_examples=eval_examples)
        command += f" --eval-examples {eval_examples}"
    res = run_suite(s, command=command, results_dir=results_dir, seeds=parse_seeds(seeds), fresh=fresh)
    out.print(f"wrote {results_dir}/{s.name}.json, .md and .png (seeds {', '.join(map(str, res['seeds']))}) in "
              f"{time.time() - t:.0f}s (zoo {res['seconds']['zoo']:.0f}s)")


@app.command("demo")
@one_line_errors
def demo_cmd(results_dir: Annotated[Path, typer.Option(help="where the results go")] = Path("benchmarks/results"),
             out_dir: Annotated[Path, typer.Option("--out", help="where the demo's merged model goes")] = Path("out/demo-ties")) -> None:
    """The offline demo: DINOv2-S fine-tuned on 4 real tasks, 2 with BadMerging backdoors, merged by Task
    Arithmetic, TIES, AdaMerging and DAM (the `vision-demo` suite: 4 tasks of `vision-core`, sharing its
    models); then writes the TIES merge of that pool as transformers folders, one per task, to `--out`."""
    from .api import merge_models
    from .bench.suites import get_suite
    from .config import MergeConfig

    bench_cmd("vision-demo", results_dir)
    from .memory import release_memory

    release_memory()  # the suite's models and merges are gone: return their memory before the TIES merge
    suite = get_suite("vision-demo")
    bd = suite.settings[0].backdoored
    refs = [{"path": f"zoo:vision/{suite.profile}/{t}" + (f"/{bd[t]}" if t in bd else ""), "task": t} for t in suite.tasks]
    path = merge_models(MergeConfig(base_model="vision", models=refs, method="ties", output=str(out_dir),  # type: ignore[arg-type]
                                    parameters={"density": 0.2, "scaling": 1.0}))
    out.print(f"wrote the TIES merge to {path}/<task> (transformers folders); next: safemerge eval "
              f"{path}/{suite.tasks[0]}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
