"""Shared by benchmarks/streaming.py and benchmarks/mergekit_parity.py: Llama-shaped random checkpoints (a
base and fine-tunes = base + small noise, bf16, sharded like a hub checkpoint), mergekit configs, and output
comparisons (max abs difference, within bf16 rounding, statistics for random methods)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from safemerge.io import Checkpoint

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4)
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2)
# every method safemerge shares with mergekit, with the mergekit parameters used to compare them
RANDOM = {"dare_ties", "dare_linear", "della"}
METHODS = {
    "linear": {"parameters": {}, "model": {"weight": [1.0, 0.5, 2.0]}, "base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.3}, "model": {"weight": [1.0, 0.5, 2.0]}},
    "ties": {"parameters": {"normalize": True, "lambda": 1.0}, "model": {"weight": [1.0, 0.5, 2.0],
                                                                       "density": [0.2, 0.3, 0.2]}},
    "dare_ties": {"parameters": {"normalize": True, "lambda": 1.0}, "model": {"weight": [1.0, 1.0, 1.0],
                                                                            "density": [0.5, 0.5, 0.5]}},
    "dare_linear": {"parameters": {"lambda": 0.5}, "model": {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}},
    "breadcrumbs": {"parameters": {"lambda": 0.5, "gamma": 0.02}, "model": {"weight": [1.0, 0.5, 1.0],
                                                                          "density": [0.8, 0.9, 0.8]}},
    "breadcrumbs_ties": {"parameters": {"lambda": 0.5, "gamma": 0.02}, "model": {"weight": [1.0, 1.0, 1.0],
                                                                               "density": [0.8, 0.8, 0.8]}},
    "della": {"parameters": {"lambda": 1.0, "epsilon": 0.1}, "model": {"weight": [1.0, 1.0, 1.0],
                                                                      "density": [0.5, 0.5, 0.5]}},
    "slerp": {"parameters": {"t": 0.3}, "model": {}, "models": 1},
    "model_stock": {"parameters": {}, "model": {}},
}


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)})
    return shapes


def n_params(dims: dict) -> int:
    return sum(math.prod(s) for s in llama_shapes(dims).values())


def write_checkpoint(folder: Path, dims: dict, seed: int, base: Path | None, shard_bytes: int = 1 << 30,
                     noise: float = 0.002, dtype: torch.dtype = torch.bfloat16) -> None:
    """A sharded HF folder (bf16 by default); a fine-tune = base + `noise` * N(0, 1) (read shard by shard)."""
    shapes = llama_shapes(dims)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base_ck = Checkpoint(base) if base else None
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        if base_ck is None:
            t = (torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)).to(dtype)
        else:
            b = base_ck[name].float()
            t = (b + noise * torch.randn(shape, generator=g)).to(dtype)
        cur[name] = t
        size += t.numel() * t.itemsize
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, folder / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in sd})
    total = sum(math.prod(s) * dtype.itemsize for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wm}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": str(dtype).split(".")[-1],
           "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False, **dims}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def make_checkpoints(work: Path, dims: dict, n_models: int = 3, dtype: torch.dtype = torch.bfloat16) -> None:
    """base + ft1..ftN under `work` (kept if already there with the same dims)."""
    stamp = work / "dims.json"
    want = {**dims, "models": n_models, "dtype": str(dtype)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    write_checkpoint(work / "base", dims, 0, None, dtype=dtype)
    for i in range(1, n_models + 1):
        write_checkpoint(work / f"ft{i}", dims, i, work / "base", dtype=dtype)
    stamp.write_text(json.dumps(want))


def mergekit_config(method: str, work: Path, out_dtype: str = "bfloat16") -> dict:
    """The mergekit YAML (as a dict) of `method` over work/base and work/ft1..3."""
    spec = METHODS[method]
    n = spec.get("models", 3)
    models = []
    if method == "slerp":
        models.append({"model": str(work / "base")})
    for i in range(n):
        params = {k: v[i] for k, v in spec["model"].items()}
        models.append({"model": str(work / f"ft{i + 1}"), **({"parameters": params} if params else {})})
    cfg = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": out_dtype}
    if spec.get("base", True):
        cfg["base_model"] = str(work / "base")
    if spec["parameters"]:
        cfg["parameters"] = spec["parameters"]
    return cfg


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step at |x| (8 significant bits)."""
    _, e = torch.frexp(x.abs().clamp_min(1e-30))
    return torch.ldexp(torch.ones_like(x), (e - 8).to(torch.int32))


NOISE_FLOOR = 1e-6  # float32 noise where a result cancels to near zero (a bf16 step at the weights' scale: ~1e-4)


def compare(a: Path, b: Path) -> dict:
    """Deterministic methods: max abs difference, and whether every entry is within one bf16 rounding step
    (of the larger of the two values, or NOISE_FLOOR absolute)."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    worst, worst_name, n_diff, beyond, total = 0.0, None, 0, 0, 0
    for name in ca.names():
        x, y = ca[name].float(), cb[name].float()
        d = (x - y).abs()
        m = float(d.max()) if d.numel() else 0.0
        n_diff += m > 0
        beyond += int((d > _bf16_ulp(torch.maximum(x.abs(), y.abs())).clamp_min(NOISE_FLOOR)).sum())
        total += d.numel()
        if m > worst:
            worst, worst_name = m, name
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "tensors_differing": n_diff,
            "tensors": len(ca.names()), "entries_beyond_bf16_rounding": beyond, "entries": total,
            "within_bf16_rounding": beyond == 0}


def random_stats(a: Path, b: Path, base: Path) -> dict:
    """Random methods (their masks differ by RNG): statistics of the merged update theta - theta_0 of each."""
    ca, cb, c0 = Checkpoint(a), Checkpoint(b), Checkpoint(base)
    acc = {k: 0.0 for k in ("kept_a", "kept_b", "l2_a", "l2_b", "l1_a", "l1_b", "dot", "n")}
    for name in ca.names():
        t0 = c0[name].float()
        da, db = ca[name].float() - t0, cb[name].float() - t0
        acc["kept_a"] += int((da != 0).sum())
        acc["kept_b"] += int((db != 0).sum())
        acc["l2_a"] += float((da * da).sum())
        acc["l2_b"] += float((db * db).sum())
        acc["l1_a"] += float(da.abs().sum())
        acc["l1_b"] += float(db.abs().sum())
        acc["dot"] += float((da * db).sum())
        acc["n"] += da.numel()
    n = acc["n"]
    return {"share_changed_safemerge": round(acc["kept_a"] / n, 4), "share_changed_mergekit": round(acc["kept_b"] / n, 4),
            "mean_abs_update_ratio": round(acc["l1_a"] / max(acc["l1_b"], 1e-30), 4),
            "l2_update_ratio": round(math.sqrt(acc["l2_a"] / max(acc["l2_b"], 1e-30)), 4),
            "update_cosine": round(acc["dot"] / math.sqrt(max(acc["l2_a"] * acc["l2_b"], 1e-30)), 4)}
