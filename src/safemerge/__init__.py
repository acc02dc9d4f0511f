"""safemerge: merge fine-tuned models safely.

    from safemerge import MergeConfig, merge_models, evaluate_folder
    merge_models(MergeConfig(base_model="base/", models=[{"path": "a/", "data": "a.jsonl"},
                                                         {"path": "b/", "data": "b.jsonl"}],
                             method="dam", output="out/merged"))
    evaluate_folder("out/merged/a", data="a_test.jsonl", trigger="word:cf")

Names are imported on first use, so `import safemerge` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "evaluate_folder": "api", "export_model": "api", "load_model_ref": "api", "merge_models": "api",
    "protect_model": "api", "purify_model": "api", "scan_models": "api",
    "MergeConfig": "config", "SafeMergeError": "errors", "load_backbone": "backbones",
    "load_task_folder": "folders", "save_task_folder": "folders", "TaskFolder": "folders",
    "load_data": "data", "parse_trigger": "data", "acc_asr": "evaluate",
    "METHODS": "merging.methods", "merge": "merging.methods",
    "POOL_METHODS": "merging.pool", "Pool": "merging.pool", "run_pool_method": "merging.pool",
    "protect_state": "safety.protect", "undo_protection": "safety.protect",
    "ATTACKS": "bench.attacks", "make_attack": "bench.attacks", "SUITES": "bench.suites", "run_suite": "bench.suites",
    "Zoo": "bench.zoo",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safemerge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
