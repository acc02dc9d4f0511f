"""Shared fixtures: a private cache folder, tiny random encoders saved as HF folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tests never touch the user's cache, except the converted DINOv2 (read-only, slow to rebuild)."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SAFEMERGE_CACHE")
    os.environ["SAFEMERGE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SAFEMERGE_CACHE", None)
    else:
        os.environ["SAFEMERGE_CACHE"] = old


def tiny_dinov2(path: Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=7, image_size=28, layerscale_value=1.0)
    Dinov2Model(cfg).save_pretrained(path)
    return path


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cf", "mn", "good", "bad", "the", "movie", "is", "a",
         "dog", "cat", "runs", "fast", "slow", "very", "not"]


def tiny_tokenizer():
    """A word-level BERT-style tokenizer over `WORDS`, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert(path: Path, seed: int = 0, pooler: bool = False) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    words = WORDS
    fast = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=pooler).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture
def tiny_vision(tmp_path) -> Path:
    return tiny_dinov2(tmp_path / "tiny-dinov2")


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    return tiny_bert(tmp_path / "tiny-bert")
