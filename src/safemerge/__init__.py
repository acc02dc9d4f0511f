"""safemerge: merge fine-tuned models safely.

    from safemerge import merge, load_backbone, Zoo, run_suite
    merged = merge("ties", base_state, [sd1, sd2], density=0.2, scaling=1.0)
    merged, info = run_pool_method("dam", Pool(encoder, base_state, [sd1, sd2], heads, test_inputs, train_inputs,
                                               encode), lambda_adv=0.1)
"""

from .api import evaluate_folder, load_model_ref, merge_models, protect_model
from .bench.attacks import ATTACKS, make_attack
from .backbones import load_backbone
from .bench.suites import SUITES, run_suite
from .config import MergeConfig
from .errors import SafeMergeError
from .evaluate import acc_asr
from .merging.methods import METHODS, merge
from .merging.pool import POOL_METHODS, Pool, run_pool_method
from .safety.protect import protect_state, undo_protection
from .bench.zoo import Zoo

__all__ = ["ATTACKS", "METHODS", "POOL_METHODS", "Pool", "SUITES", "MergeConfig", "SafeMergeError", "Zoo", "acc_asr", "evaluate_folder",
           "load_backbone", "load_model_ref", "make_attack", "merge", "merge_models",
           "protect_model", "protect_state", "run_pool_method", "run_suite", "undo_protection"]
__version__ = "0.1.0"
