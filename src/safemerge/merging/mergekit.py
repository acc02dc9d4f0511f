"""Read a mergekit YAML config (the methods both tools share) into a streaming merge, so mergekit users can
switch with the config they have:

    merge_method: ties            # linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
    base_model: ./base            #   breadcrumbs_ties, della, slerp, model_stock
    models:
      - model: ./ft1
        parameters: {weight: 1.0, density: 0.2}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

Mapping: linear -> weight_average (weights, normalize); task_arithmetic, ties (per-tensor trim, as mergekit
trims), dare_ties, breadcrumbs, breadcrumbs_ties, della, slerp, model_stock -> the same names; dare_linear ->
dare. `lambda` is `scaling`; per-model `weight` and `density` stay per model; mergekit's defaults apply where the
YAML is silent (normalize, rescale, lambda 1, density 1). The config is checked against the method's options
in the registry before any file is opened. Differences: `rescale` divides kept entries by their keep
probability (DARE's 1/density, DELLA's 1/p: the papers' rescaling) where mergekit matches each tensor's L1
norm, and the random masks come from safemerge's generator, so DARE and DELLA agree with mergekit in
distribution, not entry by entry. Anything else is refused with one line naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_yaml_mapping
from ..errors import SafeMergeError
from . import registry

METHOD_MAP = {"linear": "weight_average", "task_arithmetic": "task_arithmetic", "ties": "ties",
              "dare_ties": "dare_ties", "dare_linear": "dare", "breadcrumbs": "breadcrumbs",
              "breadcrumbs_ties": "breadcrumbs_ties", "della": "della", "slerp": "slerp", "model_stock": "model_stock"}
# mergekit's defaults where they differ from safemerge's (its GeneralizedTaskArithmeticMerge table)
MERGEKIT_DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "scaling": 1.0},
    "ties": {"normalize": True, "scaling": 1.0, "density": 1.0, "trim": "tensor"},
    "dare_ties": {"normalize": False, "rescale": True, "scaling": 1.0, "density": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "scaling": 1.0, "density": 1.0},
    "breadcrumbs": {"normalize": False, "scaling": 1.0, "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"normalize": False, "scaling": 1.0, "density": 1.0, "gamma": 0.01},
    "della": {"normalize": True, "rescale": True, "scaling": 1.0, "density": 1.0, "epsilon": 0.15},
    "slerp": {},
    "model_stock": {},
}
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template"}
GLOBAL_PARAMS = {"normalize", "lambda", "int8_mask", "weight", "density", "rescale", "gamma", "epsilon", "t",
                 "filter_wise"}
MODEL_PARAMS = {"weight", "density", "gamma", "epsilon"}
RENAME = {"lambda": "scaling"}


@dataclass
class MergekitPlan:
    method: str
    base: str
    models: list[str]
    weights: list[float]
    params: dict = field(default_factory=dict)
    out_dtype: str | None = None


def _scalar(value, where: str, path: Path):
    """A scalar parameter (its type is checked by the method's options); mergekit's per-layer gradients
    (lists) and filters (mappings) are refused."""
    if isinstance(value, (list, dict)):
        raise SafeMergeError(f"{path}: {where}: only scalar values are supported (got {value!r}; "
                             "per-layer gradients and filters are not)")
    return value


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
    if not isinstance(gp, dict):
        raise SafeMergeError(f"{path}: parameters: expected a mapping")
    for key in gp:
        if key not in GLOBAL_PARAMS:
            raise SafeMergeError(f"{path}: parameters.{key}: unsupported parameter")
    entries = cfg.get("models") or []
    if not entries:
        raise SafeMergeError(f"{path}: models: no models given")
    base = cfg.get("base_model")
    models: list[str] = []
    per: dict[str, list] = {k: [] for k in MODEL_PARAMS}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "model" not in e:
            raise SafeMergeError(f"{path}: models.{i}: expected a mapping with a 'model' key")
        p = e.get("parameters") or {}
        for key in p:
            if key not in MODEL_PARAMS:
                raise SafeMergeError(f"{path}: models.{i}.parameters.{key}: unsupported parameter")
        if base is not None and str(e["model"]) == str(base) and mk != "linear":
            continue  # mergekit lets the base appear among the models; it is not merged as a task vector
        models.append(str(e["model"]))
        for key in MODEL_PARAMS:
            if key in p or key in gp:
                per[key].append(_scalar(p.get(key, gp.get(key)), f"models.{i}.parameters.{key}", path))
    params: dict = dict(MERGEKIT_DEFAULTS[mk])
    for key, value in gp.items():
        if key in MODEL_PARAMS or key == "int8_mask":
            continue
        params[RENAME.get(key, key)] = _scalar(value, f"parameters.{key}", path)
    entry_fields = registry.get(method, "merge").options.model_fields
    for key, values in per.items():
        if not values:
            continue
        if len(values) != len(models):
            raise SafeMergeError(f"{path}: models: '{key}' is given for some models only")
        if key in ("weight", "density"):
            params[key] = values if len(set(values)) > 1 else values[0]
        elif len(set(values)) > 1:
            raise SafeMergeError(f"{path}: models: per-model '{key}' values differ ({sorted(set(values))}); use one")
        else:
            params[key] = values[0]
    params = {k: v for k, v in params.items() if k in entry_fields or k in gp or k in per}
    if method == "weight_average" and base is None:
        base = models[0]  # mergekit's linear needs no base; the first model gives names and non-float tensors
    elif base is None:
        raise SafeMergeError(f"{path}: base_model: required for {mk}")
    registry.validate(method, params, "merge", where=str(path))
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise SafeMergeError(f"{path}: dtype: '{dtype}' (float32, float16 or bfloat16)")
    rel = path.parent
    resolve = (lambda p: str((rel / p).resolve()) if not Path(p).expanduser().is_absolute() and (rel / p).exists()
               else str(Path(p).expanduser()))
    weights = params.get("weight", 1.0)
    weights = [float(w) for w in weights] if isinstance(weights, list) else [float(weights)] * len(models)
    from .methods import check_model_count, check_per_model

    entry = registry.get(method, "merge")
    try:
        check_model_count(method, entry.fn, len(models))
        check_per_model(method, registry.validate(method, params, "merge"), len(models))
    except SafeMergeError as e:
        raise SafeMergeError(f"{path}: {e}") from None
    return MergekitPlan(method, resolve(str(base)), [resolve(m) for m in models], weights, params, dtype)
