"""Interop and task lifecycle (issue 6): PEFT adapters imported as tasks (PROMPT_TUNING, P_TUNING with MLP and
LSTM encoders) with PeftModel's exact outputs, refusals of what cannot be imported; resuming training from the
stored train state; named prompt variants of a task (learn, compare, promote, remove, save/load, hostile
manifests). Tiny config-built models only, no downloads."""

from __future__ import annotations

import copy
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_options
from safetensors.torch import save_file
from test_bank import ECHO, FRUIT, WEATHER
from test_reliability import _manifest, _reseal

from promptbank import (
    AdapterError,
    BankFormatError,
    DataError,
    PromptBank,
    ResumeError,
    TaskChangedError,
    TaskNotFoundError,
    TrainingDivergedError,
    VariantExistsError,
    VariantNotFoundError,
)
from promptbank.causal import encode_target
from promptbank.inject import forward_hidden, prompt_kv

peft = pytest.importorskip("peft")

RAW = "{input}"  # PEFT feeds the raw text: import with this template to get PeftModel's outputs


# ---------------------------------------------------------------------------------------------- helpers


def _peft_model(base, config, *, seed: int = 1):
    """A PEFT model on a copy of ``base`` whose prompt is non-trivial (random, or a random encoder)."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn_like(emb) * 0.3)
        for name, p in pm.prompt_encoder["default"].named_parameters():
            if "head" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return pm.eval()


def _save_adapter(pm, folder: Path) -> Path:
    pm.save_pretrained(folder, safe_serialization=True)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_model.bin").exists()
    return folder


def _prompt_tuning_config(**kw):
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=kw.pop("num_virtual_tokens", 4), **kw)


def _ptuning_config(encoder: str):
    return peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type=encoder
    )


def _peft_label_scores(pm, tok, text: str, labels: list[str]) -> list[float]:
    """Summed log-likelihood of each label continuation (" label</s>") under ``pm``, the bank's label target."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for lab in labels:
            tgt = encode_target(tok, lab, 64)
            x = torch.tensor([ids + tgt])
            logp = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -x.shape[1] :].log_softmax(-1)
            out.append(float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(tgt))))
    return out


def _our_logits(bank: PromptBank, task: str, text: str) -> torch.Tensor:
    model, tok = bank.backbone.model, bank.backbone.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        hidden, _, _ = forward_hidden(model, torch.tensor([ids]), mask, [bank.prompt_prefix(task)])
        return model.get_output_embeddings()(hidden)[0]


def _peft_logits(pm, tok, text: str) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = pm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0, -len(ids) :]


def _assert_bank_equals_peft(bank: PromptBank, task: str, pm, texts: list[str], labels: list[str]) -> None:
    tok = bank.backbone.tokenizer
    preds = bank.predict(texts, task=task)
    for text, pred in zip(texts, preds):
        torch.testing.assert_close(_our_logits(bank, task, text), _peft_logits(pm, tok, text), atol=1e-4, rtol=1e-4)
        ours = [pred.label_scores[lab] for lab in labels]
        np.testing.assert_allclose(ours, _peft_label_scores(pm, tok, text, labels), atol=1e-4, rtol=1e-5)


def _load(bank: PromptBank, folder: Path) -> PromptBank:
    return PromptBank.load(folder, backbone=bank.backbone, embedder=bank.embedder)


TEXTS = ["the weather is sunny today", "the weather is awful today", "the weather is grey today"]


# ---------------------------------------------------------------------------------------------- PEFT import


@pytest.mark.parametrize(
    "config",
    [_prompt_tuning_config(), _ptuning_config("MLP"), _ptuning_config("LSTM")],
    ids=["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"],
)
def test_imported_peft_adapter_gives_peft_logits_and_label_scores(tiny_bank, tmp_path, config):
    pm = _peft_model(tiny_bank.backbone.model, config)
    folder = _save_adapter(pm, tmp_path / "adapter")
    rec = tiny_bank.import_peft("weather", folder, WEATHER, template=RAW, **fast_options())
    assert rec.method.value == "prompt_tuning" and rec.prompt_config["num_virtual_tokens"] == 4
    assert tiny_bank._tasks["weather"].head is None  # no embedding probe: the adapter's own label scores
    assert rec.labels == ["good", "bad"] and rec.kind == "classification" and rec.steps == 0
    assert rec.imported_from["peft_type"] == config.peft_type.value
    assert (
        rec.imported_from["sha256"]
        == __import__("hashlib").sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert rec.dev_loss is not None and math.isfinite(rec.dev_loss) and 0 <= rec.dev_accuracy <= 1
    # the live PEFT model (P-Tuning: its encoder runs) and the one PEFT loads from the folder
    _assert_bank_equals_peft(tiny_bank, "weather", pm, TEXTS, rec.labels)
    loaded_pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bank.backbone.model), str(folder)).eval()
    _assert_bank_equals_peft(tiny_bank, "weather", loaded_pm, TEXTS[:1], rec.labels)


def test_imported_adapter_with_label_words_scores_the_words(tiny_bank, tmp_path):
    """An adapter trained to write words for the labels: the bank's score of each label is PEFT's of its word."""
    pm = _peft_model(tiny_bank.backbone.model, _prompt_tuning_config())
    folder = _save_adapter(pm, tmp_path / "adapter")
    words = {"good": "nice", "bad": "poor"}
    rec = tiny_bank.import_peft("weather", folder, WEATHER, template=RAW, label_words=words, **fast_options())
    assert rec.labels == ["good", "bad"] and rec.label_words == words
    tok = tiny_bank.backbone.tokenizer
    for text, pred in zip(TEXTS, tiny_bank.predict(TEXTS, task="weather")):
        ours = [pred.label_scores[lab] for lab in rec.labels]
        np.testing.assert_allclose(ours, _peft_label_scores(pm, tok, text, ["nice", "poor"]), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="not among the task's labels"):
        tiny_bank.import_peft("w2", folder, WEATHER, template=RAW, label_words={"ugly": "x"}, **fast_options())
    assert list(tiny_bank.tasks) == ["weather"]


def test_imported_tasks_route_round_trip_and_export_again(tiny_bank, tmp_path):
    base = tiny_bank.backbone.model
    tiny_bank.import_peft(
        "weather", _save_adapter(_peft_model(base, _prompt_tuning_config()), tmp_path / "a"), WEATHER, template=RAW
    )
    pm_fruit = _peft_model(base, _ptuning_config("MLP"), seed=2)
    tiny_bank.import_peft("fruit", _save_adapter(pm_fruit, tmp_path / "b"), FRUIT, template=RAW)
    tiny_bank.learn_task("echo", ECHO, num_virtual_tokens=3, **fast_options())
    assert tiny_bank.route("the weather is lovely today").task == "weather"
    assert tiny_bank.route("i would like to eat a cherry").task == "fruit"
    routed = tiny_bank.predict(["i would like to eat a lemon"])[0]
    assert routed.task == "fruit" and routed.output in ("red", "yellow")

    tiny_bank.save(tmp_path / "bank")
    loaded = _load(tiny_bank, tmp_path / "bank")
    assert loaded.tasks == tiny_bank.tasks  # imported_from and the template included
    texts = ["i would like to eat an apple", "the weather is rainy today"]
    assert [p.label_scores for p in loaded.predict(texts, task=["fruit", "weather"])] == [
        p.label_scores for p in tiny_bank.predict(texts, task=["fruit", "weather"])
    ]
    _assert_bank_equals_peft(loaded, "fruit", pm_fruit, texts[:1], ["red", "yellow"])
    # the bank's own PEFT export of the imported task is the same adapter again
    exported = tmp_path / "bank" / "tasks" / "fruit"
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(exported)).eval()
    torch.testing.assert_close(
        _peft_logits(again, loaded.backbone.tokenizer, texts[0]),
        _peft_logits(pm_fruit, loaded.backbone.tokenizer, texts[0]),
        atol=1e-4,
        rtol=1e-4,
    )


def test_imported_generation_task_and_resume_from_import(tiny_bank, tmp_path):
    pm = _peft_model(tiny_bank.backbone.model, _prompt_tuning_config())
    rec = tiny_bank.import_peft("echo", _save_adapter(pm, tmp_path / "a"), ECHO, template=RAW, **fast_options())
    assert rec.kind == "generation" and rec.labels is None and rec.dev_accuracy is None
    before = tiny_bank.soft_prompt("echo")[0]
    resumed = tiny_bank.resume_task("echo", ECHO, max_steps=4, lr=0.05)
    assert resumed.imported_from == rec.imported_from and resumed.steps == 4
    assert not torch.equal(tiny_bank.soft_prompt("echo")[0], before)
    assert resumed.dev_loss <= rec.dev_loss + 1e-6


def test_import_refuses_pickle_only_adapters_without_unpickling(tiny_bank, tmp_path, monkeypatch):
    import pickle

    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")

    def boom(*a, **k):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: refusing to load a pickled"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    assert len(tiny_bank) == 0 and tiny_bank.router.ntotal == 0


def test_import_refuses_a_different_hidden_size(tiny_bank, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tiny_bank.backbone.tokenizer),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    folder = _save_adapter(_peft_model(other, _prompt_tuning_config()), tmp_path / "a")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: token_dim 48 does not match .*hidden size 32"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    # a config edited to claim the right size: the tensor's shape is checked from its header
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, token_dim=32)))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor 'prompt_embeddings' is F32 \[4, 48\]"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    assert len(tiny_bank) == 0


def test_import_refuses_lora_and_prefix_tuning(tiny_bank, tmp_path):
    lora = peft.get_peft_model(
        copy.deepcopy(tiny_bank.backbone.model),
        peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
    )
    _save_adapter(lora, tmp_path / "lora")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: peft_type 'LORA' cannot be imported"):
        tiny_bank.import_peft("weather", tmp_path / "lora", WEATHER)
    # a deep prompt exports as PREFIX_TUNING (a key/value cache): not importable
    tiny_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=2, **fast_options(max_steps=1))
    tiny_bank.save(tmp_path / "bank")
    with pytest.raises(AdapterError, match=r"peft_type 'PREFIX_TUNING' cannot be imported \(a prefix-tuning"):
        tiny_bank.import_peft("weather", tmp_path / "bank" / "tasks" / "fruit", WEATHER)
    assert list(tiny_bank.tasks) == ["fruit"]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"task_type": "SEQ_2_SEQ_LM"}, r"task_type 'SEQ_2_SEQ_LM'"),
        ({"num_transformer_submodules": 2}, r"num_transformer_submodules 2"),
        ({"num_virtual_tokens": 5}, r"tensor 'prompt_embeddings' is F32 \[4, 32\]; expected .*\[5, 32\]"),
        ({"num_virtual_tokens": 0}, r"num_virtual_tokens 0"),
        ({"peft_type": None}, r"peft_type None cannot"),
    ],
)
def test_import_checks_the_adapter_config(tiny_bank, tmp_path, edit, message):
    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, **edit)))
    with pytest.raises(AdapterError, match=message):
        tiny_bank.import_peft("weather", folder, WEATHER)
    assert len(tiny_bank) == 0


def test_import_checks_files_and_values(tiny_bank, tmp_path):
    with pytest.raises(AdapterError, match="not a folder"):
        tiny_bank.import_peft("weather", tmp_path / "nope", WEATHER)
    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    bad = torch.zeros(4, 32)
    bad[1, 3] = float("nan")
    save_file({"prompt_embeddings": bad}, weights)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    save_file({"prompt_embeddings": torch.zeros(4, 32), "extra": torch.zeros(1)}, weights)
    with pytest.raises(AdapterError, match="unexpected tensors"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    weights.write_bytes(good[:-10])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    weights.write_bytes(good)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: invalid JSON"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: missing"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    assert len(tiny_bank) == 0


def test_import_reads_half_precision_adapters_exactly(tiny_bank, tmp_path):
    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "a")
    emb = torch.randn(4, 32)
    for dtype in (torch.float16, torch.bfloat16):
        save_file({"prompt_embeddings": emb.to(dtype)}, folder / "adapter_model.safetensors")
        tiny_bank.import_peft(f"w-{dtype}".replace("torch.", ""), folder, WEATHER, **fast_options())
        stored = tiny_bank.soft_prompt(f"w-{dtype}".replace("torch.", ""))[0]
        assert stored.dtype == torch.float32 and torch.equal(stored, emb.to(dtype).float())


def test_import_follows_symlinked_files_like_the_hub_cache(tiny_bank, tmp_path):
    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "blobs")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snap / name).symlink_to(folder / name)
    rec = tiny_bank.import_peft("weather", snap, WEATHER, **fast_options())
    assert rec.imported_from["file"] == str(snap / "adapter_model.safetensors")


def test_import_needs_a_causal_bank_and_a_new_name(tiny_bank, enc_bank, tmp_path):  # noqa: F811
    folder = _save_adapter(_peft_model(tiny_bank.backbone.model, _prompt_tuning_config()), tmp_path / "a")
    with pytest.raises(AdapterError, match="causal-LM banks only"):
        enc_bank.import_peft("weather", folder, WEATHER)
    tiny_bank.import_peft("weather", folder, WEATHER, **fast_options())
    with pytest.raises(ValueError, match="already exists"):
        tiny_bank.import_peft("weather", folder, WEATHER)
    with pytest.raises(DataError):
        tiny_bank.import_peft("other", folder, [{"text": "x"}])
    assert list(tiny_bank.tasks) == ["weather"]


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["prompt_tuning", "deep"])
def test_resume_continues_from_the_stored_state(tiny_bank, method):
    rec = tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=4, **fast_options(lr=0.05))
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=3, **fast_options())
    other = tiny_bank._tasks["fruit"]
    keys, before = tiny_bank._tasks["weather"].keys, tiny_bank.soft_prompt("weather")
    resumed = tiny_bank.resume_task("weather", WEATHER, max_steps=12)
    after = tiny_bank.soft_prompt("weather")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the resumed run's step-0 evaluation is the stored prompt, on the same dev split
    start = next(e for e in resumed.history if e.get("resumed"))
    assert start["step"] == rec.steps and start["dev_loss"] == pytest.approx(rec.dev_loss, abs=1e-5)
    assert resumed.dev_loss <= rec.dev_loss + 1e-6
    assert resumed.steps == rec.steps + 12 and resumed.train_config["max_steps"] == 12
    assert resumed.prompt_config == rec.prompt_config and resumed.threshold == rec.threshold
    assert tiny_bank._tasks["fruit"] is other and tiny_bank._tasks["weather"].keys is keys
    assert list(tiny_bank.tasks) == ["weather", "fruit"]


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm"])
def test_ptuning_encoders_resume_from_their_weights(tiny_bank, method):
    tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=4, **fast_options(lr=0.05))
    state = tiny_bank._tasks["weather"].train_state
    assert state["mlp.2.weight"].abs().sum() > 0  # the encoder learned: a fresh (zero-head) start differs
    assert (method == "ptuning_lstm") == any(k.startswith("lstm.") for k in state)
    stored = tiny_bank.soft_prompt("weather")[0]
    tiny_bank.resume_task("weather", WEATHER, max_steps=1, lr=1e-9, warmup_ratio=0.0)
    torch.testing.assert_close(tiny_bank.soft_prompt("weather")[0], stored, atol=1e-5, rtol=0)
    assert set(tiny_bank._tasks["weather"].train_state) == set(state)
    # with a real learning rate it moves on from there
    tiny_bank.resume_task("weather", WEATHER, max_steps=6, lr=0.05)
    assert not torch.allclose(tiny_bank.soft_prompt("weather")[0], stored, atol=1e-4)


def test_encoder_bank_resumes_prompt_and_head(enc_bank):  # noqa: F811
    enc_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options(head_lr=0.1))
    t = enc_bank._tasks["weather"]
    assert {"head.linear.weight", "head.linear.bias"} <= set(t.train_state)  # the head is in the train state
    head, prompt = {k: v.clone() for k, v in t.head.items()}, t.prompt[0].clone()
    enc_bank.resume_task("weather", WEATHER, max_steps=1, lr=1e-9, head_lr=1e-9, warmup_ratio=0.0)
    t2 = enc_bank._tasks["weather"]
    torch.testing.assert_close(t2.head["weight"], head["weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(t2.prompt[0], prompt, atol=1e-6, rtol=0)
    rec = enc_bank.resume_task("weather", WEATHER, max_steps=6, head_lr=0.1)
    assert not torch.equal(enc_bank._tasks["weather"].head["weight"], head["weight"])
    assert rec.dev_accuracy is not None


def test_resume_errors_leave_the_bank_unchanged(tiny_bank, monkeypatch):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options(keep_train_state=False))
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options())
    snapshot = dict(tiny_bank._tasks)
    with pytest.raises(ResumeError, match=r"'weather' .*no stored train state .*keep_train_state=False"):
        tiny_bank.resume_task("weather", WEATHER)
    with pytest.raises(TaskNotFoundError):
        tiny_bank.resume_task("nope", WEATHER)
    with pytest.raises(VariantNotFoundError, match="no prompt variant 'b'"):
        tiny_bank.resume_task("fruit", FRUIT, variant="b")
    with pytest.raises(ValueError, match="unknown TrainConfig option"):
        tiny_bank.resume_task("fruit", FRUIT, max_stepz=3)
    with pytest.raises(DataError):
        tiny_bank.resume_task("fruit", WEATHER)  # labels good/bad are not the task's
    import promptbank.train as train_mod

    with monkeypatch.context() as m:
        m.setattr(train_mod, "lm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
        with pytest.raises(TrainingDivergedError):
            tiny_bank.resume_task("fruit", FRUIT)
    # a train state that does not fit the prompt module
    t = tiny_bank._tasks["fruit"]
    tiny_bank._tasks["fruit"] = copy.copy(t)
    tiny_bank._tasks["fruit"].train_state = {"embeddings": torch.zeros(3, 32)}
    with pytest.raises(ResumeError, match=r"wrong shapes \['embeddings \[3, 32\] \(expected \[4, 32\]\)'\]"):
        tiny_bank.resume_task("fruit", FRUIT)
    tiny_bank._tasks["fruit"] = t
    assert tiny_bank._tasks == snapshot


def test_resumed_state_survives_save_and_load(tiny_bank, tmp_path):
    tiny_bank.learn_task("echo", ECHO, method="ptuning_mlp", num_virtual_tokens=3, **fast_options())
    tiny_bank.save(tmp_path / "bank")
    loaded = _load(tiny_bank, tmp_path / "bank")
    a = tiny_bank.resume_task("echo", ECHO, max_steps=3)
    b = loaded.resume_task("echo", ECHO, max_steps=3)
    assert a.history == b.history
    torch.testing.assert_close(tiny_bank.soft_prompt("echo")[0], loaded.soft_prompt("echo")[0])


# ---------------------------------------------------------------------------------------------- variants


@pytest.fixture
def with_variant(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("echo", ECHO, num_virtual_tokens=3, **fast_options())
    rec = tiny_bank.learn_variant(
        "weather", "mlp", WEATHER, method="ptuning_mlp", num_virtual_tokens=3, **fast_options(lr=0.05)
    )
    assert rec.variant == "mlp" and rec.method.value == "ptuning_mlp" and rec.labels == ["good", "bad"]
    return tiny_bank


def test_learn_variant_leaves_serving_prompt_routing_and_other_tasks(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("echo", ECHO, num_virtual_tokens=3, **fast_options())
    serving, echo = tiny_bank._tasks["weather"], tiny_bank._tasks["echo"]
    router_keys = tiny_bank.router.keys("weather").copy()
    scores = tiny_bank.predict(TEXTS, task="weather")
    tiny_bank.learn_variant("weather", "deep", WEATHER, method="deep", num_virtual_tokens=2, **fast_options())
    t = tiny_bank._tasks["weather"]
    assert t.record is serving.record and t.prompt is serving.prompt and t.keys is serving.keys
    assert tiny_bank._tasks["echo"] is echo and np.array_equal(tiny_bank.router.keys("weather"), router_keys)
    assert [p.label_scores for p in tiny_bank.predict(TEXTS, task="weather")] == [p.label_scores for p in scores]
    assert list(tiny_bank.variants("weather")) == ["main", "deep"]
    assert tiny_bank.variants("weather")["deep"].prompt_config["layers"] is None
    assert list(tiny_bank.variants("echo")) == ["main"]
    assert tiny_bank.tasks["weather"].variant == "main"


def test_variant_does_not_warm_start_from_its_own_task(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    rec = tiny_bank.learn_variant("weather", "b", WEATHER, num_virtual_tokens=4, **fast_options())
    assert all(w["task"] != "weather" for w in rec.warm_start_from)


def test_compare_reports_metrics_per_variant(with_variant):
    bank = with_variant
    report = bank.compare("weather", WEATHER)
    assert list(report) == ["main", "mlp"]
    assert report["main"]["serving"] and not report["mlp"]["serving"]
    assert report["mlp"]["method"] == "ptuning_mlp"
    for row in report.values():
        assert row["n"] == len(WEATHER) and 0 <= row["accuracy"] <= 1 and math.isfinite(row["loss"])
    assert report["main"]["accuracy"] == bank.evaluate(WEATHER, task="weather")["accuracy"]
    bank.learn_variant("echo", "b", ECHO, num_virtual_tokens=2, **fast_options())
    gen = bank.compare("echo", ECHO)
    assert list(gen) == ["main", "b"] and all("accuracy" not in r and r["loss"] > 0 for r in gen.values())
    with pytest.raises(DataError):
        bank.compare("weather", FRUIT)  # not the task's labels


def test_promote_serves_the_variant_and_invalidates_the_prompt_cache(with_variant):
    bank = with_variant
    model = bank.backbone.model
    old_scores = [p.label_scores for p in bank.predict(TEXTS, task="weather")]  # fills the prompt cache
    variant_prompt = bank.soft_prompt("weather", "mlp")
    with torch.no_grad():
        kv = prompt_kv(model, variant_prompt)
    n, rec = len(TEXTS), bank.variants("weather")["mlp"]
    want = bank._rank_rows(TEXTS, [rec.template] * n, [kv] * n, [bank._label_ids(rec)] * n, 16)
    want = bank._with_probes(want, TEXTS, [bank._tasks["weather"].variants["mlp"].head] * n)  # its own probe
    keys = bank._tasks["weather"].keys
    new = bank.promote("weather", "mlp")
    assert new.variant == "mlp" and bank.tasks["weather"] == new and new.threshold == rec.threshold
    assert list(bank.variants("weather")) == ["mlp", "main"]
    assert bank._tasks["weather"].keys is keys
    got = [p.label_scores for p in bank.predict(TEXTS, task="weather")]
    assert got != old_scores
    for g, w in zip(got, want):
        np.testing.assert_allclose([g[lab] for lab in rec.labels], w.numpy(), atol=1e-5)
    assert bank.route("the weather is sunny today").task == "weather"
    assert bank.promote("weather", "mlp") == new  # already serving: no change
    bank.promote("weather", "main")  # and back
    assert [p.label_scores for p in bank.predict(TEXTS, task="weather")] == old_scores


def test_variants_and_promotion_survive_save_and_load(with_variant, tmp_path):
    bank = with_variant
    bank.learn_variant("weather", "deep", WEATHER, method="deep", num_virtual_tokens=2, **fast_options())
    bank.promote("weather", "mlp")
    bank.save(tmp_path / "bank")
    m = _manifest(tmp_path / "bank")
    assert [r.get("variant", "main") for r in m["variants"]["weather"]] == ["deep", "main"]
    assert m["tasks"]["weather"]["variant"] == "mlp" and "variant" not in m["tasks"]["echo"]
    assert (tmp_path / "bank/tasks/weather/variants/main/prompt.safetensors").is_file()
    assert (tmp_path / "bank/tasks/weather/variants/deep/train_state.safetensors").is_file()
    loaded = _load(bank, tmp_path / "bank")
    assert loaded.variants("weather") == bank.variants("weather") and loaded.tasks == bank.tasks
    for v in ("mlp", "main", "deep"):
        a, b = bank._tasks["weather"], loaded._tasks["weather"]
        va, vb = (a.serving() if v == "mlp" else a.variants[v]), (b.serving() if v == "mlp" else b.variants[v])
        assert va.prompt.keys() == vb.prompt.keys() and all(torch.equal(va.prompt[k], vb.prompt[k]) for k in va.prompt)
        assert va.train_state.keys() == vb.train_state.keys()
        assert all(torch.equal(va.train_state[k], vb.train_state[k]) for k in va.train_state)
    assert [p.label_scores for p in loaded.predict(TEXTS, task="weather")] == [
        p.label_scores for p in bank.predict(TEXTS, task="weather")
    ]
    assert loaded.compare("weather", WEATHER) == bank.compare("weather", WEATHER)
    # promote after loading, resume a variant after loading
    loaded.promote("weather", "deep")
    loaded.resume_task("weather", WEATHER, variant="main", max_steps=2)
    loaded.save(tmp_path / "bank")
    again = _load(bank, tmp_path / "bank")
    assert again.tasks["weather"].variant == "deep" and list(again.variants("weather")) == ["deep", "main", "mlp"]
    assert again.variants("weather")["main"].steps == bank.variants("weather")["main"].steps + 2


def test_remove_variant_and_variant_errors(with_variant, tmp_path):
    bank = with_variant
    with pytest.raises(VariantNotFoundError, match=r"task 'weather' has no prompt variant 'x' \(variants: main, mlp\)"):
        bank.promote("weather", "x")
    with pytest.raises(VariantNotFoundError):
        bank.remove_variant("weather", "x")
    with pytest.raises(VariantNotFoundError):
        bank.soft_prompt("weather", "x")
    with pytest.raises(TaskNotFoundError):
        bank.learn_variant("nope", "b", WEATHER)
    with pytest.raises(TaskNotFoundError):
        bank.variants("nope")
    with pytest.raises(VariantExistsError, match="already has a prompt variant 'mlp'"):
        bank.learn_variant("weather", "mlp", WEATHER)
    with pytest.raises(VariantExistsError, match="'main'"):
        bank.learn_variant("weather", "main", WEATHER)
    with pytest.raises(ValueError, match="invalid variant name '../x'"):
        bank.learn_variant("weather", "../x", WEATHER)
    with pytest.raises(DataError):
        bank.learn_variant("weather", "c", FRUIT)
    with pytest.raises(ValueError, match="'main' is the one task 'weather' serves"):
        bank.remove_variant("weather", "main")
    assert list(bank.variants("weather")) == ["main", "mlp"]
    bank.remove_variant("weather", "mlp")
    assert list(bank.variants("weather")) == ["main"]
    bank.save(tmp_path / "bank")
    assert not (tmp_path / "bank/tasks/weather/variants").exists() and "variants" not in _manifest(tmp_path / "bank")


def test_encoder_variants_compare_promote_round_trip(enc_bank, tmp_path):  # noqa: F811
    enc_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options(head_lr=0.1))
    enc_bank.learn_variant("weather", "mlp", WEATHER, method="ptuning_mlp", **fast_options(head_lr=0.1))
    report = enc_bank.compare("weather", WEATHER)
    assert list(report) == ["main", "mlp"] and all(0 <= r["accuracy"] <= 1 for r in report.values())
    assert report["main"]["accuracy"] == enc_bank.evaluate(WEATHER, task="weather")["accuracy"]
    enc_bank.promote("weather", "mlp")
    assert enc_bank.evaluate(WEATHER, task="weather")["accuracy"] == report["mlp"]["accuracy"]
    enc_bank.save(tmp_path / "bank")
    assert (tmp_path / "bank/tasks/weather/variants/main/head.safetensors").is_file()
    loaded = _load(enc_bank, tmp_path / "bank")
    assert loaded.compare("weather", WEATHER) == enc_bank.compare("weather", WEATHER)


def test_a_promote_landing_mid_call_keeps_each_tasks_template_with_its_prompt(with_variant, monkeypatch):
    """``predict`` takes one snapshot of the task table: a promote to a variant with another template that lands
    after the call has read the template still gets the old prompt's prefix (not the new prompt behind the old
    template); the stale prefix is not cached, and the next call serves the new variant."""
    bank = with_variant
    bank.learn_variant(
        "weather", "tpl", WEATHER, num_virtual_tokens=3, template="Weather note: {input}\nMood:", **fast_options()
    )
    old = [p.label_scores for p in bank.predict(TEXTS, task="weather")]
    bank.promote("weather", "tpl")
    new = [p.label_scores for p in bank.predict(TEXTS, task="weather")]
    bank.promote("weather", "main")
    bank._kv.clear()
    assert new != old
    real, calls = bank._prompt_kv, []

    def promote_first(name, prompt=None):
        if not calls:
            bank.promote("weather", "tpl")  # lands after predict took its snapshot
        calls.append(name)
        return real(name, prompt)

    monkeypatch.setattr(bank, "_prompt_kv", promote_first)
    assert [p.label_scores for p in bank.predict(TEXTS, task="weather")] == old
    assert "weather" not in bank._kv  # the old prompt's prefix was not cached for the new serving variant
    monkeypatch.undo()
    assert [p.label_scores for p in bank.predict(TEXTS, task="weather")] == new
    assert bank._kv["weather"][0] is bank._tasks["weather"].prompt


def test_promote_while_predicting_never_mixes_prompts(with_variant):
    """Readers see the old or the new serving prompt, never a stale prompt cache after a promote."""
    bank = with_variant
    texts = TEXTS[:2]
    main = [p.label_scores for p in bank.predict(texts, task="weather")]
    bank.promote("weather", "mlp")
    mlp = [p.label_scores for p in bank.predict(texts, task="weather")]
    bank.promote("weather", "main")
    seen, errors, stop = [], [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                seen.append([p.label_scores for p in bank.predict(texts, task="weather")])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20):
        bank.promote("weather", "mlp" if i % 2 == 0 else "main")
    stop.set()
    for t in threads:
        t.join()
    assert not errors and seen
    assert all(s in (main, mlp) for s in seen)
    assert [p.label_scores for p in bank.predict(texts, task="weather")] == main  # 20 promotes: back to main


# ---------------------------------------------------------------------------------------------- on disk


@pytest.fixture
def saved_variants(with_variant, tmp_path):
    with_variant.save(tmp_path / "bank")
    return with_variant, tmp_path / "bank"


def test_banks_without_variants_are_written_as_before(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    tiny_bank.save(tmp_path / "bank")
    m = _manifest(tmp_path / "bank")
    assert "variants" not in m and not {"variant", "imported_from"} & set(m["tasks"]["weather"])
    assert _load(tiny_bank, tmp_path / "bank").variants("weather") == {"main": tiny_bank.tasks["weather"]}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["variants"]["weather"][0].update(variant="../x"), "invalid variant name '../x'"),
        (lambda m: m["variants"]["weather"][0].update(variant="main"), "variant names must be distinct"),
        (lambda m: m["variants"].update(nope=[]), "'variants' must map task names"),
        (lambda m: m["variants"]["weather"][0].update(labels=["good", "ugly"]), "another kind, labels or label words"),
        (lambda m: m["variants"]["weather"][0].update(name="echo"), "record names 'echo'"),
        (lambda m: m["tasks"]["weather"].update(variant=""), "invalid variant name ''"),
        (lambda m: m["tasks"]["weather"].update(imported_from=[1]), "imported_from must be an object"),
    ],
)
def test_hostile_variant_manifests_are_refused(saved_variants, edit, message):
    bank, folder = saved_variants
    m = _manifest(folder)
    edit(m)
    _reseal(folder, m)
    with pytest.raises(BankFormatError, match=message):
        _load(bank, folder)


def test_variant_files_are_checked_like_task_files(saved_variants):
    bank, folder = saved_variants
    rel = "tasks/weather/variants/mlp/prompt.safetensors"
    save_file({"layer.0": torch.zeros(5, 32)}, folder / rel)
    _reseal(folder)
    with pytest.raises(BankFormatError, match=r"variants/mlp/prompt\.safetensors: tensor 'layer\.0' is F32 \[5, 32\]"):
        _load(bank, folder)
    save_file({"layer.0": torch.full((3, 32), float("inf"))}, folder / rel)
    _reseal(folder)
    with pytest.raises(BankFormatError, match="NaN or infinite"):
        _load(bank, folder)
    shutil.copy(folder / "tasks/weather/prompt.safetensors", folder / "tasks/weather/variants/mlp/extra.safetensors")
    m = _manifest(folder)
    m["files"]["tasks/weather/variants/mlp/extra.safetensors"] = {"sha256": "0" * 64, "size": 1}
    m["files"]["tasks/weather/variants/zzz/prompt.safetensors"] = {"sha256": "0" * 64, "size": 1}
    _reseal(folder, m)
    with pytest.raises(BankFormatError, match="unexpected file entry"):
        _load(bank, folder)


def test_altered_variant_file_is_detected(saved_variants):
    bank, folder = saved_variants
    p = folder / "tasks/weather/variants/mlp/train_state.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match=r"variants/mlp/train_state\.safetensors: sha256 differs"):
        _load(bank, folder)
    p.unlink()
    with pytest.raises(BankFormatError, match=r"variants/mlp/train_state\.safetensors"):
        _load(bank, folder)


def test_a_task_changed_during_training_stores_nothing(with_variant, monkeypatch):
    bank = with_variant
    fit = bank._fit

    def fit_then(change):
        def wrapped(*a, **k):
            out = fit(*a, **k)
            change()  # another writer, while this one trained
            return out

        return wrapped

    monkeypatch.setattr(bank, "_fit", fit_then(lambda: bank.promote("weather", "mlp")))
    with pytest.raises(TaskChangedError, match="'weather' was changed or removed while it was resumed"):
        bank.resume_task("weather", WEATHER, max_steps=2)
    assert bank.tasks["weather"].variant == "mlp" and bank.variants("weather")["main"].steps == 6
    # learn_variant adds to whatever the task holds now, unless the task is gone
    monkeypatch.setattr(bank, "_fit", fit_then(lambda: bank.promote("weather", "main")))
    bank.learn_variant("weather", "c", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    assert list(bank.variants("weather")) == ["main", "mlp", "c"]
    monkeypatch.setattr(bank, "_fit", fit_then(lambda: bank.remove_task("weather")))
    with pytest.raises(TaskChangedError, match="'weather' was removed or replaced"):
        bank.learn_variant("weather", "d", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    assert "weather" not in bank and list(bank.tasks) == ["echo"]


def test_a_saved_banks_task_folder_imports_with_its_own_template_and_label_words(tiny_bank, tmp_path):
    """BANK/tasks/NAME holds the task's PEFT export; importing it needs no --template: the bank's manifest says how
    the task's inputs were shown (and what its labels are written as), so the import answers like the source."""
    template, words = "Review: {input}\nVerdict:", {"good": "fine", "bad": "poor"}
    tiny_bank.learn_task(  # no embedding probe: an import has none, so both answer by the LM's label scores
        "weather", WEATHER, method="ptuning_mlp", template=template, label_words=words, probe=False,
        **fast_options(max_steps=3),
    )  # fmt: skip
    tiny_bank.save(tmp_path / "src")
    other = PromptBank(tiny_bank.backbone, tiny_bank.embedder)
    rec = other.import_peft("weather_copy", tmp_path / "src" / "tasks" / "weather", WEATHER, **fast_options())
    source = tiny_bank.tasks["weather"]
    assert rec.template == source.template and rec.label_words == source.label_words == words
    texts = [ex["text"] for ex in WEATHER[:4]] + ["a storm is coming"]
    got, want = other.predict(texts, task="weather_copy"), tiny_bank.predict(texts, task="weather")
    assert [p.output for p in got] == [p.output for p in want]
    for g, w in zip(got, want):
        assert g.label_scores.keys() == w.label_scores.keys() == {"good", "bad"}
        assert g.label_scores == pytest.approx(w.label_scores, abs=1e-4)
    # the same adapter files outside a bank: PEFT's raw-text format, no label words
    shutil.copytree(tmp_path / "src" / "tasks" / "weather", tmp_path / "loose")
    rec = other.import_peft("loose", tmp_path / "loose", WEATHER, **fast_options())
    assert rec.template.endswith(RAW) and rec.template != source.template and rec.label_words is None
    # an explicit template wins over the bank's
    rec = other.import_peft("given", tmp_path / "src" / "tasks" / "weather", WEATHER, template=RAW, **fast_options())
    assert rec.template.endswith(RAW) and rec.label_words is None


def test_a_task_folder_import_refuses_to_guess_the_template(tiny_bank, tmp_path):
    tiny_bank.learn_task(
        "weather", WEATHER, num_virtual_tokens=2, label_words={"good": "fine"}, **fast_options(max_steps=1)
    )
    tiny_bank.save(tmp_path / "src")
    other = PromptBank(tiny_bank.backbone, tiny_bank.embedder)
    folder = tmp_path / "src" / "tasks" / "weather"
    # the exported task's label words name labels this data does not have
    with pytest.raises(ValueError, match=r"label words of the exported task in .* do not fit this data"):
        other.import_peft("fruit", folder, FRUIT, **fast_options())
    # a folder in a bank that does not list it, or whose manifest is unreadable: no silent guess
    shutil.copytree(folder, tmp_path / "src" / "tasks" / "stray")
    with pytest.raises(AdapterError, match=r"lists no task 'stray'; pass the template"):
        other.import_peft("stray", tmp_path / "src" / "tasks" / "stray", WEATHER)
    (tmp_path / "src" / "promptbank.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(AdapterError, match=r"manifest cannot be read .*\(CLI: --template\)"):
        other.import_peft("weather", folder, WEATHER)
    assert list(other.tasks) == []
    other.import_peft("weather", folder, WEATHER, template=RAW, **fast_options())  # a template given: no manifest read
    assert list(other.tasks) == ["weather"]
