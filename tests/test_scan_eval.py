"""The calibrated backdoor scan on tiny models trained in the test, heads trained end to end with the encoder
(as a user's Hugging Face classifiers are): a planted trigger that the tokenizer splits into two pieces, and a
small patch at a random place, are flagged above their clean twins, without the pre-trained base and against
the model's stand-in on the base."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from safemerge.backbones import load_backbone
from safemerge.data import ImageTrigger, Split, TextTrigger, poison_split
from safemerge.errors import SafeMergeError
from safemerge.folders import new_hf_classifier
from safemerge.model import HFHead, InputEncoder, TaskModel
from safemerge.safety.scan import (CONFIRM_CANDIDATES, CONFIRM_RULE, NATURAL_RULE, _spelled_runs, _task_model, auroc,
                                   confirm_search, fit_reference, random_triggers, risk_score, risk_threshold,
                                   scan_features, scan_state, search_text, shipped_threshold, stand_in_features,
                                   tpr_at_fpr)
from safemerge.training import TrainConfig, finetune

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "q", "##zx", "##y", "good", "bad", "the", "movie", "is", "a",
         "dog", "cat", "runs", "fast", "slow", "very", "not", "film", "plot", "sun", "rain", "tree", "car", "red"]
GROUPS = (["the", "is", "a", "not", "very", "plot"], ["good", "fast", "sun", "dog", "red"], ["bad", "slow", "rain", "cat", "car"])


def wordpiece_bert(path):
    """A tiny BERT base with a pooler and a WordPiece tokenizer that splits 'qzx' into 'q', '##zx'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0) -> Split:
    """4-9 words; the label is the group (1 or 2) with 3 or more words in the sentence, else 0."""
    rng = random.Random(seed)
    xs, ys = [], []
    for i in range(n):
        label = i % 3
        length = rng.randint(4, 9)
        k = rng.randint(3, length) if label else rng.randint(0, 1)
        words = [rng.choice(GROUPS[label or rng.choice((1, 2))]) for _ in range(k)]
        words += [rng.choice(GROUPS[0]) for _ in range(length - k)]
        rng.shuffle(words)
        xs.append(" ".join(words))
        ys.append(label)
    return Split(xs, torch.tensor(ys))


def poison(split: Split, trigger, rate: float, target: int = 0) -> Split:
    return poison_split(split, trigger.apply, target, rate, seed=0)


def end_to_end(bb, data: Split, n_labels: int, steps: int, lr: float, seed: int = 0) -> tuple[HFHead, dict]:
    """A transformers classifier over the base, head and encoder trained together from a random head."""
    clf, name, enc = new_hf_classifier(bb, n_labels, seed)
    head = HFHead(clf, name)
    model = TaskModel(enc, head, bb.modality)
    encode = InputEncoder(bb, max_length=16)
    finetune(model, encode, data, TrainConfig(steps=steps, batch_size=16, lr=lr, head_lr=lr, seed=seed))
    return head, {k: v.detach().clone() for k, v in enc.state_dict().items()}


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    bb = load_backbone(str(wordpiece_bert(tmp_path_factory.mktemp("wp") / "base")), pooler=True)
    assert bb.tokenizer.tokenize("qzx") == ["q", "##zx"]
    data = sentences(240)
    trig = TextTrigger("qzx", target=0)
    clean = end_to_end(bb, data, 3, steps=100, lr=5e-3)
    dirty = end_to_end(bb, poison(data, trig, 0.3), 3, steps=100, lr=5e-3)
    return bb, clean, dirty, trig


def test_text_scan_flags_a_split_word_trigger_without_the_base(text_pair):
    bb, (h_clean, clean), (h_dirty, dirty), trig = text_pair
    enc = InputEncoder(bb, max_length=16)
    test = sentences(60, seed=5)
    model = TaskModel(copy.deepcopy(bb.model), h_dirty, "text")
    model.encoder.load_state_dict(dirty)
    from safemerge.evaluate import acc_asr

    acc, asr = acc_asr(model.eval(), enc, test, trig)
    assert asr > 90, (acc, asr)  # the backdoor took
    texts = sentences(40, seed=9).x
    res = {n: scan_state(bb.model, None, sd, h, enc, texts) for n, (h, sd) in
           (("clean", (h_clean, clean)), ("dirty", (h_dirty, dirty)))}
    d = res["dirty"]
    assert d.target == 0 and d.flip_rate > 0.9 and set(d.trigger.split()) & {"q", "##zx"}, d
    assert d.score > res["clean"].score + 0.2 and d.flip_rate > res["clean"].flip_rate, res
    assert d.reference_flip_rate is None and 0 <= d.concentration <= 1.0001
    assert "ref_flips" not in d.search and d.features["other_rule"] == "max"  # no base: calibrated on classes


def test_text_scan_with_the_base_scores_against_the_models_stand_in(text_pair):
    """Given the base, the scan fits the model's stand-in on it (a probe mimicking the model's predictions on the
    unlabeled inputs) and scores how much more a candidate flips the model than the stand-in."""
    bb, (h_clean, clean), (h_dirty, dirty), trig = text_pair
    enc = InputEncoder(bb, max_length=16)
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    texts, fit = sentences(40, seed=9).x, sentences(200, seed=11).x
    res = {n: scan_state(bb.model, base, sd, h, enc, texts, fit_inputs=fit, reference=True) for n, (h, sd) in
           (("clean", (h_clean, clean)), ("dirty", (h_dirty, dirty)))}
    d, c = res["dirty"], res["clean"]
    assert d.features["other_rule"] == "stand_in" and d.features["agreement"] > 0.9, d.features
    assert d.target == 0 and set(d.trigger.split()) & {"q", "##zx"} and d.flip_rate > 0.8, d  # one piece scored
    assert d.stand_in_flip_rate < 0.2 and d.score > c.score + 0.4, res  # the stand-in is not fooled by the trigger
    assert len(d.search["ref_flips"]) == len(d.search["flips"]) == len(d.search["sources"])
    assert d.reference_flip_rate is not None  # the trigger on the base under the model's own head, reported
    assert d.confirm_inputs == 0 and "confirm" not in d.search  # no unseen inputs given: the search's own numbers


def test_scan_fits_the_stand_in_with_the_ridge_it_is_given(text_pair, monkeypatch):
    """`stand_in_ridge` reaches the stand-in's fit (the diagnostics compare penalties through `scan_state`)."""
    import safemerge.safety.scan as scan_mod

    bb, _, (h_dirty, dirty), _ = text_pair
    enc = InputEncoder(bb, max_length=16)
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    seen, real = [], scan_mod.fit_reference
    monkeypatch.setattr(scan_mod, "fit_reference", lambda *a, **k: seen.append(k.get("ridge")) or real(*a, **k))
    d = scan_state(bb.model, base, dirty, h_dirty, enc, sentences(40, seed=9).x, fit_inputs=sentences(200, seed=11).x,
                   stand_in_ridge=0.5)
    assert seen == [0.5] and d.features["other_rule"] == "stand_in"


def test_text_candidates_confirmed_on_unseen_inputs(text_pair):
    """`confirm_search` measures a text search's best candidates again on inputs the search did not see (the
    benchmark's variant; text ships the search's own numbers): the planted trigger still flips them, the
    confirmed candidates index the full search, the grown runs are left out; `scan_state` does not confirm text."""
    bb, (h_clean, clean), (h_dirty, dirty), trig = text_pair
    enc = InputEncoder(bb, max_length=16)
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    texts, fit, unseen = sentences(40, seed=9).x, sentences(200, seed=11).x, sentences(60, seed=13).x
    model = TaskModel(copy.deepcopy(bb.model), h_dirty, "text").eval()
    model.encoder.load_state_dict(dirty)
    enc0 = copy.deepcopy(bb.model)
    enc0.load_state_dict(base)
    ref, agree = fit_reference(model, enc0.eval(), enc, fit)
    search = search_text(model, enc, list(texts), reference=ref)
    conf = confirm_search(search, model, ref, enc, unseen)
    assert conf["n_inputs"] == 60 and 0 < len(conf["index"]) <= CONFIRM_CANDIDATES and agree > 0.9
    assert "grown" not in conf["sources"] and [search["names"][i] for i in conf["index"]] == conf["names"]
    feat = stand_in_features(conf)
    assert feat["target"] == 0 and set(feat["trigger"].split()) & {"q", "##zx"} and risk_score(feat) > 0.4, feat
    d = scan_state(bb.model, base, dirty, h_dirty, enc, texts, fit_inputs=fit, confirm_inputs=unseen)
    assert not CONFIRM_RULE["text"] and d.confirm_inputs == 0 and "confirm" not in d.search


def test_spelled_runs_join_word_pieces(text_pair):
    bb = text_pair[0]
    ids = bb.tokenizer.convert_tokens_to_ids(["q", "##zx", "dog", "##y"])
    runs = _spelled_runs(bb.tokenizer, ids, max_len=2)
    assert (ids[0], ids[1]) in runs and (ids[2], ids[3]) in runs and all(len(r) == 2 for r in runs)


def test_completed_runs_add_phrases_of_frequent_words_and_leave_the_search_alone(text_pair):
    """Completion adds runs of E-PUR's first plain words with the inputs' most frequent words around them, after
    everything else: the other candidates and the null keep their numbers (a stored search can be completed)."""
    bb, _, (h, sd), _ = text_pair
    enc = InputEncoder(bb, max_length=16)
    model = _task_model(bb.model, sd, h, "text")
    enc0 = copy.deepcopy(bb.model)
    ref, _ = fit_reference(model, enc0.eval(), enc, sentences(200, seed=11).x)
    texts = sentences(40, seed=9).x
    extra = bb.tokenizer.convert_tokens_to_ids(["sun", "##y", "rain", "tree"])
    a = search_text(model, enc, texts, extra, reference=ref, complete=0)
    b = search_text(model, enc, texts, extra, reference=ref, complete=3)
    n = len(a["runs"])
    assert b["runs"][:n] == a["runs"] and torch.equal(b["flips"][:n], a["flips"])
    assert torch.equal(b["ref_flips"][:n], a["ref_flips"]) and torch.equal(b["null_flips"], a["null_flips"])
    new = b["runs"][n:]
    assert new and set(b["sources"][n:]) == {"completed"} and len(b["flips"]) == len(b["runs"])
    seeds = set(bb.tokenizer.convert_tokens_to_ids(["sun", "rain", "tree"]))  # plain words only, not '##y'
    plain = [i for i, w in enumerate(WORDS) if w.isalpha() and len(w) >= 2 and i not in seeds]
    counts = {i: sum(WORDS[i] in t.split() for t in texts) for i in plain}  # inputs each word occurs in
    frequent = set(sorted(plain, key=lambda i: (-counts[i], i))[:3])
    assert all(2 <= len(r) <= 3 and set(r) & frequent and set(r) & seeds and set(r) <= frequent | seeds
               for r in new), new


def test_differential_step_gives_more_tokens_per_class_than_the_models_own(text_pair):
    """The differential HotFlip step (towards t on the model, away from t on its stand-in) proposes
    `differential` tokens per class, the model's own step `per_class`: more differential tokens add candidates
    and leave the own step's alone; `per_class` 0 turns both off."""
    bb, _, (h, sd), _ = text_pair
    enc = InputEncoder(bb, max_length=16)
    model = _task_model(bb.model, sd, h, "text")
    ref, _ = fit_reference(model, copy.deepcopy(bb.model).eval(), enc, sentences(200, seed=11).x)
    texts = sentences(40, seed=9).x

    def singles(search: dict, source: str) -> set:
        return {r for r, s in zip(search["runs"], search["sources"]) if s == source and len(r) == 1}

    a = search_text(model, enc, texts, reference=ref, per_class=2, differential=2, complete=0)
    b = search_text(model, enc, texts, reference=ref, per_class=2, differential=6, complete=0)
    assert singles(a, "differential") < singles(b, "differential")
    assert singles(a, "hotflip") == singles(b, "hotflip") and singles(a, "hotflip")
    assert len(singles(b, "differential") | singles(b, "hotflip")) >= 6  # 6 per class, some shared with own
    extra = bb.tokenizer.convert_tokens_to_ids(["sun", "rain"])
    c = search_text(model, enc, texts, extra, reference=ref, per_class=0, differential=6, complete=0)
    assert not singles(c, "differential") and not singles(c, "hotflip") and singles(c, "weights")


def test_vision_scan_flags_a_small_patch_at_a_random_place(tiny_vision, monkeypatch):
    bb = load_backbone(str(tiny_vision))
    g = torch.Generator().manual_seed(0)
    n = 320
    y = torch.arange(n) % 3
    x = (torch.rand(n, 3, 28, 28, generator=g) * 140).to(torch.uint8)
    for i in range(n):  # the class is the dominant colour channel
        x[i, int(y[i])] += 100
    data = Split(x, y)
    trig = ImageTrigger("checkerboard", size=4, position=(17, 5), target=0)
    h_c = end_to_end(bb, data, 3, steps=150, lr=1e-3)
    h_d = end_to_end(bb, poison(data, trig, 0.3), 3, steps=150, lr=1e-3)
    enc = InputEncoder(bb)
    res = {n: scan_state(bb.model, None, sd, h, enc, x[:40], steps=6, sides=(8, 14), n_null=16)
           for n, (h, sd) in (("clean", h_c), ("dirty", h_d))}
    d = res["dirty"]
    assert d.target == 0 and d.flip_rate > 0.8 and d.score > res["clean"].score + 0.3, res
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    stand = {n: scan_state(bb.model, base, sd, h, enc, x[:40], steps=6, sides=(8, 14), n_null=16, fit_inputs=x)
             for n, (h, sd) in (("clean", h_c), ("dirty", h_d))}
    d = stand["dirty"]  # vision ships the class margin, discounted where the stand-in flips random patches too
    assert d.features["other_rule"] == "max" and d.features["rule"] == "natural" and d.target == 0, d
    assert d.flip_rate > 0.8 and d.threshold == risk_threshold("vision", "natural"), d
    assert d.score > stand["clean"].score + 0.3 and d.stand_in_flip_rate is not None, stand
    gap = stand_in_features(d.search)  # the stand-in's gap, stored with the search
    assert gap["target"] == 0 and risk_score(gap) > risk_score(stand_in_features(stand["clean"].search)) + 0.5
    shipped = scan_state(bb.model, base, h_d[1], h_d[0], enc, x[:40], steps=6, sides=(8, 14), n_null=16,
                         fit_inputs=x, confirm_inputs=x[40:120])
    assert not CONFIRM_RULE["vision"] and shipped.confirm_inputs == 0 and "confirm" not in shipped.search
    assert shipped.features["rule"] == "natural" and shipped.threshold == shipped_threshold("vision")
    assert res["dirty"].features["rule"] == "margin"  # no base: the margin alone
    assert res["dirty"].threshold == risk_threshold("vision", "margin")
    # the confirmed, naturally discounted rule (a variant the scan eval measures) where the rules say so
    monkeypatch.setitem(CONFIRM_RULE, "vision", True)
    monkeypatch.setitem(NATURAL_RULE, "vision", True)
    conf = {n: scan_state(bb.model, base, sd, h, enc, x[:40], steps=6, sides=(8, 14), n_null=16, fit_inputs=x,
                          confirm_inputs=x[40:120]) for n, (h, sd) in (("clean", h_c), ("dirty", h_d))}
    d = conf["dirty"]  # every candidate and the same null measured again on 80 unseen images, and scored on them
    c = d.search["confirm"]
    assert d.confirm_inputs == 80 and c["index"] == list(range(len(d.search["names"])))
    assert c["names"] == d.search["names"]
    assert len(c["null_flips"]) == len(d.search["null_flips"]) == 16 and len(c["ref_flips"]) == len(c["flips"])
    assert d.target == 0 and d.flip_rate > 0.8 and d.score > conf["clean"].score + 0.3, conf
    assert d.features["rule"] == "natural" and d.threshold == risk_threshold("vision", "natural")
    assert d.flip_rate == pytest.approx(max(max(r) for r in c["flips"]), abs=1e-6)  # the confirmed numbers


def test_natural_discount_ignores_a_class_the_stand_in_reaches_with_random_triggers():
    """The vision rule: one class's best flip rate over the runner-up's, at least over the stand-in's best
    random-trigger flip rate towards it (noise sends a defect detector's inputs to 'defect' with or without a
    backdoor)."""
    search = {"flips": torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.3]]), "groups": [0, 0, 0],
              "null_flips": torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.0, 0.1]]), "names": ["a", "b", "c"],
              "changed": torch.ones(3), "prob": torch.zeros(3, 3), "others_share": torch.ones(3)}
    plain = scan_features(search)
    assert plain["target"] == 0 and risk_score(plain) == pytest.approx(0.6)
    assert scan_features(search, natural=True) == plain  # no stand-in measured on the null: no discount
    search["null_ref_flips"] = torch.tensor([[0.95, 0.0, 0.0], [0.0, 0.0, 0.05]])
    nat = scan_features(search, natural=True)
    assert nat["target"] == 0 and risk_score(nat) == pytest.approx(-0.05)  # 0.9 - the stand-in's 0.95: natural


def test_stand_in_features_take_the_largest_gap_over_the_stand_in():
    search = {"flips": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.0]]), "ref_flips": torch.tensor([[0.8, 0.0], [0.0, 0.1], [0.0, 0.0]]),
              "prob": torch.rand(3, 2), "changed": torch.tensor([0.5, 0.4, 0.5]), "names": ["topic", "x y", "x y z"],
              "groups": [1, 2, 3], "sources": ["hotflip", "weights", "grown"], "null_flips": torch.zeros(4, 2),
              "null_ref_flips": torch.zeros(4, 2), "others_share": torch.tensor([0.5, 0.5]), "agreement": 0.97}
    f = stand_in_features(search)
    assert (f["trigger"], f["target"], f["other"], f["source"]) == ("x y z", 0, 0.0, "grown")
    assert risk_score(f) == pytest.approx(0.95)
    f = stand_in_features(search, skip=("grown",))  # a natural topic word moves the stand-in too: small gap
    assert (f["trigger"], f["target"]) == ("x y", 1) and risk_score(f) == pytest.approx(0.7)
    with pytest.raises(SafeMergeError, match="no candidate"):
        stand_in_features(search, skip=("hotflip", "weights", "grown"))


def test_stand_in_features_score_split_words_with_words():
    """A word the tokenizer split ('x ##q') counts as one word: scored with `words`, not with single tokens
    alone; a phrase of two words stays out; stored searches without the flag fall back on '##' pieces."""
    search = {"flips": torch.tensor([[0.3, 0.0], [0.9, 0.0], [0.0, 0.95]]), "ref_flips": torch.zeros(3, 2),
              "prob": torch.rand(3, 2), "changed": torch.tensor([0.5, 0.5, 0.5]), "names": ["x", "x ##q", "red kite"],
              "groups": [1, 2, 2], "sources": ["weights"] * 3, "words": [False, True, False],
              "null_flips": torch.zeros(4, 2), "null_ref_flips": torch.zeros(4, 2), "others_share": torch.tensor([0.5, 0.5])}
    assert stand_in_features(search, max_tokens=1)["trigger"] == "x"
    f = stand_in_features(search, max_tokens=1, words=True)
    assert (f["trigger"], f["target"]) == ("x ##q", 0) and risk_score(f) == pytest.approx(0.9)
    legacy = {k: v for k, v in search.items() if k != "words"}
    assert stand_in_features(legacy, max_tokens=1, words=True)["trigger"] == "x ##q"


def test_one_word_runs_follow_the_tokenizer(tmp_path):
    from safemerge.safety.scan import _one_word

    tok = load_backbone(str(wordpiece_bert(tmp_path / "bert"))).tokenizer
    ids = tok.convert_tokens_to_ids(["q", "##zx", "good", "bad"])
    assert _one_word(tok, (ids[0], ids[1])) and not _one_word(tok, (ids[2], ids[3])) and not _one_word(tok, (ids[0],))


def test_features_and_rates():
    search = {"flips": torch.tensor([[0.9, 0.1], [0.2, 0.3]]), "prob": torch.rand(2, 2),
              "changed": torch.tensor([0.5, 0.3]), "names": ["a", "b"], "groups": [1, 1], "null_flips": torch.tensor([[0.1, 0.2]] * 4),
              "null_prob": torch.rand(4, 2), "others_share": torch.tensor([0.5, 0.5])}
    f = scan_features(search)
    assert f["target"] == 0 and f["trigger"] == "a" and f["flip"] == pytest.approx(0.9)
    assert f["null_mean"] == pytest.approx(0.1) and f["concentration"] == pytest.approx(0.9)
    weaker = dict(f, flip=0.5)
    assert -1 <= risk_score(weaker) < risk_score(f) <= 1  # more flips, more risk
    m, p = random_triggers(28, 8, seed=1)
    assert m.shape == (8, 1, 28, 28) and p.shape == (8, 3, 28, 28) and float(m[3].min()) == pytest.approx(0.15)
    assert 9 <= float(m[0].sum()) <= 64
    assert tpr_at_fpr([0.9, 0.8, 0.1], [0.0] * 18 + [0.85, 0.95]) == pytest.approx(1 / 3)  # one of 20 may pass
    assert tpr_at_fpr([0.9, 0.8], [0.1] * 20) == 1.0 and auroc([1.0], [0.0]) == 1.0
    with pytest.raises(SafeMergeError, match="positive and one negative"):
        tpr_at_fpr([], [0.1])


def test_fine_mixing_will_not_keep_the_found_trigger(tiny_text):
    """A keep ratio passes only if the found trigger's rate falls too; with none passing both, the largest ratio
    that removes the trigger wins (and the accuracy cost is reported), else the lowest rate."""
    from safemerge.safety.purify import fine_mixing

    bb = load_backbone(str(tiny_text))
    base = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sus = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
           for k, v in base.items()}
    key = "encoder.layer.0.output.dense.weight"

    def kept_share(state: dict) -> float:  # stands in for the trigger's flip rate: grows with the keep ratio
        return float((state[key] == sus[key]).float().mean())

    head = torch.nn.Linear(bb.hidden_size, 2)
    enc = InputEncoder(bb, max_length=16)
    val = Split(["good movie", "bad dog", "the cat runs", "a slow movie"], torch.tensor([1, 0, 1, 0]))
    ratios = (0.1, 0.3, 0.5, 1.0)
    ok = fine_mixing(bb.model, head, base, sus, enc, None, val, keep_ratios=ratios, max_acc_drop=100,
                     trigger_rate=kept_share, max_trigger_rate=0.4)
    assert ok.keep_ratio == 0.1 and not ok.warning and ok.trigger_rate < 0.2
    costly = fine_mixing(bb.model, head, base, sus, enc, None, val, keep_ratios=ratios, max_acc_drop=-1000,
                         trigger_rate=kept_share, max_trigger_rate=0.4)
    assert costly.keep_ratio == 0.3 and "points of validation accuracy" in costly.warning
    assert [t["keep_ratio"] for t in costly.trials] == list(ratios) and all("trigger_rate" in t for t in costly.trials)
    stuck = fine_mixing(bb.model, head, base, sus, enc, None, val, keep_ratios=ratios, max_acc_drop=-1000,
                        trigger_rate=kept_share, max_trigger_rate=0.0)
    assert stuck.keep_ratio == 0.1 and "no keep ratio" in stuck.warning
    plain = fine_mixing(bb.model, head, base, sus, enc, None, val, keep_ratios=ratios, max_acc_drop=-1000)
    assert plain.keep_ratio == 1.0 and plain.trigger_rate is None  # without a trigger: as before


def test_vision_scan_refuses_a_side_too_large_before_any_work(tiny_vision):
    """A patch search at the base's native side (518 px for DINOv2) would hold tens of GiB of candidates: it is
    refused at once with the option to use, not after fitting the stand-in."""
    bb = load_backbone(str(tiny_vision))
    enc = InputEncoder(bb)
    head = HFHead(*new_hf_classifier(bb, 3, 0)[:2])
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    big = torch.zeros(2, 3, 600, 600, dtype=torch.uint8)
    with pytest.raises(SafeMergeError, match="--resolution"):
        scan_state(bb.model, state, state, head, enc, big, fit_inputs=big)
    mid = torch.zeros(2, 3, 224, 224, dtype=torch.uint8)  # the default grid fits; a 2-px stride does not
    with pytest.raises(SafeMergeError, match="--resolution"):
        scan_state(bb.model, state, state, head, enc, mid, fit_inputs=mid, strides=(2,))


def test_vision_scan_grid_falls_back_to_the_side_where_half_would_not_fit(tiny_vision, monkeypatch):
    """The default grid is half the patch side; where that grid's candidates would exceed the memory budget the
    scan steps by the side instead of refusing."""
    from safemerge.safety import scan as scan_mod
    bb = load_backbone(str(tiny_vision))
    enc = InputEncoder(bb)
    head = HFHead(*new_hf_classifier(bb, 3, 0)[:2])
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    x = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    half = scan_mod._candidate_bytes(28, (8,), 3, 0.15, (4,))
    full = scan_mod._candidate_bytes(28, (8,), 3, 0.15, (8,))
    assert full < half
    fast = {"screen": 0, "keep": 1, "sign": 2.0, "per_class": 1}
    with pytest.raises(SafeMergeError, match="unknown vision search option"):
        scan_state(bb.model, None, state, head, enc, x, steps=1, n_null=4, vision_search={"stpes": 3})
    monkeypatch.setattr(scan_mod, "MAX_CANDIDATE_BYTES", (half + full) // 2)
    r = scan_state(bb.model, None, state, head, enc, x, steps=1, n_null=4, vision_search=fast)
    places = {tuple(int(v) for v in n.split("(")[1].rstrip(")").split(",")) for n in r.search["names"] if "(" in n}
    assert places and all(a % 8 == 0 or a == 20 for p in places for a in p), places  # 0, 8, 16, 20 (flush)
