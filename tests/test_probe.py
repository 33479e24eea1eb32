"""The embedding probe of classification tasks: a logistic regression on the routing embeddings, stored with the
task's head, whose log-probabilities are added to the prompted head's (encoders) or to the causal LM's label
ranking's (causal LMs)."""

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
    """Without the refit the stored task is the one the dev accuracy measured; with it (the default) the stored
    probe is refitted on train + dev rows, and the dev accuracy is still that of the probe fitted on train alone."""
    opts = {"method": "deep", "num_virtual_tokens": 3, **fast_options()}
    rec = enc_bank.learn_task("weather", WEATHER[:12], dev=WEATHER[12:], probe_refit=False, **opts)
    assert "probe_weight" in enc_bank._tasks["weather"].head
    assert rec.dev_accuracy == pytest.approx(enc_bank.evaluate(WEATHER[12:], task="weather")["accuracy"])
    head = enc_bank._tasks["weather"].head
    emb = enc_bank.embedder.encode([r["text"] for r in WEATHER[:12]])
    ys = [rec.labels.index(r["label"]) for r in WEATHER[:12]]
    assert torch.equal(head["probe_weight"], fit_probe(emb, ys, 2, 10.0)["probe_weight"])  # train rows only

    refit = enc_bank.learn_task("weather2", WEATHER[:12], dev=WEATHER[12:], **opts)
    assert refit.train_config["probe_refit"] is True and refit.dev_accuracy == rec.dev_accuracy
    both = enc_bank._tasks["weather2"].head
    emb = enc_bank.embedder.encode([r["text"] for r in WEATHER])
    ys = [rec.labels.index(r["label"]) for r in WEATHER]
    assert torch.equal(both["probe_weight"], fit_probe(emb, ys, 2, 10.0)["probe_weight"])  # train + dev rows
    assert torch.equal(both["weight"], head["weight"])  # the prompted head is trained as before


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


# ------------------------------------------------------------------------------------------ causal LMs
def _lm_scores(bank, texts, name):
    """The causal LM's label ranking alone (summed log-likelihoods) of task ``name`` for ``texts``."""
    t = bank._tasks[name]
    n = len(texts)
    return bank._rank_rows(
        texts, [t.record.template] * n, [bank.prompt_prefix(name)] * n, [bank._label_ids(t.record)] * n, 16
    )


def test_causal_classification_tasks_get_a_probe_and_predict_with_it(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=3, probe=False, **fast_options())
    tiny_bank.learn_task("echo", [{"input": f"say {w}", "target": w} for w in "abcdefgh"], **fast_options())
    head = tiny_bank._tasks["weather"].head
    assert set(head) == {"probe_weight", "probe_bias"}  # a causal task's head is its probe alone
    assert head["probe_weight"].shape == (2, tiny_bank.embedder.dim)
    assert tiny_bank._tasks["fruit"].head is None and tiny_bank._tasks["echo"].head is None  # off; generation

    texts = ["the weather is sunny today", "the weather is awful today"]
    got = tiny_bank.predict(texts, task="weather")
    lm = _lm_scores(tiny_bank, texts, "weather")
    emb = torch.as_tensor(tiny_bank.embedder.encode(texts), dtype=torch.float32)
    probe = torch.log_softmax(emb @ head["probe_weight"].T + head["probe_bias"], -1)
    labels = tiny_bank._tasks["weather"].record.labels
    for i, p in enumerate(got):  # by hand: the product of the LM's label distribution and the probe's, renormalised
        want = torch.log_softmax(torch.log_softmax(lm[i], -1) + probe[i], -1)
        assert [p.label_scores[lab] for lab in labels] == pytest.approx(want.tolist(), abs=1e-5)
        assert p.output == labels[int(want.argmax())]
    # routed rows reuse their routing embeddings: the same scores as with the task given
    for r, g in zip(tiny_bank.predict(texts), got):
        if r.task == "weather":
            assert r.label_scores == pytest.approx(g.label_scores, abs=1e-4)  # float order of batched forwards
    # a task without a probe reports its LM scores unchanged, also in a batch mixed with a probed task
    fruit_text = "i would like to eat a lemon"
    mixed = tiny_bank.predict([texts[0], fruit_text], task=["weather", "fruit"])
    assert mixed[0].label_scores == pytest.approx(got[0].label_scores, abs=1e-4)
    fruit_lm = _lm_scores(tiny_bank, [fruit_text], "fruit")[0]
    fruit_labels = tiny_bank._tasks["fruit"].record.labels
    assert [mixed[1].label_scores[lab] for lab in fruit_labels] == pytest.approx(fruit_lm.tolist(), abs=1e-5)


def test_causal_dev_accuracy_is_that_of_the_stored_task_with_its_probe(tiny_bank):
    rec = tiny_bank.learn_task(
        "weather", WEATHER[:12], dev=WEATHER[12:], num_virtual_tokens=3, probe_refit=False, **fast_options()
    )
    assert "probe_weight" in tiny_bank._tasks["weather"].head
    assert rec.dev_accuracy == pytest.approx(tiny_bank.evaluate(WEATHER[12:], task="weather")["accuracy"])
    report = tiny_bank.compare("weather", WEATHER[12:])  # the variants report scores with the probe too
    assert report["main"]["accuracy"] == pytest.approx(rec.dev_accuracy)


def test_causal_probe_survives_save_and_load_and_bad_heads_are_refused(tiny_bank, hashing_embedder, tmp_path):
    from safetensors.torch import save_file
    from test_reliability import _reseal

    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=3, probe=False, **fast_options())
    texts = ["the weather is lovely today", "i would like to eat a cherry"]
    before = tiny_bank.predict(texts, task=["weather", "fruit"])
    tiny_bank.save(tmp_path / "bank")
    assert not (tmp_path / "bank" / "tasks" / "fruit" / "head.safetensors").exists()
    loaded = PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=hashing_embedder)
    for k, v in tiny_bank._tasks["weather"].head.items():
        assert torch.equal(loaded._tasks["weather"].head[k], v)
    assert loaded._tasks["fruit"].head is None
    assert [p.label_scores for p in loaded.predict(texts, task=["weather", "fruit"])] == [
        p.label_scores for p in before
    ]
    # a causal task's head holds the probe only: a linear head beside it is refused
    path = tmp_path / "bank" / "tasks" / "weather" / "head.safetensors"
    head = dict(tiny_bank._tasks["weather"].head)
    save_file(head | {"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}, str(path))
    _reseal(tmp_path / "bank")
    with pytest.raises(BankFormatError, match="unexpected tensors"):
        PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=hashing_embedder)
    save_file({"probe_weight": head["probe_weight"]}, str(path))  # half a probe
    _reseal(tmp_path / "bank")
    with pytest.raises(BankFormatError, match="probe_bias"):
        PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=hashing_embedder)


def test_causal_resume_keeps_a_task_with_or_without_its_probe(tiny_bank, hashing_embedder, tmp_path):
    """Causal tasks saved before they could have a probe say "probe": true in their config but have none: they
    resume without one, like every task without a probe, unless probe=True is passed."""
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=3, probe=False, **fast_options())
    tiny_bank.save(tmp_path / "bank")
    from test_reliability import _manifest, _reseal

    (tmp_path / "bank" / "tasks" / "weather" / "head.safetensors").unlink()  # what an older bank looks like
    manifest = _manifest(tmp_path / "bank")
    del manifest["files"]["tasks/weather/head.safetensors"]
    _reseal(tmp_path / "bank", manifest)
    old = PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=hashing_embedder)
    assert old._tasks["weather"].head is None and old.tasks["weather"].train_config["probe"] is True
    old.resume_task("weather", WEATHER, max_steps=3, eval_every=3, progress=False)
    assert old._tasks["weather"].head is None and old.tasks["weather"].train_config["probe"] is False
    old.resume_task("fruit", FRUIT, max_steps=3, eval_every=3, progress=False, probe=True)
    assert "probe_weight" in old._tasks["fruit"].head
    tiny_bank.resume_task("weather", WEATHER, max_steps=3, eval_every=3, progress=False)  # kept when it had one
    assert "probe_weight" in tiny_bank._tasks["weather"].head
