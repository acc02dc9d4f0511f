"""Benchmark suites in the DAM paper's Table 2 style: build the zoo, form each setting's pool (some tasks
backdoored), merge it with every method, and report ACC and ASR per task to `benchmarks/results/<suite>.json`
(+ a Markdown table and a scatter plot).

Seeds: each seed has its own zoo (data split, heads, fine-tuning, attacks) and merges. A run of some seeds
adds them to the results file's other seeds when the file was written by the same suite recipe (so a suite
can be completed across runs, one seed at a time); the file's rows are the mean over all its seeds."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from .attacks import ATTACKS, Attack
from .tasks import get_task
from ..io import atomic_write_json, atomic_write_text
from ..errors import SafeMergeError
from ..memory import release_memory
from ..evaluate import accuracy, attack_rates
from ..merging.methods import merge, weight_average
from ..model import TaskModel
from ..safety.defenses import defend
from ..merging.pool import Pool, run_pool_method
from .report import (aggregate_heads, aggregate_models, aggregate_settings, lambda_curve_plot, markdown_report, scatter_plot,
                     setting_table, summarize)
from ..data import Split
from .zoo import (DEFAULT_ATTACK, PROFILES, READOUT, Profile, Zoo, ZooModel, attack_of, get_profile,
                  profile_digest)

console = Console(stderr=True)


@dataclass
class Setting:
    name: str
    backdoored: dict[str, str]  # task -> attack
    # "wag": the pool also holds the CLEAN model of each backdoored task (a clean and a backdoored model of
    # the same task, merged together); methods: the labels run in this setting (None = all of the suite's)
    wag: bool = False
    methods: list[str] | None = None
    defenses: bool = False  # post-hoc defenses (ANP, AWM, SAU) on the best merged model of the setting
    curves: bool = False  # DAM over lambda_adv and the Table 7 mask ablation


DATA_FREE = [("weight_average", "weight_average", {}), ("task_arithmetic", "task_arithmetic", {"scaling": 0.3}),
             ("ties", "ties", {"density": 0.2, "scaling": 1.0}),
             ("ties_tensor", "ties", {"density": 0.2, "scaling": 1.0, "trim": "tensor"}),
             ("dare_ties", "dare_ties", {"density": 0.5, "scaling": 1.0})]


@dataclass(frozen=True)
class Budget:
    """Optimisation budget of the test-time methods. The papers' 500-1000 steps at lr 1e-3 (mask, lambda) and
    1e-4 (perturbation) do not fit 2 CPU cores; a quick budget takes fewer, larger steps (same total motion)."""

    steps: int = 500  # AdaMerging steps (also the final AdaMerging stage of Concrete AM / DAM)
    mask_steps: int = 500  # concrete-mask steps
    lr: float = 1e-3  # AdaMerging lambdas
    mask_lr: float = 1e-2
    adv_lr: float = 1e-3  # DAM's universal perturbation
    perturb_bound: float = 0.05  # mean |delta| per input element (normalized pixels / embedding units)
    ref_adv_lr: float = 1e-4  # DAM with the reference's perturbation (updated every step, unbounded)

    def concrete(self) -> dict:
        return {"mask_steps": self.mask_steps, "adamerging_steps": self.steps, "lr": self.mask_lr,
                "adamerging_lr": self.lr}


BUDGET = {"quick": Budget(steps=30, mask_steps=30, lr=1e-2, mask_lr=0.1, adv_lr=4e-3, ref_adv_lr=3e-3),
          "full": Budget()}
# the core suites (zoo v2): the quick budget with the concrete-mask lr chosen on validation (BENCHMARKS.md, "Zoo v2
# and the core suites": lr 0.1 cost Concrete AM / DAM 9-18 points of validation ACC(all) against 0.02)
BUDGET["core"] = replace(BUDGET["quick"], mask_lr=0.02)


def all_methods(b: Budget) -> list[tuple[str, str, dict]]:
    """Every merging row of the DAM tables under budget `b`."""
    concrete = b.concrete()
    return [*DATA_FREE, ("fisher", "fisher", {}), ("regmean", "regmean", {}),
            ("adamerging_task", "adamerging_task", {"steps": b.steps, "lr": b.lr}),
            ("adamerging_layer", "adamerging_layer", {"steps": b.steps, "lr": b.lr}),
            ("concrete_ta", "concrete_ta", {"steps": b.mask_steps, "lr": b.mask_lr}),
            ("concrete_am_task", "concrete_am_task", dict(concrete)),
            ("concrete_am_layer", "concrete_am_layer", dict(concrete)),
            ("dam", "dam", {**concrete, "adv_lr": b.adv_lr, "perturb_bound": b.perturb_bound}),
            # the reference loop: exact inner step, perturbation every step on its own batch, its clamp
            ("dam_reference", "dam", {**concrete, "adv_lr": b.ref_adv_lr, "perturbation": "reference",
                                      "inner": "exact"})]


@dataclass
class Suite:
    name: str
    backbone: str
    profile: str | Profile  # a profile name, or a Profile (tests, one-off recipes)
    tasks: list[str]
    settings: list[Setting]
    methods: list[tuple[str, str, dict]] = field(default_factory=lambda: list(DATA_FREE))  # (label, name, params)
    extra_models: list[tuple[str, str]] = field(default_factory=list)  # backdoored models outside any setting
    defenses: list[str] = field(default_factory=lambda: ["anp", "awm", "sau"])
    lambda_adv: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.3, 1.0])
    # evaluate on the first N test examples per task (None: the profile's test split); past the test split,
    # examples held apart from every split follow where the data allow (`Zoo.test_split`)
    eval_examples: int | None = None

    def needed_models(self) -> list[tuple[str, str | None]]:
        """Every zoo model the suite uses: a clean one per task, then each setting's backdoored ones."""
        needed: list[tuple[str, str | None]] = [(t, None) for t in self.tasks]
        for s in self.settings:
            needed += [(t, a) for t, a in s.backdoored.items()]
        needed += self.extra_models
        return list(dict.fromkeys(needed))


VISION_TASKS = ["fashion_mnist", "mnist", "digits", "animal_mnist", "letters", "textile"]
TEXT_TASKS = ["tweet_sentiment", "quote_topic", "noun_supersense", "verb_supersense", "gloss_pos", "quote_theme"]
MERGE_AWARE = {"vision": "badmerging", "text": "badmerging_text"}  # the attacks built to survive merging
BEST_BASELINES = ["task_arithmetic", "ties", "adamerging_layer", "concrete_am_layer", "dam"]


def dam_settings(modality: str) -> list[Setting]:
    """The DAM paper's settings: 2 and 4 backdoored tasks, two attack types, WAG, and BadMerging."""
    if modality == "vision":
        two = {"fashion_mnist": "badnets", "animal_mnist": "badnets"}
        four = {**two, "mnist": "badnets", "letters": "badnets"}
        types = {"fashion_mnist": "badnets", "mnist": "trojvit"}
        wag = {"fashion_mnist": "badnets"}
        adaptive = {"fashion_mnist": "badmerging", "animal_mnist": "badmerging"}
    else:
        two = {"tweet_sentiment": "rare_word", "noun_supersense": "rare_word"}
        four = {**two, "verb_supersense": "rare_word", "quote_theme": "rare_word"}
        types = {"noun_supersense": "rare_word", "quote_topic": "embedding_poison"}
        wag = {"noun_supersense": "rare_word"}
        adaptive = {"noun_supersense": "badmerging_text", "gloss_pos": "badmerging_text"}
    return [Setting("2bd+4clean", two, defenses=True, curves=True), Setting("4bd+2clean", four, defenses=True),
            Setting("2types", types), Setting("wag", wag, wag=True, methods=[*BEST_BASELINES, "wag"]),
            Setting("badmerging", adaptive, methods=BEST_BASELINES)]


def _suites() -> dict[str, Suite]:
    out = {}
    for prof in ("quick", "full"):
        for modality, tasks in (("vision", VISION_TASKS), ("text", TEXT_TASKS)):
            out[f"{modality}-{prof}"] = Suite(f"{modality}-{prof}", modality, prof, tasks, dam_settings(modality),
                                              all_methods(BUDGET[prof]), eval_examples=250 if prof == "quick" else None)
    for name in ("vision-quick", "text-quick", "vision-full", "text-full"):  # reference DAM: the main settings only
        for st in out[name].settings[2:]:
            if st.methods is None:
                st.methods = [m[0] for m in out[name].methods if m[0] != "dam_reference"]
    # zoo v2 (CLIP-like prototype heads) and the DAM paper's main comparison, one run per seed: the two main
    # settings, the main rows, 1000 test examples per task, no defenses or curves. The backdoors are the attacks'
    # merge-aware variants (BadMerging), fine-tuned for 120 steps: the standard ones did not survive AdaMerging
    # (BENCHMARKS.md, "Backdoors that survive merging")
    core = {"task_arithmetic", "ties", "fisher", "regmean", "adamerging_layer", "concrete_am_layer", "dam",
            "dam_reference"}
    for modality, tasks in (("vision", VISION_TASKS), ("text", TEXT_TASKS)):
        main = [replace(st, backdoored={t: MERGE_AWARE[modality] for t in st.backdoored}, defenses=False,
                        curves=False, methods=None) for st in dam_settings(modality)[:2]]
        out[f"{modality}-core"] = Suite(f"{modality}-core", modality, "core", tasks, main,
                                        [m for m in all_methods(BUDGET["core"]) if m[0] in core],
                                        defenses=[], eval_examples=1000)
    # the offline demo, sized for 10 minutes from an empty cache: 4 of vision-core's tasks (its seed-0 models),
    # the two backdoored by BadMerging, merged by TA, TIES, AdaMerging and DAM, 250 test examples per task
    two = out["vision-core"].settings[0].backdoored
    demo_tasks = [t for t in VISION_TASKS if t in two] + [t for t in VISION_TASKS if t not in two][:2]
    out["vision-demo"] = Suite("vision-demo", "vision", "core", [t for t in VISION_TASKS if t in demo_tasks],
                               [Setting("2bd+2clean", two)],
                               [m for m in out["vision-core"].methods
                                if m[0] in {"task_arithmetic", "ties", "adamerging_layer", "dam"}],
                               eval_examples=250)
    return out


SUITES = _suites()


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise SafeMergeError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[name]


def only_methods(suite: Suite, labels: Sequence[str]) -> Suite:
    """`suite` with only the method rows `labels` (in the suite's order), each setting keeping those it ran."""
    known = [label for label, _, _ in suite.methods]
    unknown = [x for x in labels if x not in known]
    if not labels or unknown:
        raise SafeMergeError(f"--methods: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none given'}"
                             f" (suite '{suite.name}' has: {', '.join(known)})")
    settings = [replace(st, methods=None if st.methods is None else [m for m in st.methods if m in labels])
                for st in suite.settings]
    return replace(suite, methods=[m for m in suite.methods if m[0] in labels], settings=settings)


def with_attack(suite: Suite, attack: str) -> Suite:
    """`suite` with `attack` planted in every backdoored task of every setting."""
    cls = ATTACKS.get(attack)
    if cls is None or cls.modality != suite_modality(suite):
        known = [n for n, c in ATTACKS.items() if c.modality == suite_modality(suite)]
        raise SafeMergeError(f"--attack: unknown {suite_modality(suite)} attack '{attack}' (known: {', '.join(known)})")
    return replace(suite, settings=[replace(st, backdoored={t: attack for t in st.backdoored}) for st in suite.settings])


def suite_modality(suite: Suite) -> str:
    """'vision' or 'text': the suite's backbone name, or its first task's modality (custom backbones)."""
    return suite.backbone if suite.backbone in ("vision", "text") else get_task(suite.tasks[0]).modality


def device_description() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} (no GPU)"


class PoolEvaluator:
    """Evaluates encoders on tasks with cached test (or validation: `split="val"`) and triggered splits, reusing
    one encoder module."""

    def __init__(self, zoo: Zoo, limit: int | None = None, split: str = "test"):
        if split not in ("test", "val"):
            raise SafeMergeError(f"unknown evaluation split '{split}' (known: test, val)")
        self.zoo = zoo
        self.limit = limit
        self.split = split
        self.encode = zoo.encoder()
        self._enc = copy.deepcopy(zoo.backbone.model).eval()
        self._triggered: dict[tuple[str, str], Split] = {}

    def trigger_for(self, task: str, attack: Attack | None) -> Attack:
        return attack if attack is not None else self.zoo.default_attack()

    def accuracy(self, encoder_state: dict[str, torch.Tensor], head: torch.nn.Linear, task: str) -> float:
        """ACC only (no triggered pass)."""
        self._enc.load_state_dict(encoder_state)
        return accuracy(TaskModel(self._enc, head, self.zoo.backbone.modality), self.encode, self.eval_split(task))

    def eval_split(self, task: str) -> Split:
        """The labeled split `task` is scored on (test, or validation for `split="val"`), cut to `limit`; a test
        `limit` past the test split adds held-apart examples where the data allow."""
        if self.split == "test":
            return self.zoo.test_split(task, self.limit)
        split = getattr(self.zoo.data(task), self.split)
        return split if self.limit is None or self.limit >= len(split) else split.subset(list(range(self.limit)))

    def evaluate(self, encoder_state: dict[str, torch.Tensor], head: torch.nn.Linear, task: str,
                 attack: Attack | None) -> tuple[float, float]:
        return self.rates(encoder_state, head, task, attack)[:2]

    def rates(self, encoder_state: dict[str, torch.Tensor], head: torch.nn.Linear, task: str,
              attack: Attack | None) -> tuple[float, float, float]:
        """ACC, ASR and the untriggered target rate (`evaluate.attack_rates`)."""
        self._enc.load_state_dict(encoder_state)
        atk = self.trigger_for(task, attack)
        test = self.eval_split(task)
        # a trigger is its attack's name and parameters (position, word, size...), or the attack itself when learned
        key = (task, f"{atk.name}:{json.dumps(atk.params(), sort_keys=True, default=str)}:"
                     f"{id(atk) if atk.tensors() else ''}")
        if key not in self._triggered:
            self._triggered[key] = atk.asr_split(test)
        return attack_rates(TaskModel(self._enc, head, self.zoo.backbone.modality), self.encode, test, atk,
                            self._triggered[key])


def _pool_for(suite: Suite, s: Setting, zoo: Zoo, models: dict, progress: bool,
              split: str = "test") -> tuple[Pool, list[str]]:
    """The setting's merge problem: one entry per pooled model (WAG settings pool two models of a task).
    Test-time methods adapt on the unlabeled inputs of `split` ("val" to tune them without touching test); on
    test, on every input scored when the suite scores more than the test split."""
    entries = [(t, models[(t, s.backdoored.get(t))]) for t in suite.tasks]
    if s.wag:
        entries += [(t, models[(t, None)]) for t in s.backdoored]
    tasks = [t for t, _ in entries]
    data = {t: zoo.data(t) for t in suite.tasks}

    def adapt_on(t: str):  # all the inputs scored: the split, or the test split plus its held-apart examples
        if split == "test" and suite.eval_examples is not None and suite.eval_examples > len(data[t].test):
            return zoo.test_split(t, suite.eval_examples).x
        return getattr(data[t], split).x

    pool = Pool(zoo.backbone.model, zoo.base_state(), [zm.encoder_state for _, zm in entries],
                [zm.heads[t] for t, zm in entries], [adapt_on(t) for t in tasks],
                [data[t].train.x for t in tasks], zoo.encoder(), seed=zoo.seed, progress=progress)
    return pool, tasks


@dataclass
class SettingModels:
    """One setting of a suite on one seed's zoo: its models (built if missing), triggers and frozen heads."""

    zoo: Zoo
    setting: Setting
    models: dict[tuple[str, str | None], ZooModel]
    triggers: dict[str, Attack]  # backdoored task -> its model's trigger
    heads: dict[str, torch.nn.Module]  # task -> the head every model of the task shares


def setting_models(suite: Suite, setting: str, seed: int = 0, zoo_root: str | Path | None = None) -> SettingModels:
    """The models of `setting` on the zoo of `seed` (clean ones for every task, the setting's backdoored ones)."""
    st = next((s for s in suite.settings if s.name == setting), None)
    if st is None:
        raise SafeMergeError(f"unknown setting '{setting}' (known: {', '.join(s.name for s in suite.settings)})")
    zoo = Zoo(suite.backbone, suite.profile, root=zoo_root, seed=seed)
    needed = [(t, None) for t in suite.tasks] + list(st.backdoored.items())
    for k in needed:
        zoo.build(*k)
    models = {k: zoo.load(*k) for k in needed}
    triggers = {t: attack_of(models[(t, a)].manifest, models[(t, a)].path) for t, a in st.backdoored.items()}
    return SettingModels(zoo, st, models, triggers, {t: models[(t, None)].heads[t] for t in suite.tasks})


def _clean_subsets(zoo: Zoo, tasks: list[str], fraction: float = 0.05) -> list:
    """A small labeled clean split per task (the first `fraction` of its training data): what post-hoc
    defenses may use."""
    out = []
    for t in tasks:
        train = zoo.data(t).train
        out.append(train.subset(list(range(max(8, int(fraction * len(train)))))))
    return out


def suite_profile(suite: Suite) -> Profile:
    return suite.profile if isinstance(suite.profile, Profile) else get_profile(suite.profile)


def suite_recipe(suite: Suite) -> str:
    """Hash of everything that defines a suite's numbers (backbone, profile, tasks, settings, methods, defenses,
    lambda_adv grid, evaluation size): seeds are only combined in one results file under the same recipe."""
    prof = suite_profile(suite)
    spec = {"backbone": str(suite.backbone), "profile": asdict(prof), "profile_digest": profile_digest(prof),
            "readout": READOUT, "tasks": suite.tasks, "settings": [asdict(st) for st in suite.settings],
            "methods": suite.methods, "extra_models": suite.extra_models, "defenses": suite.defenses,
            "lambda_adv": suite.lambda_adv, "eval_examples": suite.eval_examples}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def previous_seeds(path: Path, recipe: str) -> dict[int, dict]:
    """The per-seed results an existing results file holds for the same suite recipe (none otherwise)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        console.log(f"{path}: unreadable, replaced")
        return {}
    if "per_seed" not in data or data.get("recipe") != recipe:
        console.log(f"{path}: written by another suite recipe (or before seeds were kept), replaced")
        return {}
    return {int(k): v for k, v in data["per_seed"].items()}


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]."""
    out: list[int] = []
    try:
        for part in (x.strip() for x in text.split(",")):
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise SafeMergeError(f"--seeds: expected seeds like '0,1,2' or '0-2', not '{text}'") from None
    if not out or any(x < 0 for x in out):
        raise SafeMergeError(f"--seeds: expected seeds like '0,1,2' or '0-2', not '{text}'")
    return list(dict.fromkeys(out))


def run_suite(suite: Suite | str, command: str | None = None, results_dir: str | Path = "benchmarks/results",
              zoo_root: str | Path | None = None, progress: bool = True, seeds: Sequence[int] = (0,),
              fresh: bool = False) -> dict:
    """Build the zoo, run every setting and method for each seed, write `<results_dir>/<suite>.{json,md,png}`
    (+ one scatter PNG per setting and, for settings with curves, DAM's lambda_adv curve). Seeds already in the
    results file under the same recipe are kept (the ones run now replace theirs) unless `fresh`."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    seeds = list(dict.fromkeys(int(x) for x in seeds))
    if not seeds:
        raise SafeMergeError("bench: give at least one seed")
    out = Path(results_dir)
    recipe = suite_recipe(suite)
    previous = {} if fresh else previous_seeds(out / f"{suite.name}.json", recipe)
    kept = {k: v for k, v in previous.items() if k not in seeds}
    if kept:
        console.log(f"keeping seeds {', '.join(map(str, sorted(kept)))} of {out / (suite.name + '.json')}")
    done: dict[int, dict] = {}
    results: dict = {}
    for seed in seeds:
        def write(partial: dict, final: bool, seed: int = seed) -> dict:
            per_seed = {**kept, **done, seed: partial}
            return _write(suite, per_seed, command, out, recipe, final, seeds, seed)
        resume = previous.get(seed) if previous.get(seed, {}).get("incomplete") else None
        results = _run_seed(suite, seed, zoo_root, progress, write, resume)
        done[seed] = results["per_seed"][str(seed)]
        release_memory()
    return results


def _run_seed(suite: Suite, seed: int, zoo_root: str | Path | None, progress: bool,
              write: Callable[[dict, bool], dict], resume: dict | None = None) -> dict:
    """One seed of a suite: its zoo, every setting and method; `write(per-seed results, final)` after each
    setting (so a long run that stops keeps what it measured). `resume`: this seed's results from a run that
    stopped; its finished settings are kept and only the others run."""
    t_start = time.time()
    settings_out: list[dict] = []
    spent = {"zoo": 0.0, "merge_and_eval": 0.0, "total": 0.0}
    if resume is not None:
        settings_out = [st for st in resume["settings"] if st["name"] in {s.name for s in suite.settings}]
        spent = {k: float(resume["seconds"].get(k, 0.0)) for k in spent}
        console.log(f"[seed {seed}] resuming: keeping {', '.join(st['name'] for st in settings_out) or 'nothing'}")
    zoo = Zoo(suite.backbone, suite.profile, root=zoo_root, seed=seed)
    needed = suite.needed_models()
    for i, (task, attack) in enumerate(needed):
        console.log(f"[seed {seed}] [{i + 1}/{len(needed)}] zoo model {task} / {attack or 'clean'}")
        zoo.build(task, attack)
        release_memory()
    t_zoo = time.time() - t_start
    models: dict[tuple[str, str | None], ZooModel] = {k: zoo.load(*k) for k in needed}
    attacks = {k: attack_of(m.manifest, m.path) for k, m in models.items()}
    ev = PoolEvaluator(zoo, suite.eval_examples)
    results_models = [{"task": t, "attack": a, "acc": m.manifest["acc"], "asr": m.manifest["asr"],
                       "asr_trigger": m.manifest.get("asr_trigger")} for (t, a), m in models.items()]
    heads = {t: zoo.head_info(t) for t in suite.tasks} if suite_profile(suite).freeze_head else {}
    t_eval = time.time()

    def seed_results(final: bool) -> dict:
        order = [x.name for x in suite.settings]
        res = {"seed": seed, "backbone": zoo.backbone.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "device": device_description(), "models": results_models,
               "settings": sorted(settings_out, key=lambda st: order.index(st["name"])),
               "eval_examples": {t: len(ev.eval_split(t)) for t in suite.tasks}, "heads": heads,
               "seconds": {"zoo": round(spent["zoo"] + t_zoo, 1),
                           "merge_and_eval": round(spent["merge_and_eval"] + time.time() - t_eval, 1),
                           "total": round(spent["total"] + time.time() - t_start, 1)}}
        if resume is not None:
            res["resumed"] = True  # its seconds add up the runs that made it
        if not final:
            res["incomplete"] = f"{len(settings_out)} of {len(suite.settings)} settings"
        return res

    finished = {st["name"] for st in settings_out}
    for s in suite.settings:
        if s.name in finished:
            continue
        pool, pool_tasks = _pool_for(suite, s, zoo, models, progress)
        trig = {t: attacks[(t, s.backdoored[t])] if t in s.backdoored else None for t in suite.tasks}
        head_of = {t: models[(t, None)].heads[t] for t in suite.tasks}  # one head per task, shared by its models
        rows: list[dict] = []
        seconds: dict[str, float] = {}
        effects: dict[str, dict] = {}

        def add_rows(label: str, state: dict[str, torch.Tensor]) -> None:
            for t in suite.tasks:
                acc, asr = ev.evaluate(state, head_of[t], t, trig[t])
                rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})

        def record(label: str, info: dict) -> None:
            """Keep what a DAM run's perturbation did (per pooled model, named by task)."""
            eff = info.get("perturbation_effect")
            if eff is None:
                return
            names = [t if pool_tasks.index(t) == j else f"{t}#{pool_tasks[:j + 1].count(t)}"
                     for j, t in enumerate(pool_tasks)]
            effects[label] = {"perturbation": info.get("perturbation"), "updates": info.get("perturbation_updates"),
                              "per_task": dict(zip(names, eff["per_task"])), "mean": eff["mean"]}

        console.log(f"[seed {seed}] setting {s.name}: individual models")
        for label, src in (("individual_all_clean", {t: models[(t, None)] for t in suite.tasks}),
                           ("individual_pool", {t: models[(t, s.backdoored.get(t))] for t in suite.tasks})):
            for t, zm in src.items():
                acc, asr = ev.evaluate(zm.encoder_state, zm.heads[t], t, trig[t])
                rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
        wanted = s.methods if s.methods is not None else [m[0] for m in suite.methods]
        # the defenses need the state of the best baseline by ACC(all) only: keep that one, not every method's
        defend_on = s.defenses and bool(suite.defenses)
        best: tuple[str, float, dict[str, torch.Tensor]] | None = None
        for label, name, params in suite.methods:
            if label not in wanted:
                continue
            console.log(f"[seed {seed}] setting {s.name}: {label}")
            t0 = time.time()
            state, info = run_pool_method(name, pool, **params)
            seconds[label] = round(time.time() - t0, 1)
            record(label, info)
            add_rows(label, state)
            if defend_on and not label.startswith(("dam", "concrete")):
                score = summarize(rows, list(s.backdoored))[label]["acc_all"]
                if best is None or score > best[1]:
                    best = (label, score, state)
            del state, info
            release_memory()
        if s.wag and "wag" in wanted:  # WAG: average the models of each task first, then task arithmetic
            t0 = time.time()
            per_task = [weight_average(pool.base, [m for m, t in zip(pool.models, pool_tasks) if t == task])
                        for task in suite.tasks]
            add_rows("wag", merge("task_arithmetic", pool.base, per_task, scaling=0.3))
            seconds["wag"] = round(time.time() - t0, 1)
            del per_task
        setting: dict = {"name": s.name, "backdoored_tasks": list(s.backdoored), "attacks": s.backdoored}
        if s.curves:
            _curves(suite, s, pool, rows, seconds, add_rows, setting, record)
        if defend_on and best is not None:
            setting["defended_method"] = best[0]
            clean = _clean_subsets(zoo, suite.tasks)
            for d in suite.defenses:
                console.log(f"[seed {seed}] setting {s.name}: {d} on {best[0]}")
                t0 = time.time()
                state = defend(d, pool.encoder, pool.base, best[2], [head_of[t] for t in suite.tasks], clean,
                               pool.encode, seed=zoo.seed, progress=progress)
                seconds[d] = round(time.time() - t0, 1)
                add_rows(d, state)
                del state
        best = None
        if effects:
            setting["perturbation_effect"] = effects
        setting.update({"rows": rows, "seconds": seconds, "note": (
            "ASR on clean tasks uses the " + DEFAULT_ATTACK[zoo.backbone.modality] + " trigger (a backdoor transfers "
            "if it rises after merging). AdaMerging, Concrete TA/AM and DAM adapt on unlabeled test inputs "
            "(test-time methods, as in their papers); Fisher and RegMean use unlabeled training inputs"
            + ("; post-hoc defenses (anp, awm, sau) are applied to the best baseline by ACC(all), "
               + setting.get("defended_method", "") + ", with 5% labeled clean training data" if s.defenses else "")
            + ".")})
        settings_out.append(setting)
        del pool
        release_memory()
        console.print(setting_table(setting))
        write(seed_results(False), False)
    return write(seed_results(True), True)


def _write(suite: Suite, per_seed: dict[int, dict], command: str | None, out: Path, recipe: str, final: bool,
           run_seeds: Sequence[int], current: int) -> dict:
    """Write the results of every seed so far: the settings' rows are the mean over the seeds that ran them."""
    seeds = sorted(per_seed)
    last = per_seed[seeds[-1]]
    results = {
        "suite": suite.name, "backbone": last["backbone"],
        "profile": suite_profile(suite).name,
        "command": (command or f"safemerge bench --suite {suite.name}") + (
            f" --seeds {','.join(map(str, seeds))}" if seeds != [0] else ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
        "seeds": seeds, "recipe": recipe,
        "models": aggregate_models(per_seed), "heads": aggregate_heads(per_seed),
        "settings": aggregate_settings(per_seed),
        "eval_examples_per_task": suite.eval_examples,
        "methods": {label: {"method": n, **p} for label, n, p in suite.methods},
        # this run's seeds; every seed's own timings are under per_seed
        "seconds": {k: round(sum(per_seed[x]["seconds"][k] for x in run_seeds if x in per_seed), 1)
                    for k in ("zoo", "merge_and_eval", "total")},
        "per_seed": {str(x): per_seed[x] for x in seeds},
    }
    unfinished = [f"seed {x}: {per_seed[x]['incomplete']}" for x in seeds if per_seed[x].get("incomplete")]
    if unfinished or not final:
        results["incomplete"] = "; ".join(unfinished) or "running"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{suite.name}.json", results)
    atomic_write_text(out / f"{suite.name}.md", markdown_report(results))
    scatter_plot(results, out / f"{suite.name}.png")
    changed = per_seed[current]["settings"]
    changed_name = changed[-1]["name"] if changed else None
    for i, st in enumerate(results["settings"]):
        if not final and st["name"] != changed_name:
            continue  # written when its own setting finished
        scatter_plot(results, out / f"{suite.name}-{st['name']}.png", only=i)
        if st.get("lambda_adv_curve"):
            lambda_curve_plot(results["suite"], st, out / f"{suite.name}-{st['name']}-lambda_adv.png")
    return results


def _curves(suite: Suite, s: Setting, pool: Pool, rows: list[dict], seconds: dict, add_rows, setting: dict,
            record: Callable[[str, dict], None] | None = None) -> None:
    """DAM over lambda_adv (the safety/accuracy trade-off) and the Table 7 mask ablation, as extra rows."""
    dam_params = next((p for label, n, p in suite.methods if label == "dam"), None)
    if dam_params is None:
        return
    bd = list(s.backdoored)
    curve = []
    for lam in suite.lambda_adv:
        label = "dam" if lam == dam_params.get("lambda_adv", 0.1) else f"dam_adv{lam:g}".replace(".", "p")
        if label not in seconds:
            console.log(f"setting {s.name}: {label}")
            t0 = time.time()
            state, info = run_pool_method("dam", pool, **{**dam_params, "lambda_adv": lam})
            add_rows(label, state)
            if record is not None:
                record(label, info)
            seconds[label] = round(time.time() - t0, 1)
            del state, info
        curve.append({"lambda_adv": lam, "method": label, **summarize(rows, bd)[label]})
    setting["lambda_adv_curve"] = curve
    for label, extra in (("dam_two_masks", {"masks": "two"}), ("dam_m2_only", {"clean_weight": 0.0})):
        console.log(f"setting {s.name}: {label}")
        t0 = time.time()
        state, info = run_pool_method("dam", pool, **{**dam_params, **extra})
        add_rows(label, state)
        if record is not None:
            record(label, info)
        seconds[label] = round(time.time() - t0, 1)
        del state, info
    summ = summarize(rows, bd)
    setting["mask_ablation"] = {k: {"method": m, **summ[m]} for k, m in (
        ("none", "adamerging_layer"), ("m1_only", "concrete_am_layer"), ("m2_only", "dam_m2_only"),
        ("both_two_masks", "dam_two_masks"), ("single_mask_default", "dam")) if m in summ}
