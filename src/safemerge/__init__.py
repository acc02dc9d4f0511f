"""safemerge: merge fine-tuned models safely.

    from safemerge import merge, load_backbone, Zoo, run_suite
    merged = merge("ties", base_state, [sd1, sd2], density=0.2, scaling=1.0)
    merged, info = run_pool_method("dam", Pool(encoder, base_state, [sd1, sd2], heads, test_inputs, train_inputs,
                                               encode), lambda_adv=0.1)

Names are imported on first use, so `import safemerge.<module>` (the CLI, a streaming merge) does not load
transformers and the benchmark suites.
"""

from importlib import import_module

_NAMES = {
    "evaluate_folder": ".api", "load_model_ref": ".api", "merge_models": ".api", "protect_model": ".api",
    "ATTACKS": ".bench.attacks", "make_attack": ".bench.attacks", "load_backbone": ".backbones",
    "SUITES": ".bench.suites", "run_suite": ".bench.suites", "MergeConfig": ".config", "SafeMergeError": ".errors",
    "acc_asr": ".evaluate", "METHODS": ".merging.methods", "merge": ".merging.methods",
    "POOL_METHODS": ".merging.pool", "Pool": ".merging.pool", "run_pool_method": ".merging.pool",
    "protect_state": ".safety.protect", "undo_protection": ".safety.protect", "Zoo": ".bench.zoo",
}
__all__ = ["ATTACKS", "METHODS", "POOL_METHODS", "Pool", "SUITES", "MergeConfig", "SafeMergeError", "Zoo", "acc_asr",
           "evaluate_folder", "load_backbone", "load_model_ref", "make_attack", "merge", "merge_models",
           "protect_model", "protect_state", "run_pool_method", "run_suite", "undo_protection"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(import_module(_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safemerge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
