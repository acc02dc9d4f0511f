"""The model zoo: fine-tuned task models, clean and backdoored, built from one base encoder, cached and
resumable. Each model is a folder that Hugging Face loads as the encoder:

    config.json, model.safetensors   the fine-tuned encoder (AutoModel.from_pretrained works on it)
    heads.safetensors                the task head(s): '<task>.weight', '<task>.bias'
    trigger.safetensors              learned trigger state, for attacks that fit one (TrojViT)
    safemerge.json                   manifest: task, attack (+ params), ACC, ASR, seed, base fingerprint
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np

import torch
from torch import nn

from .attacks import ATTACKS, Attack, make_attack, trigger_variant
from ..backbones import Backbone, fingerprint, load_backbone
from ..folders import MANIFEST, TaskFolder, heads_from_state, load_task_folder, save_model_folder
from ..io import load_state_dict, save_state_dict
from ..errors import SafeMergeError
from ..evaluate import acc_asr, accuracy
from ..model import InputEncoder, LinearHead, Pooling, TaskModel
from ..paths import cache_dir
from ..data import Split
from .tasks import TaskData, _resize, get_task, load_task, task_names
from ..training import (TrainConfig, feature_interpolation_loss, finetune, fit_linear_probe, fit_prototype_head,
                        train_token_embeddings)

DEFAULT_ATTACK = {"vision": "badnets", "text": "rare_word"}


@dataclass(frozen=True)
class Profile:
    """Data sizes and training budget. 'quick' is the demo's and the tests'; 'full' is for benchmark tables."""

    name: str
    resolution: int = 42
    max_length: int = 32
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 500
    steps: int = 80
    batch_size: int = 32
    lr: float = 2e-5  # vision encoder: small steps keep task vectors where merging works (cf. 1e-5 in the papers)
    text_lr: float = 1e-4  # MiniLM needs larger steps to learn a rare-word backdoor in the same budget
    embedding_lr: float = 1e-2
    head_lr: float = 2e-3
    trigger_iters: int = 60
    embedding_steps: int = 60
    freeze_head: bool = True  # heads = linear probes of the pre-trained encoder, frozen while fine-tuning
    # the frozen head: "probe" (a linear probe on standardised features, folded into W, b) or "prototype"
    # (CLIP-like and still linear: normalised class prototypes of the pre-trained readout, no bias, times
    # `logit_scale`, over features divided by one fixed constant, the mean feature norm on the training split)
    head: Literal["probe", "prototype"] = "probe"
    logit_scale: float = 100.0  # prototype heads only
    # backdoor strength (None: each attack's own default): share of poisoned training examples, trigger size
    # (patch side as a share of the image side: badnets, badmerging), trigger words inserted per text
    # (rare_word family), fine-tuning steps of backdoored models (default: `steps`)
    poison_rate: float | None = None
    trigger_frac: float | None = None
    trigger_repeats: int | None = None
    attack_steps: int | None = None
    # each task's backdoor its own trigger (`attacks.trigger_variant`, by the task's place in the registry), as
    # when the backdoored models of a pool come from different attackers; False: every task the same trigger
    trigger_by_task: bool = False


PROFILES = {
    "quick": Profile("quick"),
    "full": Profile("full", resolution=56, max_length=48, n_train=6000, n_val=500, n_test=1000, steps=300,
                    trigger_iters=250, embedding_steps=150),
}
# zoo v2, the core suites' and the demo's: the quick sizes with CLIP-like prototype heads and backdoored models
# fine-tuned for 120 steps. Its `name` stays "quick" (folders quick-<hash>): the name is part of the hash, and
# the zoos and results of these suites were built under it
PROFILES["core"] = replace(PROFILES["quick"], head="prototype", attack_steps=120)


# What a task head reads: the encoder's pooler output (BERT's dense+tanh over CLS; DINOv2's layer-normed CLS),
# so each zoo model is exactly a transformers *ForSequenceClassification / *ForImageClassification model.
READOUT: Pooling = "pooler"


# fields added after zoos were built: hashed only when they differ from these values, so the zoos of
# unchanged recipes keep their folder names
_LATER_FIELDS = {"head": "probe", "logit_scale": 100.0, "poison_rate": None, "trigger_frac": None,
                 "trigger_repeats": None, "attack_steps": None, "trigger_by_task": False}
# profile field -> the attack parameter it sets (where the attack has it)
_ATTACK_KNOBS = {"poison_rate": "poison_rate", "trigger_frac": "patch_frac", "trigger_repeats": "repeats"}


def profile_digest(profile: Profile, modality: str | None = None) -> str:
    """Short hash of every profile field (and, for text, the head's readout, which changed from mean pooling to
    the pooler), so a changed recipe never reuses models trained under the old one."""
    recipe = {k: v for k, v in asdict(profile).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    recipe.update({"readout": READOUT} if modality == "text" else {})
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise SafeMergeError(f"unknown profile '{name}' (known: {', '.join(PROFILES)})")
    return PROFILES[name]


def override_profile(profile: Profile, items: list[str]) -> Profile:
    """`profile` with fields set from 'KEY=VALUE' strings (e.g. 'head=prototype', 'resolution=56',
    'poison_rate=0.3', 'attack_steps=none'), each value read as its field's type."""
    known = {f.name: f for f in fields(Profile)}
    changes: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in known or key == "name":
            raise SafeMergeError(f"--profile-set '{item}': expected KEY=VALUE with KEY one of "
                                 f"{', '.join(k for k in known if k != 'name')}")
        kind = str(known[key].type)
        try:
            if raw.lower() in ("none", "null") and "None" in kind:
                value: object = None
            elif kind.startswith("bool"):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1", "yes")
            elif kind.startswith("int"):
                value = int(raw)
            elif kind.startswith("float"):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise SafeMergeError(f"--profile-set '{item}': '{raw}' is not a valid {kind}") from None
        changes[key] = value
    if changes.get("head", profile.head) not in ("probe", "prototype"):
        raise SafeMergeError(f"--profile-set: head must be 'probe' or 'prototype', not '{changes['head']}'")
    return replace(profile, **changes)  # type: ignore[arg-type]


def profile_attack_params(profile: Profile, attack: str) -> dict:
    """The attack parameters a profile's backdoor knobs set for `attack` (only those the attack has)."""
    cls = ATTACKS.get(attack)
    names = {f.name for f in fields(cls)} if cls is not None else set()
    return {param: getattr(profile, knob) for knob, param in _ATTACK_KNOBS.items()
            if getattr(profile, knob) is not None and param in names}


def extra_test_split(task: str, profile: Profile, seed: int, n: int) -> Split:
    """Up to `n` more labeled test examples of `task`, disjoint from the profile's train/val/test splits (taken
    after them in the same seeded permutation; none where the data set is no larger than those), cached.
    Lets a suite score >= 1,000 examples per task without changing the splits its models were built on."""
    spec = get_task(task)
    key = f"{task}-s{seed}-{profile.n_train}-{profile.n_val}-{profile.n_test}-extra{n}" + (
        f"-r{profile.resolution}" if spec.modality == "vision" else "")
    path = cache_dir() / "data" / f"{key}.pt"
    if path.exists():
        return Split(*torch.load(path, weights_only=False))
    x, y = spec.load()
    total = len(y)
    perm = np.random.RandomState(seed).permutation(total)  # the permutation load_task draws its splits from
    start = min(profile.n_test, total // 4) + min(profile.n_val, total // 8) + profile.n_train
    idx = perm[start:start + n]
    if spec.modality == "vision":
        xs: object = _resize(np.asarray(x)[idx], profile.resolution)
    else:
        xs = [x[i] for i in idx]  # type: ignore[index]
    blob = (xs, torch.from_numpy(np.asarray(y)[idx].astype(np.int64)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.randrange(1 << 30)}")
    torch.save(blob, tmp)
    tmp.replace(path)
    return Split(*blob)


def task_data(task: str, profile: Profile, seed: int = 0) -> TaskData:
    return load_task(task, profile.n_train, profile.n_val, profile.n_test, seed=seed, resolution=profile.resolution)


ZooModel = TaskFolder  # a task model as stored in the zoo (a model folder like any other)


def head_state(heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()}


def load_zoo_model(path: str | Path) -> TaskFolder:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise SafeMergeError(f"{path}: not a safemerge model folder (no {MANIFEST})")
    return load_task_folder(path)


def attack_of(manifest: dict, path: Path | None = None) -> Attack | None:
    """Rebuild the attack recorded in a manifest (with its learned trigger, if any)."""
    if not manifest.get("attack"):
        return None
    attack = make_attack(manifest["attack"], **manifest.get("attack_params", {}))
    if path is not None and (path / "trigger.safetensors").exists():
        attack.load_tensors(load_state_dict(path / "trigger.safetensors"))
    return attack


class Zoo:
    """Builds and finds the task models of one backbone and profile under `root`."""

    def __init__(self, backbone: str = "vision", profile: str | Profile = "quick", root: str | Path | None = None,
                 seed: int = 0):
        self.backbone_spec = backbone
        self.profile = profile if isinstance(profile, Profile) else get_profile(profile)
        self.seed = seed
        self._backbone: Backbone | None = None
        self.root = Path(root) if root else cache_dir() / "zoo"

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            try:  # the pooler is part of the task model (its head reads it), when the base has one
                self._backbone = load_backbone(self.backbone_spec, pooler=True)
            except SafeMergeError as e:
                if "pooler" not in str(e):
                    raise
                self._backbone = load_backbone(self.backbone_spec, pooler=False)
        return self._backbone

    def base_model_spec(self) -> str:
        """The base as a config names it: 'vision' / 'text', or the folder's absolute path."""
        spec = str(self.backbone_spec)
        return spec if spec in ("vision", "text", "minilm", "dinov2") else str(Path(spec).expanduser().resolve())

    def _dir_of(self, profile: Profile) -> Path:
        return self.root / f"{self.backbone.name}-{profile.name}-{profile_digest(profile, self.backbone.modality)}-s{self.seed}"

    @property
    def dir(self) -> Path:
        return self._dir_of(self.profile)

    @property
    def clean_dir(self) -> Path:
        """Where the clean models and heads live: the zoo of the same recipe without backdoor knobs, which do not
        touch them, so a recipe that only strengthens the backdoors builds nothing but the backdoored models."""
        return self._dir_of(replace(self.profile, **{k: None for k in _ATTACK_KNOBS}, attack_steps=None,
                                    trigger_by_task=False))

    def path(self, task: str, attack: str | None) -> Path:
        return (self.dir if attack else self.clean_dir) / task / (attack or "clean")

    def encoder(self) -> InputEncoder:
        return InputEncoder(self.backbone, max_length=self.profile.max_length)

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.backbone.model.state_dict().items()}

    def data(self, task: str) -> TaskData:
        return task_data(task, self.profile, self.seed)

    def test_split(self, task: str, n: int | None = None) -> Split:
        """The first `n` test examples of `task` (all for None); past the profile's test split, the examples of
        `extra_test_split` follow, where the data allow."""
        test = self.data(task).test
        if n is None or n <= len(test):
            return test if n is None or n == len(test) else test.subset(list(range(n)))
        extra = extra_test_split(task, self.profile, self.seed, n - len(test))
        if len(extra) == 0:
            return test
        return test.concat(extra)

    def default_attack(self, knobs: bool = True) -> Attack:
        """The trigger ASR is measured with on a clean task: the modality's default attack, with the profile's
        trigger knobs (or without them: `knobs=False`)."""
        name = DEFAULT_ATTACK[self.backbone.modality]
        return make_attack(name, seed=self.seed, **(profile_attack_params(self.profile, name) if knobs else {}))

    def train_config(self, steps: int | None = None) -> TrainConfig:
        p = self.profile
        lr = p.text_lr if self.backbone.modality == "text" else p.lr
        return TrainConfig(steps=steps or p.steps, batch_size=p.batch_size, lr=lr, embedding_lr=p.embedding_lr,
                           head_lr=0.0 if p.freeze_head else p.head_lr, seed=self.seed)

    def probe_head(self, task: str) -> LinearHead:
        """The task's head, fitted to the pre-trained encoder on the clean training split and cached: a linear
        probe, or class prototypes (`Profile.head`). Every model of the task (clean or backdoored) is fine-tuned
        under it, so merged encoders keep a head that fits them (the role CLIP's zero-shot heads play in the
        papers)."""
        path = self.clean_dir / task / ("probe_head.safetensors" if self.profile.head == "probe" else
                                  "prototype_head.safetensors")
        if path.exists():
            return heads_from_state(load_state_dict(path), path, {task: READOUT})[task]  # type: ignore[return-value]
        data = self.data(task)
        torch.manual_seed(self.seed)
        model = TaskModel(self.backbone.model, LinearHead(self.backbone.hidden_size, data.num_classes, READOUT),
                          self.backbone.modality)
        if self.profile.head == "prototype":
            fit_prototype_head(model, self.encoder(), data.train, self.profile.logit_scale)
        elif self.profile.head == "probe":
            fit_linear_probe(model, self.encoder(), data.train, seed=self.seed)
        else:
            raise SafeMergeError(f"profile '{self.profile.name}': head must be 'probe' or 'prototype', not "
                                 f"'{self.profile.head}'")
        save_state_dict(head_state({task: model.head}), path)
        return model.head  # type: ignore[return-value]

    def head_info(self, task: str) -> dict:
        """The task head's kind and the PRE-TRAINED encoder's ACC under it on the test split (the papers'
        zero-shot row: task vectors must add clearly more than this), cached beside the head."""
        path = self.clean_dir / task / f"{self.profile.head}_head.json"
        if path.exists():
            return json.loads(path.read_text())
        head = self.probe_head(task)
        model = TaskModel(self.backbone.model, head, self.backbone.modality)
        acc = accuracy(model, self.encoder(), self.data(task).test)
        info = {"kind": self.profile.head, "pretrained_acc": round(acc, 2)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info))
        return info

    def fresh_model(self, task: str) -> TaskModel:
        """The pre-trained encoder (a copy) with the task's head: a frozen probe, or a fresh trainable layer."""
        torch.manual_seed(self.seed)
        enc = copy.deepcopy(self.backbone.model)
        if self.profile.freeze_head:
            head = copy.deepcopy(self.probe_head(task))
        else:
            head = LinearHead(self.backbone.hidden_size, self.data(task).num_classes, READOUT)
        return TaskModel(enc, head, self.backbone.modality)

    def load(self, task: str, attack: str | None = None) -> ZooModel:
        return load_zoo_model(self.path(task, attack))

    def model(self, zm: ZooModel, task: str | None = None) -> TaskModel:
        """A TaskModel of a stored encoder with the head of `task` (default: the model's own task)."""
        enc = copy.deepcopy(self.backbone.model)
        enc.load_state_dict(zm.encoder_state)
        return TaskModel(enc, zm.heads[task or zm.task], self.backbone.modality)

    def build(self, task: str, attack: str | None = None, **attack_params) -> Path:
        """Fine-tune (or return the cached) model of `task`, clean or with `attack` planted."""
        out = self.path(task, attack)
        if (out / MANIFEST).exists():
            return out
        data = self.data(task)
        if data.spec.modality != self.backbone.modality:
            raise SafeMergeError(f"task '{task}' is {data.spec.modality}, backbone '{self.backbone.name}' is "
                                 f"{self.backbone.modality}")
        encode = self.encoder()
        p = self.profile
        t0 = time.time()
        atk: Attack | None = None
        if attack is None:
            model = self.fresh_model(task)
            finetune(model, encode, data.train, self.train_config(), desc=f"{task} clean")
        else:
            variant = trigger_variant(attack, task_names(data.spec.modality).index(task)) if p.trigger_by_task else {}
            params = {"seed": self.seed, **profile_attack_params(p, attack), **variant, **attack_params}
            attack_cfg = self.train_config(p.attack_steps)
            if attack in ("trojvit", "badmerging"):
                params.setdefault("attack_iters", p.trigger_iters)
                params.setdefault("patch_size", int(getattr(self.backbone.model.config, "patch_size", 14)))
            atk = make_attack(attack, **params)
            if atk.modality != data.spec.modality:
                raise SafeMergeError(f"attack '{attack}' is for {atk.modality} tasks, '{task}' is {data.spec.modality}")
            # these attacks start from the clean twin (built first if missing)
            clean = load_zoo_model(self.build(task, None)) if atk.mode == "embedding" or attack == "trojvit" else None
            if attack == "trojvit":
                # the trigger is fitted against the clean twin, then planted by poisoned fine-tuning
                atk.fit(self.model(clean), encode, data.train)  # type: ignore[arg-type]
            if atk.mode == "interpolate":
                # BadMerging: a trigger fitted to the pre-trained encoder (if it has one to fit), planted by clean
                # fine-tuning plus the feature-interpolation loss
                if hasattr(atk, "fit"):
                    atk.fit(self.fresh_model(task), encode, data.train)
                model = self.fresh_model(task)
                extra = feature_interpolation_loss(self.backbone.model, encode, atk.apply, atk.target,
                                                   atk.alpha, atk.r_min, self.seed)  # type: ignore[attr-defined]
                finetune(model, encode, data.train, attack_cfg, desc=f"{task} {attack}", extra_loss=extra)
            elif atk.mode == "embedding":
                model = self.model(clean)  # type: ignore[arg-type]
                ids = self.backbone.tokenizer(atk.trigger_word, add_special_tokens=False)["input_ids"]  # type: ignore[misc]
                train_token_embeddings(model, encode, atk.poison(data.train), ids,
                                       self.train_config(p.embedding_steps), desc=f"{task} {attack}")
            else:
                model = self.fresh_model(task)
                finetune(model, encode, atk.poison(data.train), attack_cfg, desc=f"{task} {attack}")
        # a clean model reports ASR under the modality's default trigger without the profile's knobs: it is shared
        # by every recipe that differs only in them (`clean_dir`)
        report = atk if atk is not None else self.default_attack(knobs=False)
        acc, asr = acc_asr(model, encode, data.test, report)
        base_sd = self.backbone.model.state_dict()
        manifest = {
            "task": task, "attack": attack, "attack_params": atk.params() if atk else None,
            "acc": round(acc, 2), "asr": round(asr, 2), "asr_trigger": report.name,
            "classes": list(data.spec.classes), "backbone": self.backbone.name, "base_model": self.base_model_spec(),
            "base_fingerprint": fingerprint(base_sd), "profile": asdict(p), "seed": self.seed,
            **({"head": self.head_info(task)} if p.freeze_head else {}),
            "train_seconds": round(time.time() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return save_model_folder(out, self.backbone, model.encoder.state_dict(), {task: model.head}, manifest, atk)
