"""Benchmark suites in the DAM paper's Table 2 style: build the zoo, form each setting's pool (some tasks
backdoored), merge it with every method, and report ACC and ASR per task to `benchmarks/results/<suite>.json`
(+ a Markdown table and a scatter plot)."""

from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from .attacks import Attack, make_attack
from .checkpoints import atomic_write_json, atomic_write_text
from .errors import SafeMergeError
from .evaluate import acc_asr, accuracy
from .merging import merge
from .model import TaskModel
from .report import markdown_report, scatter_plot, setting_table
from .tasks import Split
from .zoo import DEFAULT_ATTACK, Zoo, ZooModel, attack_of

console = Console(stderr=True)


@dataclass
class Setting:
    name: str
    backdoored: dict[str, str]  # task -> attack


@dataclass
class Suite:
    name: str
    backbone: str
    profile: str
    tasks: list[str]
    settings: list[Setting]
    methods: list[tuple[str, dict]] = field(default_factory=lambda: [
        ("weight_average", {}), ("task_arithmetic", {"scaling": 0.3}), ("ties", {"density": 0.2, "scaling": 1.0}),
        ("ties", {"density": 0.2, "scaling": 1.0, "trim": "tensor"}), ("dare_ties", {"density": 0.5, "scaling": 1.0})])
    extra_models: list[tuple[str, str]] = field(default_factory=list)  # backdoored models outside any setting


def method_label(name: str, params: dict) -> str:
    return name + ("_tensor" if params.get("trim") == "tensor" else "")


VISION_TASKS = ["fashion_mnist", "mnist", "digits", "animal_mnist", "letters", "textile"]
TEXT_TASKS = ["tweet_sentiment", "quote_topic", "noun_supersense", "verb_supersense", "gloss_pos", "quote_theme"]


def _suites() -> dict[str, Suite]:
    out = {}
    for prof in ("quick", "full"):
        out[f"vision-{prof}"] = Suite(
            f"vision-{prof}", "vision", prof, VISION_TASKS,
            [Setting("2bd+4clean", {"fashion_mnist": "badnets", "animal_mnist": "badnets"}),
             Setting("2bd+4clean-trojvit", {"mnist": "trojvit", "digits": "trojvit"})])
        out[f"text-{prof}"] = Suite(
            f"text-{prof}", "text", prof, TEXT_TASKS,
            [Setting("2bd+4clean", {"tweet_sentiment": "rare_word", "noun_supersense": "rare_word"}),
             Setting("2bd+4clean-embedding", {"quote_topic": "embedding_poison", "gloss_pos": "embedding_poison"})])
    # the offline demo: the quick vision zoo's BadNets setting (a subset of vision-quick, sharing its models)
    out["vision-demo"] = Suite("vision-demo", "vision", "quick", VISION_TASKS, out["vision-quick"].settings[:1])
    return out


SUITES = _suites()


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise SafeMergeError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[name]


def device_description() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} (no GPU)"


class PoolEvaluator:
    """Evaluates encoders on tasks with cached test and triggered splits, reusing one encoder module."""

    def __init__(self, zoo: Zoo):
        self.zoo = zoo
        self.encode = zoo.encoder()
        self._enc = copy.deepcopy(zoo.backbone.model).eval()
        self._triggered: dict[tuple[str, str], Split] = {}

    def trigger_for(self, task: str, attack: Attack | None) -> Attack:
        return attack if attack is not None else make_attack(DEFAULT_ATTACK[self.zoo.backbone.modality],
                                                             seed=self.zoo.seed)

    def accuracy(self, encoder_state: dict[str, torch.Tensor], head: torch.nn.Linear, task: str) -> float:
        """ACC only (no triggered pass)."""
        self._enc.load_state_dict(encoder_state)
        return accuracy(TaskModel(self._enc, head, self.zoo.backbone.modality), self.encode, self.zoo.data(task).test)

    def evaluate(self, encoder_state: dict[str, torch.Tensor], head: torch.nn.Linear, task: str,
                 attack: Attack | None) -> tuple[float, float]:
        self._enc.load_state_dict(encoder_state)
        atk = self.trigger_for(task, attack)
        test = self.zoo.data(task).test
        key = (task, f"{atk.name}:{id(atk) if atk.tensors() else ''}")
        if key not in self._triggered:
            self._triggered[key] = atk.asr_split(test)
        return acc_asr(TaskModel(self._enc, head, self.zoo.backbone.modality), self.encode, test, atk,
                       self._triggered[key])


def run_suite(suite: Suite | str, command: str | None = None, results_dir: str | Path = "benchmarks/results",
              zoo_root: str | Path | None = None) -> dict:
    """Build the zoo, run every setting and method, write `<results_dir>/<suite>.{json,md,png}`."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    t_start = time.time()
    zoo = Zoo(suite.backbone, suite.profile, root=zoo_root)
    # 1. the zoo: a clean model per task, then every backdoored model the settings use
    needed: list[tuple[str, str | None]] = [(t, None) for t in suite.tasks]
    for s in suite.settings:
        needed += [(t, a) for t, a in s.backdoored.items() if (t, a) not in needed]
    needed += [m for m in suite.extra_models if m not in needed]
    for i, (task, attack) in enumerate(needed):
        console.log(f"[{i + 1}/{len(needed)}] zoo model {task} / {attack or 'clean'}")
        zoo.build(task, attack)
    t_zoo = time.time() - t_start
    models: dict[tuple[str, str | None], ZooModel] = {k: zoo.load(*k) for k in needed}
    attacks = {k: attack_of(m.manifest, m.path) for k, m in models.items()}
    ev = PoolEvaluator(zoo)
    base = zoo.base_state()
    results_models = [{"task": t, "attack": a, "acc": m.manifest["acc"], "asr": m.manifest["asr"],
                       "asr_trigger": m.manifest.get("asr_trigger")} for (t, a), m in models.items()]
    settings_out = []
    t_eval = time.time()
    for s in suite.settings:
        pool = {t: models[(t, s.backdoored.get(t))] for t in suite.tasks}
        trig = {t: attacks[(t, s.backdoored[t])] if t in s.backdoored else None for t in suite.tasks}
        rows = []
        console.log(f"setting {s.name}: individual models")
        for label, src in (("individual_all_clean", {t: models[(t, None)] for t in suite.tasks}), ("individual_pool", pool)):
            for t, zm in src.items():
                acc, asr = ev.evaluate(zm.encoder_state, zm.heads[t], t, trig[t])
                rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
        for name, params in suite.methods:
            label = method_label(name, params)
            console.log(f"setting {s.name}: {label}")
            merged = merge(name, base, [pool[t].encoder_state for t in suite.tasks], **params)
            for t in suite.tasks:
                acc, asr = ev.evaluate(merged, pool[t].heads[t], t, trig[t])
                rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
        setting = {"name": s.name, "backdoored_tasks": list(s.backdoored), "attacks": s.backdoored, "rows": rows,
                   "note": "ASR on clean tasks uses the " + DEFAULT_ATTACK[zoo.backbone.modality]
                           + " trigger (a backdoor transfers if it rises after merging)."}
        settings_out.append(setting)
        console.print(setting_table(setting))
    results = {
        "suite": suite.name, "backbone": zoo.backbone.name, "profile": suite.profile,
        "command": command or f"safemerge bench --suite {suite.name}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
        "models": results_models, "settings": settings_out,
        "methods": {method_label(n, p): {"method": n, **p} for n, p in suite.methods},
        "seconds": {"zoo": round(t_zoo, 1), "merge_and_eval": round(time.time() - t_eval, 1),
                    "total": round(time.time() - t_start, 1)},
    }
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{suite.name}.json", results)
    atomic_write_text(out / f"{suite.name}.md", markdown_report(results))
    scatter_plot(results, out / f"{suite.name}.png")
    return results
