"""The small Python API behind the CLI: merge model folders, evaluate a model folder."""

from __future__ import annotations

import time
from pathlib import Path

from .backbones import canonical_keys, fingerprint, load_backbone
from .io import check_finite, check_same_base, check_same_keys, load_state_dict
from .config import MergeConfig, ModelRef
from .errors import SafeMergeError
from .merging.methods import merge
from .bench.zoo import MANIFEST, ZooModel, attack_of, heads_from_state, load_zoo_model, save_model_folder


def resolve_path(path: str) -> Path:
    """A path, or a zoo reference `zoo:<backbone>/<profile>/<task>[/<attack>]` (e.g. zoo:vision/quick/mnist)."""
    if not path.startswith("zoo:"):
        return Path(path).expanduser()
    from .bench.zoo import Zoo

    parts = path[4:].strip("/").split("/")
    if len(parts) not in (3, 4):
        raise SafeMergeError(f"bad zoo reference '{path}' (expected zoo:<backbone>/<profile>/<task>[/<attack>])")
    zoo = Zoo(parts[0], parts[1])
    out = zoo.path(parts[2], parts[3] if len(parts) == 4 and parts[3] != "clean" else None)
    if not (out / MANIFEST).exists():
        raise SafeMergeError(f"{path}: not built yet (run: safemerge zoo build --backbone {parts[0]} --profile "
                             f"{parts[1]} --task {parts[2]}" + (f" --attack {parts[3]})" if len(parts) == 4 else ")"))
    return out


def load_model_ref(ref: ModelRef | str | Path) -> ZooModel:
    """A safemerge model folder (encoder + heads + manifest), an HF folder, a bare safetensors file, or a zoo
    reference (`zoo:vision/quick/mnist/badnets`)."""
    ref = ref if isinstance(ref, ModelRef) else ModelRef(path=str(ref))
    p = resolve_path(ref.path)
    if p.is_dir() and (p / MANIFEST).exists():
        zm = load_zoo_model(p)
        if ref.task:
            zm.manifest["task"] = ref.task
        return zm
    sd = load_state_dict(p)
    heads = {}
    hp = (p if p.is_dir() else p.parent) / "heads.safetensors"
    if p.is_dir() and hp.exists():
        heads = heads_from_state(load_state_dict(hp), hp)
    task = ref.task or (next(iter(heads)) if len(heads) == 1 else p.stem if p.is_file() else p.name)
    return ZooModel(p, {"task": task, "attack": None}, sd, heads)


def merge_models(cfg: MergeConfig) -> Path:
    """Check every input against the base, merge the encoders, write an HF folder with all task heads.
    With `streaming`, merge checkpoint files tensor by tensor instead (see `streaming.py`)."""
    if cfg.streaming:
        from .backbones import resolve_backbone_path
        from .merging.streaming import streaming_merge

        base_path = resolve_backbone_path(cfg.base_model) if cfg.base_model in ("vision", "text") else cfg.base_model
        return streaming_merge(cfg.method, base_path, [resolve_path(m.path) for m in cfg.models], cfg.output,
                               cfg.parameters, out_dtype=cfg.out_dtype, max_shard_size=cfg.max_shard_size,
                               max_relative_distance=cfg.max_relative_distance)
    backbone = load_backbone(cfg.base_model)
    base = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    base_fp = fingerprint(base)
    models = [_checked_against_base(ref, base, cfg.base_model, base_fp, cfg.max_relative_distance)
              for ref in cfg.models]
    tasks = [m.task for m in models]
    merged = merge(cfg.method, base, [m.encoder_state for m in models], **cfg.parameters)
    heads = {}
    for m in models:
        for t, h in m.heads.items():
            heads.setdefault(t, h)
    manifest = {"task": tasks[0] if len(tasks) == 1 else None, "tasks": tasks, "attack": None,
                "merge": {"method": cfg.method, "parameters": cfg.parameters,
                          "models": [str(m.path) for m in models]},
                "base_model": cfg.base_model, "base_fingerprint": base_fp,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save_model_folder(Path(cfg.output).expanduser(), backbone, merged, heads, manifest)


def _checked_against_base(ref: ModelRef | str | Path, base: dict, base_name: str, base_fp: str,
                          max_relative_distance: float = 0.5) -> ZooModel:
    """Load a model and refuse it unless it is a finite fine-tune of `base` with the same tensors."""
    zm = load_model_ref(ref)
    zm.encoder_state = canonical_keys(zm.encoder_state, base)
    src = zm.path / "model.safetensors" if zm.path.is_dir() else zm.path
    check_same_keys(base, zm.encoder_state, src, f"the base model {base_name}")
    check_finite(zm.encoder_state, src)
    fp = zm.manifest.get("base_fingerprint")
    if fp and fp != base_fp:
        raise SafeMergeError(f"{zm.path}: fine-tuned from another base model (fingerprint {fp}, base {base_fp})")
    check_same_base(base, zm.encoder_state, src, max_relative_distance)
    return zm


def protect_model(model: str | Path, out: str | Path, base_model: str = "vision", dropout: float = 0.0,
                  permute: bool = True, scale: bool = True, seed: int = 0) -> Path:
    """Write a protected copy of a model folder: same outputs alone, broken in any merge (see `protect`)."""
    from .safety.protect import protect_state

    backbone = load_backbone(base_model)
    base = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    base_fp = fingerprint(base)
    zm = _checked_against_base(model, base, base_model, base_fp)
    state = protect_state(zm.encoder_state, base, permute=permute, scale=scale, dropout=dropout, seed=seed)
    manifest = {**zm.manifest, "protected": {"permute": permute, "scale": scale, "dropout": dropout, "seed": seed,
                                             "source": str(zm.path)},
                "base_fingerprint": base_fp, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save_model_folder(Path(out).expanduser(), backbone, state, zm.heads, manifest)


def evaluate_folder(path: str | Path, profile: str = "quick", attack: str | None = None,
                    tasks: list[str] | None = None) -> list[dict]:
    """ACC and ASR of a model folder on each of its heads' tasks (test split of `profile`)."""
    from .bench.attacks import make_attack
    from .bench.suites import PoolEvaluator
    from .bench.zoo import Zoo

    path = resolve_path(str(path))
    zm = load_model_ref(path)
    zoo = Zoo(str(path), profile)
    ev = PoolEvaluator(zoo)
    own = attack_of(zm.manifest, zm.path)
    rows = []
    for t in tasks or list(zm.heads):
        if t not in zm.heads:
            raise SafeMergeError(f"{path}: no head for task '{t}' (heads: {', '.join(zm.heads)})")
        atk = make_attack(attack, seed=zoo.seed) if attack else own
        acc, asr = ev.evaluate(zm.encoder_state, zm.heads[t], t, atk)
        rows.append({"task": t, "acc": round(acc, 2), "asr": round(asr, 2),
                     "trigger": ev.trigger_for(t, atk).name})
    return rows
