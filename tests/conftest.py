"""Shared fixtures: a tiny GQA Llama built from a config, an in-memory byte-level tokenizer, and a
hashing embedder, so the fast suite needs no files and no network. Expensive objects are built once per
session and deep-copied per test (sentence-transformers' habit)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_tiny_tokenizer():
    """Byte-level BPE with no merges: every byte is a token, plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_model(vocab_size: int, *, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=vocab_size - 3,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg)


def make_tiny_gpt2_bank(n_positions: int):
    """A bank on a seeded 2-layer GPT-2 over the tiny tokenizer with a short learned position table (its limit is
    what the position tests cut to), and the hashing embedder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from promptbank import PromptBank
    from promptbank.backbone import from_model
    from promptbank.embed import HashingEmbedder

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=n_positions, initializer_range=0.3
    )
    return PromptBank(from_model(GPT2LMHeadModel(cfg), tok, name="tiny-gpt2"), HashingEmbedder(64))


def make_tiny_bert(name: str = "tiny-bert"):
    """A 3-layer BertModel over the tiny tokenizer, seeded (for encoder-backbone tests), as a Backbone."""
    from transformers import BertConfig, BertModel

    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    return from_model(BertModel(cfg), tok, name=name)


@pytest.fixture(scope="session")
def _tiny_backbone_proto():
    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    return from_model(make_tiny_model(len(tok)), tok, name="tiny-llama-gqa")


@pytest.fixture
def tiny_backbone(_tiny_backbone_proto):
    return copy.deepcopy(_tiny_backbone_proto)


@pytest.fixture
def hashing_embedder():
    from promptbank.embed import HashingEmbedder

    return HashingEmbedder(dim=128)


@pytest.fixture
def tiny_bank(tiny_backbone, hashing_embedder):
    from promptbank import PromptBank

    return PromptBank(tiny_backbone, hashing_embedder)


@pytest.fixture(scope="session")
def _encoder_proto():
    return make_tiny_bert()


@pytest.fixture
def enc_bank(_encoder_proto, hashing_embedder):
    """A bank on a fresh copy of the tiny BERT encoder, with the hashing embedder."""
    from promptbank import PromptBank

    return PromptBank(copy.deepcopy(_encoder_proto), hashing_embedder)


def fast_options(**kw):
    """Training options small enough for the tiny model: a few steps, no progress bar."""
    opts = {"max_steps": 6, "batch_size": 4, "eval_every": 3, "progress": False}
    opts.update(kw)
    return opts
