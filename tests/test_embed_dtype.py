"""SentenceEmbedder(dtype=...): weights loaded in bf16 / fp16, float32 unit rows out, same name; on a tiny
config-built BERT saved as a local folder, and (real_model) on the routing embedder all-MiniLM-L6-v2+mid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptbank.embed import ROUTING_EMBEDDER, SentenceEmbedder, _dtype_name

TEXTS = ["the weather is sunny today", "i would like to eat a lemon", "reset my password", "x", "a " * 40]


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory):
    """A 3-layer BERT + byte-level tokenizer as a plain Hugging Face folder (sentence-transformers adds mean
    pooling)."""
    from conftest import make_tiny_bert, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_st") / "model"
    bb = make_tiny_bert()
    bb.model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("mid_layer", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "float16"])
def test_low_precision_weights_give_float32_unit_rows_close_to_fp32(tiny_st_dir, mid_layer, dtype):
    ref = SentenceEmbedder(tiny_st_dir, mid_layer=mid_layer)
    low = SentenceEmbedder(tiny_st_dir, mid_layer=mid_layer, dtype=dtype)
    assert low.name == ref.name  # banks stay compatible: keys are ~identical
    assert low.dim == ref.dim
    want = str(dtype).removeprefix("torch.")
    model = low._load()
    table = model.model.get_input_embeddings().weight  # kept float32, memory-mapped: see the test below
    assert {p.dtype for p in model.parameters() if p is not table} == {getattr(torch, want)}
    assert table.dtype == torch.float32 and model.vocab_mapped
    assert {p.dtype for p in ref._load().parameters()} == {torch.float32}
    a, b = ref.encode(TEXTS), low.encode(TEXTS, batch_size=2)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.99
    assert want in repr(low) and "dtype" not in repr(ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_vocabulary_is_mapped_and_embeds_bit_for_bit_as_a_rounded_table(tiny_st_dir, dtype, monkeypatch):
    """The float32 vocabulary table stays a map of the safetensors file (only looked-up rows become resident), and
    rounding the looked-up rows gives exactly the embeddings of a model holding the whole table rounded."""
    from safetensors.numpy import load_file

    import promptbank.embed as embed

    mapped = SentenceEmbedder(tiny_st_dir, mid_layer=True, dtype=dtype)
    model = mapped._load()
    table = model.model.get_input_embeddings().weight
    stored = load_file(str(tiny_st_dir / "model.safetensors"))
    (key,) = [k for k in stored if k.endswith("word_embeddings.weight")]
    np.testing.assert_array_equal(table.numpy(), stored[key])
    assert not table.requires_grad
    monkeypatch.setattr(embed, "_map_vocabulary", lambda *a: False)
    whole = SentenceEmbedder(tiny_st_dir, mid_layer=True, dtype=dtype)
    assert whole._load().model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    assert not whole._load().vocab_mapped
    np.testing.assert_array_equal(mapped.encode(TEXTS), whole.encode(TEXTS))
    np.testing.assert_array_equal(mapped.encode(TEXTS[:1]), whole.encode(TEXTS[:1]))


def test_vocabulary_is_not_mapped_for_float32_or_without_a_float32_checkpoint(tiny_st_dir, tmp_path):
    import shutil

    assert not SentenceEmbedder(tiny_st_dir)._load().vocab_mapped  # float32 weights are mapped by transformers
    half = tmp_path / "half"
    shutil.copytree(tiny_st_dir, half)
    from transformers import AutoModel

    AutoModel.from_pretrained(half, dtype=torch.bfloat16).save_pretrained(half)  # a bf16 checkpoint: nothing to map
    low = SentenceEmbedder(half, dtype="bfloat16")
    assert not low._load().vocab_mapped
    assert low._load().model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert low.encode(TEXTS).shape[0] == len(TEXTS)


def test_vocabulary_map_refuses_a_checkpoint_cut_short(tiny_st_dir, tmp_path):
    """A header that promises more bytes than the file holds: no map, the in-memory table is kept."""
    import shutil

    from transformers import AutoModel

    from promptbank.embed import _map_vocabulary

    model = AutoModel.from_pretrained(tiny_st_dir, dtype=torch.bfloat16)
    before = model.get_input_embeddings().weight
    cut = tmp_path / "cut"
    shutil.copytree(tiny_st_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    (entry,) = [v for k, v in header.items() if k.endswith("word_embeddings.weight")]
    (cut / "model.safetensors").write_bytes(data[: 8 + size + entry["data_offsets"][0] + 16])  # ends inside the table
    assert not _map_vocabulary(model, str(cut))
    assert model.get_input_embeddings().weight is before
    assert _map_vocabulary(model, str(tiny_st_dir))  # the whole file: mapped
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_dtype_names_and_errors():
    assert _dtype_name(None) == _dtype_name("float32") == _dtype_name(torch.float32) == "float32"
    assert _dtype_name("bf16") == _dtype_name(torch.bfloat16) == "bfloat16"
    assert SentenceEmbedder(ROUTING_EMBEDDER, dtype="bf16").dtype == "bfloat16"  # lazy: nothing loaded
    for bad in ("int8", "float64", 3, torch.int8):
        with pytest.raises(ValueError, match="dtype"):
            SentenceEmbedder(ROUTING_EMBEDDER, dtype=bad)


def test_bank_saved_with_fp32_keys_loads_with_a_bf16_embedder(tiny_st_dir, tiny_backbone, tmp_path):
    from conftest import fast_options

    from promptbank import PromptBank

    rows = [{"text": f"the weather is {w} today", "label": lab} for w, lab in [("sunny", "good"), ("awful", "bad")] * 4]
    rows += [{"text": f"i would like to eat a {f}", "label": "fruit"} for f in ("apple", "lemon", "cherry", "plum")]
    bank = PromptBank(tiny_backbone, SentenceEmbedder(tiny_st_dir, mid_layer=True), routing="knn")
    bank.learn_task("weather", rows[:8], num_virtual_tokens=3, **fast_options(max_steps=1))
    bank.save(tmp_path / "bank")
    loaded = PromptBank.load(
        tmp_path / "bank", backbone=tiny_backbone, embedder=SentenceEmbedder(tiny_st_dir, mid_layer=True, dtype="bf16")
    )
    assert loaded.embedder.dtype == "bfloat16"
    assert loaded.route("the weather is sunny today").task == bank.route("the weather is sunny today").task


@pytest.mark.real_model
def test_routing_embedder_in_bf16_agrees_with_fp32():
    from promptbank.examples import example_path

    def texts(name):
        lines = example_path(name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]

    names = ["ticket_routing", "urgency", "question_topic", "review_sentiment"]
    keys_text = [t for n in names for t in texts(f"{n}_train")]
    queries = [t for n in names for t in texts(f"{n}_test")]
    fp32, bf16 = SentenceEmbedder(ROUTING_EMBEDDER), SentenceEmbedder(ROUTING_EMBEDDER, dtype="bfloat16")
    assert bf16.name == fp32.name == ROUTING_EMBEDDER
    q32, q16 = fp32.encode(queries), bf16.encode(queries)
    assert (q32 * q16).sum(1).min() > 0.9995
    keys = fp32.encode(keys_text)  # a bank's stored keys stay fp32
    assert np.mean((q32 @ keys.T).argmax(1) == (q16 @ keys.T).argmax(1)) >= 0.98
