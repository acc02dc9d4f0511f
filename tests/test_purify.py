"""Fine-mixing, E-PUR and the backdoor scan on tiny random encoders: mixing masks, the planted trigger token,
the fine-tuning step, the scan's ranking of a planted backdoor, the CLI and its one-line errors."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_bert
from safemerge.bench.attacks import make_attack
from safemerge.backbones import fingerprint, load_backbone
from safemerge.io import load_state_dict, save_state_dict
from safemerge.cli import app
from safemerge.errors import SafeMergeError
from safemerge.model import InputEncoder, TaskModel
from safemerge.safety.purify import (FineTuneConfig, clean_subset, e_pur, fine_mixing, mix_states, mixing_mask,
                                     token_frequencies, with_trigger_copies)
from safemerge.safety.scan import (ScanResult, _optimise_patterns, _task_model, auroc, patch_positions, scan_state,
                                   search_vision, stamp_found, trigger_encoder, trigger_flip_rate, vision_flip_rates, vision_triggers)
from safemerge.data import Split
from safemerge.training import TrainConfig, finetune, fit_linear_probe
from safemerge.bench.zoo import Profile
from safemerge.folders import save_model_folder

TINY = Profile("tiny", resolution=28, n_train=256, n_val=32, n_test=96, steps=12, batch_size=32, lr=5e-4,
               head_lr=5e-3, trigger_iters=5, embedding_steps=8)
runner = CliRunner()
GROUP_A = ["good", "dog", "cat", "fast", "very"]
GROUP_B = ["bad", "the", "movie", "is", "a", "runs", "slow", "not"]


def _perturbed(base: dict, seed: int = 0, eps: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + eps * v.std().nan_to_num(0.01) * torch.randn(v.shape, generator=g) if v.is_floating_point()
            else v.clone() for k, v in base.items()}


@pytest.fixture
def text_base(tiny_text):
    bb = load_backbone(str(tiny_text))
    return bb, {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


def _sentences(n: int, seed: int = 0) -> Split:
    """Synthetic 6 to 8-word sentences: label 1 with 4 to 6 words of group A, label 0 with at most one. No
    single inserted word can move a sentence across, so a clean model has no one-token shortcut to either
    class (and, lengths varying, an inserted word is no shortcut either)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for i in range(n):
        label = i % 2
        length = int(torch.randint(6, 9, (1,), generator=g))
        n_a = int(torch.randint(4, 7, (1,), generator=g)) if label else int(torch.randint(0, 2, (1,), generator=g))
        words = [GROUP_A[j] for j in torch.randint(0, len(GROUP_A), (n_a,), generator=g).tolist()]
        words += [GROUP_B[j] for j in torch.randint(0, len(GROUP_B), (length - n_a,), generator=g).tolist()]
        xs.append(" ".join(words[j] for j in torch.randperm(length, generator=g).tolist()))
        ys.append(label)
    return Split(xs, torch.tensor(ys))


# ------------------------------------------------------------------------------------------------ mixing


def test_keep_ratio_one_is_the_suspect_and_zero_the_base(text_base):
    _, base = text_base
    sus = _perturbed(base)
    for mode in ("random", "sel"):
        assert all(torch.equal(mix_states(base, sus, 1.0, mode)[k], sus[k]) for k in sus), mode
        assert all(torch.equal(mix_states(base, sus, 0.0, mode)[k], base[k]) for k in base
                   if base[k].is_floating_point()), mode


def test_random_mixing_keeps_about_rho_and_is_seeded(text_base):
    _, base = text_base
    sus = _perturbed(base)
    m = mixing_mask(base, sus, 0.3, "random", seed=1)
    kept = sum(int(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values())
    assert abs(kept - 0.3) < 0.01
    assert all(torch.equal(m[k], v) for k, v in mixing_mask(base, sus, 0.3, "random", seed=1).items())
    mixed = mix_states(base, sus, 0.3, "random", seed=1)
    for k, mask in m.items():  # each weight is the suspect's or the base's, as the mask says
        assert torch.equal(mixed[k], torch.where(mask, sus[k], base[k]))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_sel_keeps_exactly_the_top_entries(text_base, scope):
    _, base = text_base
    sus = _perturbed(base)
    m = mixing_mask(base, sus, 0.25, "sel", scope=scope)
    groups = [[k] for k in m] if scope == "tensor" else [list(m)]
    for group in groups:
        d = torch.cat([(sus[k] - base[k]).abs().flatten() for k in group])
        keep = torch.cat([m[k].flatten() for k in group])
        assert int(keep.sum()) == round(0.25 * d.numel())
        assert d[keep].min() >= d[~keep].max()


def test_bad_keep_ratio_and_mismatched_models_are_refused(text_base):
    _, base = text_base
    sus = _perturbed(base)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SafeMergeError, match="outside \\[0, 1\\]"):
            mix_states(base, sus, bad)
    k = "embeddings.word_embeddings.weight"
    with pytest.raises(SafeMergeError, match=f"tensor '{k}' has shape"):
        mix_states(base, {**sus, k: sus[k][:5]}, 0.5)
    nan = {**sus, k: sus[k].clone()}
    nan[k][0, 0] = float("nan")
    with pytest.raises(SafeMergeError, match=f"tensor '{k}' contains NaN"):
        mix_states(base, nan, 0.5)


# ------------------------------------------------------------------------------------------------ E-PUR


def test_e_pur_flags_the_planted_trigger_token(text_base):
    bb, base = text_base
    tok = bb.tokenizer
    cf, the = tok.convert_tokens_to_ids("cf"), tok.convert_tokens_to_ids("the")
    sus = _perturbed(base, eps=0.01)
    k = "embeddings.word_embeddings.weight"
    sus[k][cf] += 0.5  # the trigger: a rare token whose embedding moved far
    sus[k][the] += 0.8  # a frequent token that moved farther (fine-tuning does this): not flagged first
    freq = token_frequencies(tok, _sentences(600).x, base[k].shape[0])
    assert freq[cf] == 0 and freq[the] > 20
    res = e_pur(base, sus, freq, top_n=1)
    assert res.ranking[0] == cf and res.rank_of(cf) == 1 and res.flagged == [cf]
    assert torch.equal(res.state[k][cf], base[k][cf])  # reset to the pre-trained row
    rest = torch.ones(base[k].shape[0], dtype=torch.bool)
    rest[cf] = False
    assert torch.equal(res.state[k][rest], sus[k][rest])
    assert all(torch.equal(res.state[n], sus[n]) for n in sus if n != k)
    with pytest.raises(SafeMergeError, match="embedding has"):
        e_pur(base, sus, freq[:-1])
    # the pieces of a trigger the scan found go first (and are reset), the rest keeps its order
    led = e_pur(base, sus, freq, top_n=2, first=[the, the])
    assert led.ranking[:2] == [the, cf] and led.flagged == [the, cf] and len(led.ranking) == len(res.ranking)
    assert torch.equal(led.state[k][the], base[k][the])


# ------------------------------------------------------------------------------------------------ Fine-mixing


def _trained_text_model(bb, data: Split, steps: int = 30, head: nn.Linear | None = None) -> tuple[nn.Linear, dict]:
    """A tiny task model as the zoo makes them: the head a linear probe of the pre-trained encoder (or the
    given `head`), frozen while the encoder is fine-tuned on `data`."""
    torch.manual_seed(0)
    enc = InputEncoder(bb, max_length=16)
    model = TaskModel(copy.deepcopy(bb.model), copy.deepcopy(head) if head else nn.Linear(bb.hidden_size, 2), "text")
    if head is None:
        fit_linear_probe(model, enc, data)
    finetune(model, enc, data, TrainConfig(steps=steps, batch_size=16, lr=3e-3, head_lr=0))
    return model.head, {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


def test_fine_mixing_searches_keep_ratios_in_order(text_base):
    bb, base = text_base
    data = _sentences(96)
    head, sus = _trained_text_model(bb, data, steps=10)
    enc = InputEncoder(bb, max_length=16)
    cfg = FineTuneConfig(epochs=1, batch_size=16, lr=1e-3)
    clean = clean_subset(data, 0.25)
    assert len(clean) == 24 and sorted(clean.y.tolist()) == [0] * 12 + [1] * 12  # stratified
    easy = fine_mixing(bb.model, head, base, sus, enc, clean, data, keep_ratios=(0.5, 0.2, 1.0), max_acc_drop=100,
                       finetune_cfg=cfg)
    assert easy.keep_ratio == 0.2 and [t["keep_ratio"] for t in easy.trials] == [0.2]
    (t,) = easy.trials
    assert easy.finetuned == t["finetuned"] == (t["finetuned_val_acc"] >= t["val_acc"])
    assert easy.val_acc == max(t["finetuned_val_acc"], t["val_acc"])
    wrecked = fine_mixing(bb.model, head, base, sus, enc, clean, data, keep_ratios=(0.2,), max_acc_drop=100,
                          finetune_cfg=FineTuneConfig(epochs=1, batch_size=16, lr=50.0))  # a step that destroys it
    (t,) = wrecked.trials
    assert t["finetuned_val_acc"] < t["val_acc"]  # the step wrecked it: the mix is kept, untouched
    assert not wrecked.finetuned and all(torch.equal(wrecked.state[k], mix_states(base, sus, 0.2)[k]) for k in sus)
    hard = fine_mixing(bb.model, head, base, sus, enc, None, data, keep_ratios=(0.5, 0.2), max_acc_drop=-1000)
    assert hard.keep_ratio == 0.5 and [t["keep_ratio"] for t in hard.trials] == [0.2, 0.5] and not hard.finetuned
    assert all(torch.equal(hard.state[k], mix_states(base, sus, 0.5)[k]) for k in sus)  # no fine-tuning step
    with pytest.raises(SafeMergeError, match="outside \\[0, 1\\]"):
        fine_mixing(bb.model, head, base, sus, enc, clean, data, keep_ratios=(0.5, 2.0))
    with pytest.raises(SafeMergeError, match="clean fraction"):
        clean_subset(data, 0.0)


# ------------------------------------------------------------------------------------------------ scan


def _cf_pair(bb):
    """A clean tiny text model and its backdoored twin ('cf' -> class 0) under one head, with unlabeled texts."""
    data = _sentences(96)
    head, clean = _trained_text_model(bb, data)
    poisoned = make_attack("rare_word", target=0, poison_rate=0.5).poison(data)  # 'cf' -> class 0
    _, backdoored = _trained_text_model(bb, poisoned, head=head)
    return data, head, clean, backdoored, InputEncoder(bb, max_length=16), _sentences(48, seed=1).x


def test_scan_ranks_a_planted_backdoor_above_its_clean_twin(text_base):
    bb, base = text_base
    data, head, clean, backdoored, enc, texts = _cf_pair(bb)
    res = {name: scan_state(bb.model, base, sd, head, enc, texts) for name, sd in
           (("clean", clean), ("backdoored", backdoored))}
    assert "cf" in res["backdoored"].trigger.split() and res["backdoored"].target == 0  # found by HotFlip steps
    assert res["backdoored"].flip_rate > 0.6 and res["backdoored"].score > res["clean"].score + 0.3, res
    assert res["backdoored"].stand_in_flip_rate < 0.3  # the stand-in on the base barely follows the trigger


def test_purification_unlearns_the_trigger_the_scan_found(text_base):
    """With the found trigger put into the clean data (true labels), the fine-tuning step removes a backdoor
    that fine-tuning on clean data alone keeps, and the largest keep ratio that does so is chosen first."""
    bb, base = text_base
    data, head, _, backdoored, enc, texts = _cf_pair(bb)
    found = scan_state(bb.model, base, backdoored, head, enc, texts)
    assert "cf" in found.trigger.split() and found.target == 0  # (a tiny model: not necessarily flagged)
    put = stamp_found(found, ["good dog", "the movie is slow"], bb.tokenizer, seed=3)
    run = list(found.pattern["run"])
    ids = trigger_encoder(found, enc)(put)["input_ids"]
    for row, o in zip(ids.tolist(), ["good dog", "the movie is slow"]):  # the run itself, once, in the text
        plain = enc([o])["input_ids"][0].tolist()
        assert len([t for t in row if t != bb.tokenizer.pad_token_id]) == len(plain) + len(run)
        assert any(row[i:i + len(run)] == run for i in range(len(row)))
    both = with_trigger_copies(data.subset(list(range(4))), lambda x: stamp_found(found, x, bb.tokenizer))
    assert len(both) == 8 and both.y.tolist() == data.y[:4].tolist() * 2 and both.x[:4] == data.x[:4]

    def rate(st):
        return trigger_flip_rate(bb.model, st, head, enc, texts, found)
    assert rate(backdoored) > 0.6
    cfg = FineTuneConfig(epochs=3, batch_size=16, lr=1e-3)
    clean = clean_subset(data, 0.5)
    kept = fine_mixing(bb.model, head, base, backdoored, enc, clean, data, keep_ratios=(1.0,), max_acc_drop=100,
                       finetune_cfg=cfg, trigger_rate=rate)
    unlearned = fine_mixing(bb.model, head, base, backdoored, trigger_encoder(found, enc), clean, data,
                            keep_ratios=(0.2, 1.0),
                            max_acc_drop=100, finetune_cfg=cfg, trigger_rate=rate,
                            unlearn=lambda x: stamp_found(found, x, bb.tokenizer), largest_first=True)
    assert kept.trigger_rate > 0.5 and kept.warning  # clean data alone keeps it, and says so
    assert unlearned.trigger_rate <= 0.2 and not unlearned.warning and unlearned.finetuned
    assert [t["keep_ratio"] for t in unlearned.trials] == [1.0] and unlearned.keep_ratio == 1.0


def test_found_patch_is_stamped_into_uint8_images():
    mask = torch.zeros(1, 6, 6)
    mask[:, 1:3, 2:4] = 1
    pattern = torch.rand(3, 6, 6)
    found = ScanResult(1.0, 1.0, 0.0, 0, "2-px patch at (1, 2)", pattern={"mask": mask, "pattern": pattern})
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    out = stamp_found(found, x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[:, :, 1:3, 2:4], (pattern[:, 1:3, 2:4] * 255).round().to(torch.uint8).expand(5, -1, -1, -1))
    inside = mask.bool().expand(5, 3, 6, 6)
    assert torch.equal(out[~inside], x[~inside])  # the rest of the image untouched
    with pytest.raises(SafeMergeError, match="px"):
        stamp_found(found, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(SafeMergeError, match="tokenizer"):
        stamp_found(ScanResult(1.0, 1.0, 0.0, 0, "cf", pattern={"run": (5,)}), ["a text"])


def test_found_run_goes_in_as_tokens_even_when_no_text_spells_it():
    """A found run that starts with a word-piece continuation ('##raz ##ix') has no spelling that tokenizes
    back to it; the unlearning copies carry exactly its tokens, and texts without the trigger encode as before."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import WORDS

    vocab = {w: i for i, w in enumerate(WORDS + ["k", "r", "i", "x", "##raz", "##ix", "##a", "##z"])}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    enc = InputEncoder(modality="text", tokenizer=tok)
    run = [vocab["##raz"], vocab["##ix"]]
    found = ScanResult(1.0, 1.0, 0.0, 0, "##raz ##ix", pattern={"run": tuple(run)})
    written = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(run)).strip()
    spelled = enc([f"a {written} movie"])["input_ids"][0].tolist()
    assert not any(spelled[i:i + 2] == run for i in range(len(spelled)))  # the text spelling misses it
    texts = ["a good movie", "the dog is very slow"]
    read = trigger_encoder(found, enc)
    ids = read(stamp_found(found, texts, tok, seed=1))["input_ids"].tolist()
    assert all(sum(r[i:i + 2] == run for i in range(len(r))) == 1 for r in ids)
    assert torch.equal(read(texts)["input_ids"], enc(texts)["input_ids"]) and read.modality == "text"


def test_found_blend_is_stamped_into_float_images():
    found = ScanResult(1.0, 1.0, 0.0, 0, "blend 0.2", pattern={"mask": torch.full((1, 4, 4), 0.2),
                                                               "pattern": torch.ones(3, 4, 4)})
    x = torch.rand(3, 3, 4, 4)
    out = stamp_found(found, x)
    assert out.dtype == x.dtype and torch.allclose(out, 0.8 * x + 0.2)


def test_vision_trigger_search_mechanics(tiny_vision):
    bb = load_backbone(str(tiny_vision))
    enc = InputEncoder(bb)
    head = nn.Linear(bb.hidden_size, 4)
    x = torch.randint(0, 256, (24, 3, 28, 28), dtype=torch.uint8)
    sd = bb.model.state_dict()
    assert patch_positions(28, 7, 3)[-1] == (21, 21) and (0, 0) in patch_positions(28, 7, 3)  # corners covered
    masks, patterns, classes = vision_triggers(bb.model, sd, head, enc, x, sides=(7, 14), steps=3)
    assert masks.shape == (8, 1, 28, 28) and patterns.shape == (8, 3, 28, 28)
    assert classes.tolist() == [0, 1, 2, 3] * 2 and 0 <= patterns.min() <= patterns.max() <= 1
    assert masks.flatten(1).sum(1).tolist() == [49.0] * 4 + [196.0] * 4  # one square patch each
    flips = vision_flip_rates(bb.model, sd, head, enc, x, masks, patterns, classes)
    assert flips.shape == (8,) and 0 <= flips.min() <= flips.max() <= 1
    again = vision_triggers(bb.model, sd, head, enc, x, sides=(7, 14), steps=3)
    assert all(torch.equal(u, v) for u, v in zip(again, (masks, patterns, classes)))  # seeded
    res = scan_state(bb.model, None, sd, head, enc, x, steps=2, sides=(7, 14))
    assert -1 <= res.score <= 1 and res.reference_flip_rate is None  # no base needed
    ref = scan_state(bb.model, sd, sd, head, enc, x, steps=2, sides=(7, 14), reference=True)
    # the base against itself: the stand-in is the model (its own head on the base), no gap
    assert ref.flip_rate == ref.reference_flip_rate and ref.features["agreement"] == 1.0
    assert abs(ref.flip_rate - ref.stand_in_flip_rate) < 0.05


def test_vision_search_signed_steps_and_several_places_per_class(tiny_vision):
    """Signed steps move every pattern logit inside the patch by exactly the step size and nothing outside it;
    `per_class` keeps that many places per class and side (the blend, one place, stays one), grouped by side."""
    bb = load_backbone(str(tiny_vision))
    enc = InputEncoder(bb)
    head = nn.Linear(bb.hidden_size, 3)
    x = torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8)
    model = _task_model(bb.model, bb.model.state_dict(), head, "vision")
    mask = torch.zeros(2, 1, 28, 28)
    mask[:, :, 3:10, 5:12] = 1
    start = torch.zeros(2, 3, 28, 28)
    pools = [torch.arange(12)] * 3
    moved, _ = _optimise_patterns(model, enc, x, pools, mask, start, torch.tensor([0, 2]), 1, 0.3,
                                  torch.Generator().manual_seed(0), sign=2.0)
    inside = mask.expand(2, 3, 28, 28).bool()
    assert torch.all(moved[inside].abs() == 2.0) and torch.all(moved[~inside] == 0)
    s = search_vision(model, enc, x, sides=(7, 14), steps=2, screen=0, sign=2.0, per_class=2, n_null=4)
    assert s["groups"] == [0] * 6 + [1] * 6 + [2] * 3 and s["flips"].shape == (15, 3)
    assert s["candidate_classes"].tolist() == [0, 0, 1, 1, 2, 2] * 2 + [0, 1, 2]
    assert len(set(s["names"][:2])) == 2  # two places for class 0


def test_auroc():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5 and auroc([2], [2]) == 0.5


# ------------------------------------------------------------------------------------------------ CLI


def _folder(tmp_path, base_dir, name: str, sd: dict, n_classes: int = 3, task: str = "tweet_sentiment"):
    bb = load_backbone(str(base_dir))
    base = bb.model.state_dict()
    torch.manual_seed(0)
    atk = make_attack("rare_word")
    manifest = {"task": task, "attack": "rare_word", "attack_params": atk.params(), "backbone": bb.name,
                "base_fingerprint": fingerprint(base), "profile": asdict(TINY), "seed": 0}
    return save_model_folder(tmp_path / name, bb, sd, {task: nn.Linear(bb.hidden_size, n_classes)}, manifest, atk)


def _one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert pattern in res.output, res.output


def test_purify_and_scan_cli(text_base, tiny_text, tmp_path):
    bb, base = text_base
    sus = _perturbed(base, eps=0.01)
    k = "embeddings.word_embeddings.weight"
    cf = bb.tokenizer.convert_tokens_to_ids("cf")
    sus[k][cf] += 1.0
    model = _folder(tmp_path, tiny_text, "suspect", sus)
    out = tmp_path / "purified"
    res = runner.invoke(app, ["purify", str(model), "--base", str(tiny_text), "--method", "both", "--clean-fraction",
                              "0.05", "--keep-ratio", "0.1", "--keep-ratio", "1", "--epochs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "safemerge.json").read_text())
    assert m["purified"]["method"] == "both" and m["purified"]["e_pur"]["flagged"][0] == "cf"
    assert m["purified"]["fine_mixing"]["keep_ratio"] in (0.1, 1.0) and m["attack"] == "rare_word"
    fm = m["purified"]["fine_mixing"]  # a trigger is unlearned only when the scan flagged the suspect
    assert (fm["unlearned"] is not None) == m["purified"]["scan"]["before"]["flagged"]
    sc = m["purified"]["scan"]  # the suspect and the purified model were scanned: both scores are reported
    assert -1 <= sc["before"]["score"] <= 1 and -1 <= sc["after"]["score"] <= 1 and "scan risk" in res.output
    pure = load_state_dict(out)
    assert (pure[k][cf] - base[k][cf]).abs().max() < 1e-2  # reset by E-PUR (then only weight decay moved it)
    assert (out / "heads.safetensors").exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    res = runner.invoke(app, ["scan", str(model), str(out), "--base", str(tiny_text), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["model"] for r in rows] == [str(model), str(out)] and all(-1 <= r["score"] <= 1 for r in rows)
    res = runner.invoke(app, ["scan", str(model), "--base", str(tiny_text)])
    assert res.exit_code == 0 and "risk" in res.output, res.output


def test_unlearning_can_teach_the_suspects_own_predictions(text_base, tiny_text, tmp_path):
    """`unlearn_targets="suspect"` (tried on the tuning half, not the default) labels the clean examples and their
    triggered copies with the suspect's predictions; an unknown choice is one clear error and writes nothing."""
    from safemerge.api import purify_model

    bb, base = text_base
    model = _folder(tmp_path, tiny_text, "suspect", _perturbed(base, eps=0.01))
    found = ScanResult(1.0, 1.0, 0.0, 0, "cf", pattern={"run": (bb.tokenizer.convert_tokens_to_ids("cf"),)})
    assert found.flagged
    _, summary = purify_model(str(model), str(tmp_path / "pure"), base=str(tiny_text), found=found, scan=False,
                              keep_ratios=(1.0,), epochs=1, unlearn_targets="suspect")
    assert summary["fine_mixing"]["unlearn_targets"] == "suspect" and summary["fine_mixing"]["unlearned"] == "cf"
    with pytest.raises(SafeMergeError, match="unknown unlearning targets 'magic'"):
        purify_model(str(model), str(tmp_path / "nothing"), base=str(tiny_text), unlearn_targets="magic")
    assert not (tmp_path / "nothing").exists()


def test_purify_and_scan_refuse_bad_inputs(text_base, tiny_text, tiny_vision, tmp_path, monkeypatch):
    bb, base = text_base
    sus = _perturbed(base, eps=0.01)
    model = _folder(tmp_path, tiny_text, "suspect", sus)
    out = tmp_path / "out"
    common = ["--base", str(tiny_text), "--out", str(out)]
    _one_line_error(runner.invoke(app, ["purify", str(model), "--keep-ratio", "1.5", *common]), "outside [0, 1]")
    _one_line_error(runner.invoke(app, ["purify", str(model), "--clean-fraction", "0", *common]), "clean fraction")
    _one_line_error(runner.invoke(app, ["purify", str(model), "--method", "magic", *common]), "unknown purification")
    # a model of another base (same architecture, other weights)
    other = tiny_bert(tmp_path / "other", seed=7)
    _one_line_error(runner.invoke(app, ["purify", str(model), "--base", str(other), "--out", str(out)]),
                    "fine-tuned from another base model")
    _one_line_error(runner.invoke(app, ["scan", str(model), "--base", str(other)]), "fine-tuned from another base")
    # a task head that does not fit the task's data (4 classes for a 3-class task)
    wrong = _folder(tmp_path, tiny_text, "wrong-head", sus, n_classes=4)
    _one_line_error(runner.invoke(app, ["purify", str(wrong), *common]), "head 'tweet_sentiment' has 4 labels; the task has 3 classes")
    _one_line_error(runner.invoke(app, ["scan", str(wrong), "--base", str(tiny_text)]), "task has 3 classes")
    # several models, the second bad: refused before the first is scanned
    import safemerge.safety.scan as scan_module
    from safemerge.api import scan_models

    scanned: list = []
    monkeypatch.setattr(scan_module, "scan_suspect", lambda s, **kw: scanned.append(s))
    with pytest.raises(SafeMergeError, match="task has 3 classes"):
        scan_models([str(model), str(wrong)], str(tiny_text))
    assert scanned == []
    monkeypatch.undo()
    # NaN weights, named
    bad = _folder(tmp_path, tiny_text, "nan", sus)
    sd = load_state_dict(bad)
    sd["encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_state_dict(sd, bad / "model.safetensors")
    _one_line_error(runner.invoke(app, ["purify", str(bad), *common]),
                    "tensor 'encoder.layer.0.output.dense.weight' contains NaN")
    # E-PUR on a vision model; a folder that is not a model
    vb = load_backbone(str(tiny_vision))
    vis = save_model_folder(tmp_path / "vis", vb, vb.model.state_dict(), {"digits": nn.Linear(32, 10)},
                            {"task": "digits", "attack": None, "backbone": vb.name, "profile": asdict(TINY),
                             "base_fingerprint": fingerprint(vb.model.state_dict()), "seed": 0})
    _one_line_error(runner.invoke(app, ["purify", str(vis), "--method", "e-pur", "--base", str(tiny_vision),
                                        "--out", str(out)]), "E-PUR purifies word embeddings")
    _one_line_error(runner.invoke(app, ["scan", str(vis), "--base", str(tiny_vision), "--resolution", "28"]),
                    "--resolution 28 resizes --data")  # not silently ignored on the task's own split
    _one_line_error(runner.invoke(app, ["scan", str(tmp_path)]), "not a model folder")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
