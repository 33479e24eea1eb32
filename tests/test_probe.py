"""The embedding probe of encoder tasks: a logistic regression on the routing embeddings, stored with the head,
whose log-probabilities are added to the prompted head's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fast_options, make_tiny_bert
from test_bank import FRUIT, WEATHER

from promptbank import PromptBank
from promptbank.encoder import fit_probe, head_logits
from promptbank.errors import BankFormatError


def _blobs(n_per: int = 20, dim: int = 16, labels: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(labels, dim)) * 3
    y = np.repeat(np.arange(labels), n_per)
    return (centers[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_fit_probe_separates_blobs_and_matches_its_objective():
    x, y = _blobs()
    p = fit_probe(x, y, 3, c=10.0)
    assert p["probe_weight"].shape == (3, 16) and p["probe_bias"].shape == (3,)
    logits = torch.tensor(x) @ p["probe_weight"].T + p["probe_bias"]
    assert (logits.argmax(-1).numpy() == y).mean() == 1.0
    # at the optimum of c * sum CE + ||W||^2 / 2 the gradient is ~0: W = -c * dCE/dW
    w = p["probe_weight"].double().requires_grad_(True)
    b = p["probe_bias"].double().requires_grad_(True)
    loss = (
        10.0
        * torch.nn.functional.cross_entropy(
            torch.tensor(x, dtype=torch.float64) @ w.T + b, torch.tensor(y), reduction="sum"
        )
        + 0.5 * (w * w).sum()
    )
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3
    # stronger regularisation -> smaller weights; same inputs -> the same probe
    assert float(fit_probe(x, y, 3, c=0.01)["probe_weight"].norm()) < float(p["probe_weight"].norm())
    assert torch.equal(fit_probe(x, y, 3, c=10.0)["probe_weight"], p["probe_weight"])


def test_fit_probe_rejects_bad_inputs():
    x, y = _blobs()
    with pytest.raises(ValueError, match="c must be"):
        fit_probe(x, y, 3, c=0.0)
    with pytest.raises(ValueError, match="embeddings and n targets"):
        fit_probe(x[:5], y, 3, c=1.0)


def test_head_logits_adds_the_probes_log_probabilities():
    torch.manual_seed(0)
    head = {"weight": torch.randn(3, 8), "bias": torch.randn(3)}
    feats, emb = torch.randn(2, 8), torch.randn(2, 5)
    torch.testing.assert_close(head_logits(head, feats), feats @ head["weight"].T + head["bias"])
    probed = head | {"probe_weight": torch.randn(3, 5), "probe_bias": torch.randn(3)}
    want = torch.log_softmax(feats @ head["weight"].T + head["bias"], -1) + torch.log_softmax(
        emb @ probed["probe_weight"].T + probed["probe_bias"], -1
    )
    torch.testing.assert_close(head_logits(probed, feats, emb), want)
    with pytest.raises(ValueError, match="routing embeddings"):
        head_logits(probed, feats)


def test_tasks_get_a_probe_by_default_and_predict_with_it(enc_bank):
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    enc_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=3, probe=False, **fast_options())
    head = enc_bank._tasks["weather"].head
    assert head["probe_weight"].shape == (2, enc_bank.embedder.dim) and head["probe_bias"].shape == (2,)
    assert set(enc_bank._tasks["fruit"].head) == {"weight", "bias"}

    texts = ["the weather is sunny today", "the weather is awful today"]
    got = enc_bank.predict(texts, task="weather")
    # by hand: the prompted head's log-probabilities plus the probe's, renormalised
    t = enc_bank._tasks["weather"]
    plain = {k: v for k, v in t.head.items() if not k.startswith("probe_")}
    head_only = enc_bank._encoder_logits(texts, [t.prompt] * 2, [plain] * 2, 256)
    emb = torch.as_tensor(enc_bank.embedder.encode(texts), dtype=torch.float32)
    probe = emb @ t.head["probe_weight"].T + t.head["probe_bias"]
    for i, p in enumerate(got):
        want = torch.log_softmax(torch.log_softmax(head_only[i], -1) + torch.log_softmax(probe[i], -1), -1)
        assert [p.label_scores[lab] for lab in t.record.labels] == pytest.approx(want.tolist(), abs=1e-5)
        assert p.output == t.record.labels[int(want.argmax())]
    # routed rows reuse the routing embeddings: same scores as with the task given
    routed = enc_bank.predict(texts)
    for r, g in zip(routed, got):
        if r.task == "weather":
            assert r.label_scores == pytest.approx(g.label_scores, abs=1e-5)
    # a mixed batch (probe and no probe) equals each row alone
    mixed = enc_bank.predict([texts[0], "i would like to eat a lemon"], task=["weather", "fruit"])
    assert mixed[0].label_scores == pytest.approx(got[0].label_scores, abs=1e-5)
    alone = enc_bank.predict(["i would like to eat a lemon"], task="fruit")[0]
    assert mixed[1].label_scores == pytest.approx(alone.label_scores, abs=1e-5)


def test_dev_accuracy_is_that_of_the_stored_task(enc_bank):
    rec = enc_bank.learn_task(
        "weather", WEATHER[:12], dev=WEATHER[12:], method="deep", num_virtual_tokens=3, **fast_options()
    )
    assert "probe_weight" in enc_bank._tasks["weather"].head
    assert rec.dev_accuracy == pytest.approx(enc_bank.evaluate(WEATHER[12:], task="weather")["accuracy"])


def test_probe_survives_save_and_load(enc_bank, hashing_embedder, tmp_path):
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    enc_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=3, probe=False, **fast_options())
    texts = ["the weather is lovely today", "i would like to eat a cherry"]
    before = enc_bank.predict(texts, task=["weather", "fruit"])
    enc_bank.save(tmp_path / "bank")
    loaded = PromptBank.load(tmp_path / "bank", backbone=enc_bank.backbone, embedder=hashing_embedder)
    for k, v in enc_bank._tasks["weather"].head.items():
        assert torch.equal(loaded._tasks["weather"].head[k], v)
    assert set(loaded._tasks["fruit"].head) == {"weight", "bias"}
    after = loaded.predict(texts, task=["weather", "fruit"])
    assert [p.label_scores for p in after] == [p.label_scores for p in before]


def test_a_probe_of_the_wrong_width_is_refused_on_load(enc_bank, hashing_embedder, tmp_path):
    from safetensors.torch import save_file
    from test_reliability import _reseal

    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    enc_bank.save(tmp_path / "bank")
    head = dict(enc_bank._tasks["weather"].head)
    head["probe_weight"] = torch.zeros(2, enc_bank.embedder.dim + 1)
    save_file(head, str(tmp_path / "bank" / "tasks" / "weather" / "head.safetensors"))
    _reseal(tmp_path / "bank")  # checksums redone: the shape check itself must refuse it
    with pytest.raises(BankFormatError, match="probe_weight"):
        PromptBank.load(tmp_path / "bank", backbone=enc_bank.backbone, embedder=hashing_embedder)
    del head["probe_bias"]  # half a probe
    head["probe_weight"] = torch.zeros(2, enc_bank.embedder.dim)
    save_file(head, str(tmp_path / "bank" / "tasks" / "weather" / "head.safetensors"))
    _reseal(tmp_path / "bank")
    with pytest.raises(BankFormatError, match="probe_bias"):
        PromptBank.load(tmp_path / "bank", backbone=enc_bank.backbone, embedder=hashing_embedder)


def test_a_bf16_encoder_trains_and_predicts(hashing_embedder):
    """Heads and probes are fp32; a bf16 encoder's pooled output is cast to fp32 before them."""
    bb = make_tiny_bert()
    bb.model.to(torch.bfloat16)
    bank = PromptBank(bb, hashing_embedder)
    bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    given = bank.predict(["the weather is sunny today"], task="weather")[0]
    assert given.output in ("good", "bad")
    assert sum(np.exp(v) for v in given.label_scores.values()) == pytest.approx(1.0, abs=1e-5)
    routed = bank.predict(["the weather is sunny today"])[0]
    assert routed.task == "weather" and routed.label_scores == pytest.approx(given.label_scores, abs=1e-6)


def test_resume_keeps_a_task_with_or_without_its_probe(enc_bank, hashing_embedder, tmp_path):
    """A task saved before the probe existed (no "probe" in its stored config) resumes without one; tasks saved
    since resume as they were learned; probe= on resume overrides either."""
    import json

    from test_reliability import _reseal

    from promptbank.storage import MANIFEST

    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    enc_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=3, probe=False, **fast_options())
    enc_bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    for name in ("weather", "fruit"):  # what a bank written before the probe looks like
        for key in ("probe", "probe_c"):
            manifest["tasks"][name]["train_config"].pop(key)
    _reseal(tmp_path / "bank", manifest)
    old = PromptBank.load(tmp_path / "bank", backbone=enc_bank.backbone, embedder=hashing_embedder)
    old.resume_task("fruit", FRUIT, max_steps=3, eval_every=3, progress=False)
    assert set(old._tasks["fruit"].head) == {"weight", "bias"}
    assert old.tasks["fruit"].train_config["probe"] is False
    old.resume_task("fruit", FRUIT, max_steps=3, eval_every=3, progress=False, probe=True)
    assert "probe_weight" in old._tasks["fruit"].head
    # a task saved with its probe on keeps it when resumed
    enc_bank.resume_task("weather", WEATHER, max_steps=3, eval_every=3, progress=False)
    assert "probe_weight" in enc_bank._tasks["weather"].head
