"""Read a mergekit YAML config (the methods both tools share) into a streaming merge, so mergekit users can
switch with the config they have:

    merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear
    base_model: ./base
    models:
      - model: ./ft1
        parameters: {weight: 1.0, density: 0.2}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

Mapping: linear (equal weights) -> weight_average; task_arithmetic -> task_arithmetic (lambda = scaling, weights
per model); ties -> ties with per-tensor trim (mergekit trims per tensor) and normalised disjoint mean;
dare_ties / dare_linear -> dare_ties / dare (their random masks differ from mergekit's generator).
Anything else is refused with one line naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_yaml_mapping
from ..errors import SafeMergeError

METHOD_MAP = {"linear": "weight_average", "task_arithmetic": "task_arithmetic", "ties": "ties",
              "dare_ties": "dare_ties", "dare_linear": "dare"}
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template"}
GLOBAL_PARAMS = {"normalize", "lambda", "int8_mask", "weight", "density", "rescale"}


@dataclass
class MergekitPlan:
    method: str
    base: str
    models: list[str]
    weights: list[float]
    params: dict = field(default_factory=dict)
    out_dtype: str | None = None


def _scalar(value, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SafeMergeError(f"{path}: {where}: only scalar values are supported (got {value!r}; "
                             "per-layer gradients are not)")
    return float(value)


def load_mergekit_config(path: str | Path) -> MergekitPlan:
    path = Path(path).expanduser()
    cfg = read_yaml_mapping(path)
    for key in cfg:
        if key not in TOP_KEYS:
            raise SafeMergeError(f"{path}: {key}: unsupported mergekit key (supported: {', '.join(sorted(TOP_KEYS))})")
    mk = cfg.get("merge_method")
    if mk not in METHOD_MAP:
        raise SafeMergeError(f"{path}: merge_method: '{mk}' is not one safemerge shares with mergekit "
                             f"({', '.join(METHOD_MAP)})")
    method = METHOD_MAP[mk]
    gp = cfg.get("parameters") or {}
    for key in gp:
        if key not in GLOBAL_PARAMS:
            raise SafeMergeError(f"{path}: parameters.{key}: unsupported parameter")
    entries = cfg.get("models") or []
    if not entries:
        raise SafeMergeError(f"{path}: models: no models given")
    base = cfg.get("base_model")
    models, weights, densities = [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "model" not in e:
            raise SafeMergeError(f"{path}: models.{i}: expected a mapping with a 'model' key")
        p = e.get("parameters") or {}
        for key in p:
            if key not in ("weight", "density"):
                raise SafeMergeError(f"{path}: models.{i}.parameters.{key}: unsupported parameter")
        if base is not None and str(e["model"]) == str(base):
            continue  # mergekit lets the base appear among the models; its task vector is zero
        models.append(str(e["model"]))
        weights.append(_scalar(p.get("weight", gp.get("weight", 1.0)), f"models.{i}.parameters.weight", path))
        densities.append(_scalar(p.get("density", gp.get("density", 1.0)), f"models.{i}.parameters.density", path))
    params: dict = {}
    if method == "weight_average":
        if len(set(weights)) > 1:
            raise SafeMergeError(f"{path}: linear with unequal weights is not supported (weight_average is unweighted)")
        if base is None:  # mergekit's linear needs no base; the first model serves as the reference
            base = models[0]
    elif base is None:
        raise SafeMergeError(f"{path}: base_model: required for {mk}")
    if method in ("ties", "dare_ties", "dare"):
        if len(set(densities)) > 1:
            raise SafeMergeError(f"{path}: models: per-model densities differ ({sorted(set(densities))}); "
                                 "use one density")
        params["density"] = densities[0]
    if method == "ties":
        params["trim"] = "tensor"
        if gp.get("normalize", True) is not True:
            raise SafeMergeError(f"{path}: parameters.normalize: ties without normalisation is not supported")
    if method in ("dare_ties", "dare") and len(set(weights)) > 1:
        raise SafeMergeError(f"{path}: {mk} with unequal weights is not supported")
    if method == "task_arithmetic" and gp.get("normalize", False):
        total = sum(weights)
        weights = [w / total for w in weights]
    if method != "weight_average":
        params["scaling"] = _scalar(gp.get("lambda", 1.0), "parameters.lambda", path)
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise SafeMergeError(f"{path}: dtype: '{dtype}' (float32, float16 or bfloat16)")
    rel = path.parent
    resolve = (lambda p: str((rel / p).resolve()) if not Path(p).expanduser().is_absolute() and (rel / p).exists()
               else str(Path(p).expanduser()))
    return MergekitPlan(method, resolve(str(base)), [resolve(m) for m in models], weights, params, dtype)
