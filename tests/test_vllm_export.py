"""PromptBank.prompt_embeds: input-level soft prompts exported as vLLM ``prompt_embeds``.

vLLM is not installed here (it needs CUDA). What vLLM does with ``{"prompt_embeds": e}`` is one causal forward over
``e`` at positions ``0..len(e)-1`` in place of the token-embedding lookup, which is what the HF model does with
``inputs_embeds=e[None]``; so each test feeds the export that way to the bank's own frozen model and compares with
the bank's own path (prefix key/value cache, positions starting at P).
"""

from __future__ import annotations

import pytest
import torch
from conftest import fast_options, make_tiny_bert
from test_bank import ECHO, FRUIT, WEATHER

from promptbank import PromptBank, TaskNotFoundError
from promptbank.causal import encode_input, encode_target
from promptbank.inject import forward_hidden

INPUT_LEVEL = ["prompt_tuning", "ptuning_mlp", "ptuning_lstm"]
ATOL = 1e-4


def _next_token_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """Logits of every position of one sequence given as input embeddings (T, V)."""
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits[0]


def _greedy_from_embeds(model, tok, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy decoding from input embeddings alone, re-running the whole sequence each step (no cache): the
    reference for what an engine fed these prompt_embeds generates."""
    embed = model.get_input_embeddings()
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(_next_token_logits(model, embeds)[-1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([nxt])).float()])
    return out


def _label_scores_from_embeds(model, embeds: torch.Tensor, label_ids: list[list[int]]) -> list[float]:
    """Summed log-likelihood of each label continuation after ``embeds``, by one full forward per label."""
    embed = model.get_input_embeddings()
    scores = []
    for lab in label_ids:
        with torch.no_grad():
            seq = torch.cat([embeds, embed(torch.tensor(lab[:-1], dtype=torch.long)).float()])
        logp = torch.log_softmax(_next_token_logits(model, seq).float(), -1)
        start = len(embeds) - 1  # the position that predicts the label's first token
        scores.append(float(sum(logp[start + j, t] for j, t in enumerate(lab))))
    return scores


@pytest.mark.parametrize("method", INPUT_LEVEL)
def test_exported_embeds_reproduce_label_scores(tiny_bank, method):
    """Classification: the label log-likelihoods computed from the export alone equal predict()'s label_scores,
    and differ from those of the same input without the prompt (so the prompt is really in the export)."""
    # the label ranking alone: an embedding probe is not part of what is exported
    tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=4, probe=False, **fast_options())
    record = tiny_bank.tasks["weather"]
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    text = "the weather is cold and grey"
    [embeds] = tiny_bank.prompt_embeds([text], task="weather")
    ids = encode_input(tok, text, record.template)
    assert embeds.shape == (4 + len(ids), model.config.hidden_size)
    assert embeds.dtype == torch.float32 and embeds.device.type == "cpu"

    label_ids = [encode_target(tok, lab, record.train_config["max_target_tokens"]) for lab in record.labels]
    ours = _label_scores_from_embeds(model, embeds, label_ids)
    [pred] = tiny_bank.predict([text], task="weather")
    expected = [pred.label_scores[lab] for lab in record.labels]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), atol=ATOL, rtol=0)

    no_prompt = _label_scores_from_embeds(model, embeds[4:], label_ids)
    assert max(abs(a - b) for a, b in zip(no_prompt, expected)) > 1e-2


@pytest.mark.parametrize("method", INPUT_LEVEL)
def test_exported_embeds_reproduce_logits_and_greedy_generation(tiny_bank, method):
    """Generation: logits at every input position equal the bank's prefix-cache forward, and greedy decoding
    from the export alone yields generate()'s text."""
    tiny_bank.learn_task("echo", ECHO, method=method, num_virtual_tokens=5, **fast_options())
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    texts = ["repeat fish", "repeat a longer phrase please"]
    exported = tiny_bank.prompt_embeds(texts, task="echo")
    generated = tiny_bank.generate(texts, task="echo", max_new_tokens=12)
    for text, embeds, gen in zip(texts, exported, generated):
        ids = encode_input(tok, text, tiny_bank.tasks["echo"].template)
        assert embeds.shape[0] == 5 + len(ids)
        with torch.no_grad():
            hidden, _, _ = forward_hidden(
                model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [tiny_bank.prompt_prefix("echo")]
            )
            bank_logits = model.get_output_embeddings()(hidden[0])
        torch.testing.assert_close(_next_token_logits(model, embeds)[5:], bank_logits, atol=ATOL, rtol=0)

        greedy = _greedy_from_embeds(model, tok, embeds, max_new_tokens=12)
        assert greedy, "the reference decoded nothing; the comparison would be vacuous"
        assert tok.decode(greedy, skip_special_tokens=True).strip() == gen


def test_routing_picks_the_same_task_as_route(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="ptuning_mlp", num_virtual_tokens=6, **fast_options())
    texts = ["the weather is sunny today", "i would like to eat a banana", "quantum chromodynamics lecture notes"]
    routed = [tiny_bank.route(t).task for t in texts]
    assert routed == ["weather", "fruit", None]
    exported = tiny_bank.prompt_embeds(texts)
    for text, name, embeds in zip(texts, routed, exported):
        assert torch.equal(embeds, tiny_bank.prompt_embeds([text], task=[name])[0])
    assert torch.equal(exported[0][:3], tiny_bank.soft_prompt("weather")[0])
    assert torch.equal(exported[1][:6], tiny_bank.soft_prompt("fruit")[0])


def test_text_with_no_task_gets_plain_embeddings_that_generate_like_the_backbone(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    text = "quantum chromodynamics lecture notes"
    [embeds] = tiny_bank.prompt_embeds(text, task=[None])
    ids = tok(text, add_special_tokens=False)["input_ids"]  # the tiny tokenizer has no chat template
    assert embeds.shape == (len(ids), model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(embeds, model.get_input_embeddings()(torch.tensor(ids)).float())
    [gen] = tiny_bank.generate([text], task=[None], max_new_tokens=8)
    assert tok.decode(_greedy_from_embeds(model, tok, embeds, 8), skip_special_tokens=True).strip() == gen


def test_deep_task_raises_naming_task_and_peft_route(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=3, **fast_options())
    with pytest.raises(ValueError, match=r"task 'fruit' cannot be exported.*deep.*PREFIX_TUNING"):
        tiny_bank.prompt_embeds(["i would like to eat a banana"], task="fruit")
    with pytest.raises(ValueError, match="task 'fruit'"):  # one deep row fails the whole call, checked up front
        tiny_bank.prompt_embeds(["the weather is sunny today", "a banana"], task=["weather", "fruit"])
    assert len(tiny_bank.prompt_embeds(["the weather is sunny today"], task="weather")) == 1


def test_encoder_bank_raises(hashing_embedder):
    bank = PromptBank(make_tiny_bert(), hashing_embedder)
    with pytest.raises(ValueError, match="encoder"):
        bank.prompt_embeds(["anything"])


def test_unknown_task_and_wrong_task_count_raise(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    with pytest.raises(TaskNotFoundError):
        tiny_bank.prompt_embeds(["x"], task="nope")
    with pytest.raises(ValueError, match="2 task names for 1 texts"):
        tiny_bank.prompt_embeds(["x"], task=["weather", None])


def test_save_load_round_trip_gives_identical_exports(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="ptuning_lstm", num_virtual_tokens=5, **fast_options())
    texts = ["the weather is sunny today", "i would like to eat a banana", "quantum chromodynamics lecture notes"]
    before = tiny_bank.prompt_embeds(texts)
    tiny_bank.save(tmp_path / "bank")
    loaded = PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    after = loaded.prompt_embeds(texts)
    assert [e.shape for e in after] == [e.shape for e in before]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
