"""TrainConfig.precision="bf16": training forwards under torch.autocast (bf16 matrix products), weights, soft
prompts and heads in float32, every method on a causal LM and an encoder; the one-off packing and pruning checks
still pass when first reached inside autocast; bad values refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import fast_options, make_tiny_model, make_tiny_tokenizer
from test_bank import FRUIT, WEATHER

from promptbank import PromptBank
from promptbank.backbone import from_model
from promptbank.config import TrainConfig

METHODS = ("prompt_tuning", "ptuning_mlp", "ptuning_lstm", "deep")


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """These tests run the bf16 path whatever the CPU (on one without native bf16 it is emulated: slow on real models,
    fine on these tiny ones); the fallback test below switches it off."""
    from promptbank import train

    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: True)


class _LinearDtypes:
    """Records the output dtypes of every nn.Linear of a model while training runs (grad enabled)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: set[torch.dtype] = set()
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, out):
        if torch.is_grad_enabled():
            self.seen.add(out.dtype)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", METHODS)
def test_causal_bf16_training_runs_in_bf16_and_stores_fp32(tiny_bank, method):
    spy = _LinearDtypes(tiny_bank.backbone.model)
    try:
        rec = tiny_bank.learn_task(
            "w", WEATHER, method=method, num_virtual_tokens=4, precision="bf16", **fast_options()
        )
    finally:
        spy.close()
    assert spy.seen == {torch.bfloat16}  # every training forward's products ran in bf16
    assert rec.train_config["precision"] == "bf16"
    assert rec.dev_loss < rec.history[0]["dev_loss"]  # it learned
    assert all(t.dtype == torch.float32 for t in tiny_bank.soft_prompt("w").values())
    assert next(tiny_bank.backbone.model.parameters()).dtype == torch.float32
    pred = tiny_bank.predict([WEATHER[0]["text"]], task="w")[0]
    assert pred.output in rec.labels


def test_causal_bf16_labels_objective_and_generation(tiny_bank):
    """The label-ranking objective and a generation task train under autocast too."""
    rec = tiny_bank.learn_task(
        "w", WEATHER, objective="labels", num_virtual_tokens=4, precision="bf16", **fast_options()
    )
    assert rec.dev_loss < rec.history[0]["dev_loss"]
    pairs = [{"input": r["text"], "target": r["label"] + " day"} for r in WEATHER]
    rec = tiny_bank.learn_task("g", pairs, method="deep", num_virtual_tokens=4, precision="bf16", **fast_options())
    assert rec.kind == "generation" and rec.dev_loss < rec.history[0]["dev_loss"]


@pytest.mark.parametrize("method", METHODS)
def test_encoder_bf16_training_runs_in_bf16_and_stores_fp32(enc_bank, method):
    spy = _LinearDtypes(enc_bank.backbone.model)
    try:
        rec = enc_bank.learn_task("w", WEATHER, method=method, num_virtual_tokens=4, precision="bf16", **fast_options())
    finally:
        spy.close()
    assert spy.seen == {torch.bfloat16}
    assert rec.train_config["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in enc_bank.soft_prompt("w").values())
    assert all(t.dtype == torch.float32 for t in enc_bank._tasks["w"].head.values())
    assert enc_bank.evaluate(WEATHER, task="w")["n"] == len(WEATHER)


def test_bf16_close_to_fp32(tiny_backbone, hashing_embedder):
    """Same data, seed and steps: the bf16-trained prompt scores the labels close to the fp32-trained one (the
    training differs only by rounding), and the first step's loss agrees to bf16 precision."""
    banks = {p: PromptBank(copy.deepcopy(tiny_backbone), hashing_embedder) for p in ("fp32", "bf16")}
    recs = {
        p: b.learn_task("w", WEATHER + FRUIT, num_virtual_tokens=4, precision=p, **fast_options())
        for p, b in banks.items()
    }
    first = {p: r.history[1]["loss"] for p, r in recs.items()}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)
    assert first["bf16"] != first["fp32"]  # the products really were rounded
    texts = [r["text"] for r in WEATHER[:4]]
    got = {p: [q.label_scores for q in b.predict(texts, task="w")] for p, b in banks.items()}
    for a, b in zip(got["fp32"], got["bf16"]):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], abs=0.1)


def test_one_off_checks_pass_when_first_reached_under_autocast(hashing_embedder):
    """The packing and last-layer pruning checks compare in the weights' dtype, not bf16: reached for the first
    time inside a bf16 training step, a model that packs and prunes still does."""
    from promptbank import inject

    tok = make_tiny_tokenizer()
    backbone = from_model(make_tiny_model(len(tok), seed=3), tok, name="fresh")
    bank = PromptBank(backbone, hashing_embedder)
    assert backbone.model not in inject._PACKING_CHECKED and backbone.model not in inject._PRUNING_CHECKED
    bank.learn_task("w", WEATHER, num_virtual_tokens=4, precision="bf16", **fast_options())
    assert inject._PRUNING_CHECKED.get(backbone.model) is True
    assert inject._PACKING_CHECKED.get(backbone.model, True) is True  # checked only if a batch was packed


def test_bad_precision_refused():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    assert TrainConfig().precision == "fp32"


def test_cpu_without_native_bf16_trains_in_fp32_and_says_so(tiny_bank, monkeypatch):
    """Where bf16 is emulated (no AVX512-BF16 / AMX) it is many times slower, so "bf16" falls back to fp32: a
    warning, fp32 products, and the record says fp32."""
    from promptbank import train

    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: False)
    spy = _LinearDtypes(tiny_bank.backbone.model)
    try:
        with pytest.warns(UserWarning, match="no native bf16.*training in fp32 instead"):
            rec = tiny_bank.learn_task(
                "w", WEATHER, num_virtual_tokens=4, precision="bf16", **fast_options(max_steps=1)
            )
    finally:
        spy.close()
    assert spy.seen == {torch.float32}
    assert rec.train_config["precision"] == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_bank.learn_task("v", WEATHER, num_virtual_tokens=4, **fast_options(max_steps=1))  # fp32: no warning
