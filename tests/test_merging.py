"""Every data-free merge method against a hand-computed expectation."""

import pytest
import torch

from safemerge.errors import SafeMergeError
from safemerge.merging.methods import merge, method_params

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0]), "ids": torch.tensor([3, 4])}
M1 = {"w": torch.tensor([2.0, 1.0, 0.5, 1.0]), "b": torch.tensor([1.0, -1.0]), "ids": torch.tensor([3, 4])}
M2 = {"w": torch.tensor([0.0, 1.5, 0.8, 3.0]), "b": torch.tensor([1.0, 2.0]), "ids": torch.tensor([3, 4])}
# task vectors: t1 = w [1, 0, -0.5, 0], b [1, -1];  t2 = w [-1, 0.5, -0.2, 2], b [1, 2]


def test_weight_average():
    out = merge("weight_average", BASE, [M1, M2])
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.25, 0.65, 2.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 0.5]))
    assert torch.equal(out["ids"], BASE["ids"])  # integer buffers are not averaged


def test_task_arithmetic():
    out = merge("task_arithmetic", BASE, [M1, M2], scaling=0.5)
    # sum of task vectors: w [0, 0.5, -0.7, 2], b [2, 1]
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.25, 0.65, 2.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 0.5]))


def test_ties_global_trim():
    # 6 entries per task vector; density 0.5 keeps the 3 largest magnitudes of the WHOLE vector.
    # t1 |.| = w [1, 0, .5, 0], b [1, 1] -> keeps w0, b0, b1      -> w [1, 0, 0, 0], b [1, -1]
    # t2 |.| = w [1, .5, .2, 2], b [1, 2] -> keeps w3, b1 and one of the ties at 1 (w0, b0): both kept (>=)
    out = merge("ties", BASE, [M1, M2], density=0.5, scaling=1.0)
    # t2 trimmed: w [-1, 0, 0, 2], b [1, 2]
    # w0: +1 and -1 -> sum 0 -> sign 0 -> nothing agrees -> 0;  w3: only t2 -> 2
    # b0: 1, 1 -> 1;  b1: -1, 2 -> sign + -> only t2 -> 2
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.0, 1.0, 3.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 2.0]))


def test_ties_tensor_trim_differs_from_global():
    # per tensor, density 0.5: t1 w keeps [1, _, -.5, _]; t1 b keeps both (2 * .5 = 1 -> ties at 1 kept)
    out = merge("ties", BASE, [M1, M2], density=0.5, scaling=1.0, trim="tensor")
    # t1 w trimmed [1, 0, -0.5, 0]; t2 w trimmed [-1, 0, 0, 2]
    # w0: sum 0 -> 0; w2: only t1 -> -0.5; w3: 2
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.0, 0.5, 3.0]))


def test_ties_disjoint_mean_averages_agreeing_entries():
    m3 = {"w": torch.tensor([4.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0]), "ids": BASE["ids"]}
    out = merge("ties", BASE, [M1, m3], density=1.0, scaling=1.0)
    # w0: t1 = 1, t3 = 3 -> agree -> mean 2
    assert out["w"][0].item() == pytest.approx(3.0)


def test_dare_with_full_density_is_task_arithmetic():
    a = merge("dare", BASE, [M1, M2], density=1.0, scaling=0.3)
    b = merge("task_arithmetic", BASE, [M1, M2], scaling=0.3)
    assert torch.allclose(a["w"], b["w"]) and torch.allclose(a["b"], b["b"])


def test_dare_drops_and_rescales():
    base = {"w": torch.zeros(20000)}
    model = {"w": torch.ones(20000)}
    out = merge("dare", base, [model], density=0.25, scaling=1.0, seed=3)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 4.0))  # 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = merge("dare", base, [model], density=0.25, scaling=1.0, seed=3)["w"]
    assert torch.equal(out, again)  # deterministic under its seed


def test_dare_ties_full_density_is_ties_without_trim():
    a = merge("dare_ties", BASE, [M1, M2], density=1.0, scaling=1.0)
    b = merge("ties", BASE, [M1, M2], density=1.0, scaling=1.0)
    assert torch.allclose(a["w"], b["w"]) and torch.allclose(a["b"], b["b"])


def test_unknown_method_and_parameter_are_one_line_errors():
    with pytest.raises(SafeMergeError, match="unknown merge method 'tie'"):
        merge("tie", BASE, [M1])
    with pytest.raises(SafeMergeError, match="no parameter 'lambda'"):
        merge("task_arithmetic", BASE, [M1], **{"lambda": 0.3})
    assert method_params("ties") == {"density": 0.2, "scaling": 1.0, "trim": "global"}
