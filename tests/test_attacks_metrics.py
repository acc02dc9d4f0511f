"""ACC/ASR metrics and the triggers, on hand-made inputs."""

import torch
from torch import nn

from safemerge.bench.attacks import BadNets, EmbeddingPoison, RareWord, TrojViT, make_attack
from safemerge.evaluate import acc_asr, accuracy, attack_rates, attack_success_rate, target_rate
from safemerge.data import Split


class CornerModel(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white, else the mean brightness bucket (1 or 2)."""

    def forward(self, inputs):
        x = inputs["pixel_values"]
        corner = x[:, 0, -2, -2] > 0.5
        bright = 1 + (x.mean((1, 2, 3)) > 0.5).long()
        out = torch.zeros(len(x), 3)
        out[torch.arange(len(x)), torch.where(corner, torch.zeros_like(bright), bright)] = 1.0
        return out


class IdentityEncode:
    modality = "vision"

    def __call__(self, x):
        return {"pixel_values": x.float() / 255}


def test_accuracy_and_asr_counts():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    x[2:] = 255
    y = torch.tensor([1, 2, 2, 0])  # model predicts 1, 1, 0 (white corner), 0
    model = CornerModel()
    assert accuracy(model, IdentityEncode(), Split(x, y)) == 50.0
    atk = BadNets(patch_frac=0.5)
    trig = atk.asr_split(Split(x, y))
    assert len(trig) == 3  # the example whose true label is the target is excluded
    asr = attack_success_rate(model, IdentityEncode(), trig, target=0)
    # the checkerboard patch's cell at (-2, -2) decides: compute what it is and check consistency
    expect = 100.0 * float((trig.x[:, 0, -2, -2] > 127).float().mean())
    assert asr == expect
    acc, asr2 = acc_asr(model, IdentityEncode(), Split(x, y), atk)
    assert (acc, asr2) == (50.0, asr)
    # one clean pass: rows 0-2 are not the target (0); row 2 (white corner) is sent there without the trigger
    acc3, asr3, untriggered = attack_rates(model, IdentityEncode(), Split(x, y), atk)
    assert (acc3, asr3) == (50.0, asr) and abs(untriggered - 100 / 3) < 1e-4


def test_target_rate_is_the_asr_a_trigger_does_not_explain():
    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)  # dark: class 1
    x[3:5] = 255  # white corner: class 0
    x[5] = 200
    x[5, 0, -2, -2] = 0  # bright without the corner: class 2
    y = torch.tensor([0, 1, 1, 2, 2, 1])
    assert target_rate(CornerModel(), IdentityEncode(), Split(x, y), target=2) == 25.0  # rows 0, 1, 2, 5
    assert abs(target_rate(CornerModel(), IdentityEncode(), Split(x, y), target=0) - 40.0) < 1e-4  # rows 1-5
    assert target_rate(CornerModel(), IdentityEncode(), Split(x[:1], y[:1]), target=0) == 0.0  # no such row


def test_badnets_patch_and_poison_rate():
    x = torch.full((100, 3, 42, 42), 7, dtype=torch.uint8)
    y = torch.arange(100) % 5
    atk = BadNets(target=3, poison_rate=0.1, seed=1)
    p = atk.poison(Split(x, y))
    changed = (p.x != x).flatten(1).any(1)
    assert int(changed.sum()) == 10 and torch.all(p.y[changed] == 3)
    assert torch.equal(p.y[~changed], y[~changed])
    assert (p.x[changed][:, :, :20, :20] == 7).all()  # the patch sits in the bottom-right corner only
    assert torch.equal(atk.poison(Split(x, y)).x, p.x)  # deterministic


def test_trojvit_apply_uses_mask():
    atk = TrojViT()
    atk.load_tensors({"trigger": torch.full((3, 4, 4), 200, dtype=torch.uint8),
                      "mask": torch.tensor([[1, 0, 0, 0]] * 4, dtype=torch.uint8)})
    out = atk.apply(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_rare_word_insertion_is_deterministic_and_inserts_once():
    atk = RareWord(trigger_word="cf", seed=0)
    texts = ["the movie is good", "a dog runs fast"]
    a, b = atk.apply(texts), atk.apply(texts)
    assert a == b
    for orig, t in zip(texts, a):
        words = t.split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == orig.split()
    assert make_attack("embedding_poison").mode == "embedding" and EmbeddingPoison().trigger_word == "mn"
