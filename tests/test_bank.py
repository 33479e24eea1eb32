"""Invariants of DESIGN.md on a tiny GQA Llama: frozen backbone, no forgetting, batch-independence,
cached == uncached, save/load round trips, PEFT compatibility, clean failure."""

from __future__ import annotations

import copy
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_options

from promptbank import DataError, PromptBank, Routing, TaskExistsError, TaskNotFoundError, TrainingDivergedError
from promptbank.causal import encode_input, left_pad
from promptbank.inject import decoder_layers, forward_hidden, prompt_kv

WEATHER = [
    {"text": f"the weather is {w} today", "label": lab}
    for w, lab in [("sunny", "good"), ("rainy", "bad"), ("lovely", "good"), ("awful", "bad")] * 4
]
FRUIT = [
    {"text": f"i would like to eat a {f}", "label": lab}
    for f, lab in [("apple", "red"), ("banana", "yellow"), ("cherry", "red"), ("lemon", "yellow")] * 4
]
ECHO = [{"input": f"repeat {w}", "target": w} for w in ["cat", "dog", "sun", "moon", "tree", "car", "red", "blue"]]

METHODS = ["prompt_tuning", "ptuning_mlp", "ptuning_lstm", "deep"]


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_backbone_bit_identical_after_learning(tiny_bank, method):
    before = _state_hash(tiny_bank.backbone.model)
    tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=4, **fast_options())
    assert _state_hash(tiny_bank.backbone.model) == before
    assert not any(p.requires_grad for p in tiny_bank.backbone.model.parameters())


def test_training_lowers_dev_loss(tiny_bank):
    rec = tiny_bank.learn_task(
        "weather",
        WEATHER,
        method="prompt_tuning",
        num_virtual_tokens=4,
        **fast_options(max_steps=30, eval_every=5, lr=1.0, warm_start=False),
    )
    initial = rec.history[0]["dev_loss"]
    assert rec.dev_loss < initial - 1.0, (initial, rec.dev_loss)


def test_task_a_unchanged_after_learning_b(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=4, **fast_options())
    prompt_a = tiny_bank.soft_prompt("weather")
    keys_a = tiny_bank._tasks["weather"].keys.copy()
    record_a = tiny_bank.tasks["weather"].to_dict()
    preds_a = tiny_bank.predict([r["text"] for r in WEATHER[:4]], task="weather")
    # B warm-starts from A (same shape): A's tensors must still not move.
    rec_b = tiny_bank.learn_task(
        "fruit", FRUIT, method="deep", num_virtual_tokens=4, **fast_options(warm_start_min_similarity=0)
    )
    assert [w["task"] for w in rec_b.warm_start_from] == ["weather"]
    for layer, t in tiny_bank.soft_prompt("weather").items():
        assert torch.equal(t, prompt_a[layer])
    assert np.array_equal(tiny_bank._tasks["weather"].keys, keys_a)
    assert tiny_bank.tasks["weather"].to_dict() == record_a
    after = tiny_bank.predict([r["text"] for r in WEATHER[:4]], task="weather")
    assert [p.label_scores for p in after] == [p.label_scores for p in preds_a]


def test_warm_start_off_records_nothing(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    rec = tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options(warm_start=False))
    assert rec.warm_start_from == []
    rec2 = tiny_bank.learn_task("fruit2", FRUIT, num_virtual_tokens=4, **fast_options(warm_start_min_similarity=0))
    assert {w["task"] for w in rec2.warm_start_from} == {"weather", "fruit"}
    assert abs(sum(w["weight"] for w in rec2.warm_start_from) - 1) < 1e-5
    # only similar enough tasks are mixed in: a fruit task (same inputs, so the router sends them there) yes,
    # "weather" no. fruit and fruit2 have identical keys, so the router's tie goes one way: one of them, share ~1.
    rec3 = tiny_bank.learn_task("fruit3", FRUIT, num_virtual_tokens=4, **fast_options(warm_start_min_similarity=0.9))
    assert len(rec3.warm_start_from) == 1 and rec3.warm_start_from[0]["task"] in {"fruit", "fruit2"}
    assert rec3.warm_start_from[0]["similarity"] >= 0.9 and rec3.warm_start_from[0]["weight"] == 1.0


def _record_encodes(bank) -> list[list[str]]:
    """From now on, every list of texts ``bank``'s embedder encodes is appended to the returned list."""
    calls: list[list[str]] = []
    encode = bank.embedder.encode

    def counting(texts, **kw):
        calls.append(list(texts))
        return encode(texts, **kw)

    bank.embedder.encode = counting
    return calls


def test_learn_task_embeds_each_training_input_once(tiny_bank):
    """The routing keys and the warm start use the same embeddings of the training inputs."""
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    calls = _record_encodes(tiny_bank)
    rec = tiny_bank.learn_task(
        "fruit", FRUIT, num_virtual_tokens=4, dev=FRUIT[:4], **fast_options(warm_start_min_similarity=0)
    )
    assert rec.warm_start_from  # the warm start ran
    assert sum(len(c) for c in calls) == len(FRUIT) + 4, calls  # the training inputs once, the dev inputs once


def _many_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` classification rows of random word sequences (labels alternate): many distinct inputs, one topic."""
    rng = random.Random(seed)
    words = ["sunny", "rainy", "lemon", "cherry", "weather", "eat", "today", "awful", "warm", "cold"]
    return [{"text": " ".join(rng.choice(words) for _ in range(6)), "label": "ab"[i % 2]} for i in range(n)]


@pytest.mark.parametrize("probe", [True, False])
def test_a_large_dataset_embeds_at_most_max_embedded_training_inputs(tiny_bank, probe):
    """The routing embedder sees at most ``max_embedded`` training inputs (label-stratified), however large the
    data: a 100,000-row dataset used to be embedded whole, and its leave-one-out threshold scores built an n x n
    matrix (20,000 rows: 3.5 GB peak). Keys, the warm start and the probe come from those rows; every row is
    still trained on."""
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    data = _many_rows(120)
    calls = _record_encodes(tiny_bank)
    opts = fast_options(max_embedded=20, max_keys=8, warm_start_min_similarity=0, probe=probe)
    rec = tiny_bank.learn_task("many", data, dev=data[:4], num_virtual_tokens=4, **opts)
    train_calls = [c for c in calls if c != [r["text"] for r in data[:4]]]
    assert sum(len(c) for c in train_calls) == 20, [len(c) for c in calls]  # training inputs, once: 20 of 120
    embedded = set(train_calls[0])
    assert {r["label"] for r in data if r["text"] in embedded} == {"a", "b"}  # both labels kept
    task = tiny_bank._tasks["many"]
    assert len(task.keys) == 8 and rec.train_config["max_embedded"] == 20
    assert rec.num_train == 120  # ... and all rows were trained on
    assert ("probe_weight" in (task.head or {})) == probe
    assert tiny_bank.predict([data[5]["text"]], "many")[0].output in {"a", "b"}


def test_cosine_threshold_rejects_its_quantile_of_fresh_in_task_queries(tiny_backbone, hashing_embedder):
    """With more training inputs than keys, the cosine ("knn") threshold is calibrated on held-out inputs scored
    against the task's keys, as a query is at inference. It used to score every input against all other inputs
    (denser neighbours than the 256 keys a query meets), which made it reject 56 % of fresh in-task queries here
    instead of ``threshold_quantile`` (5 %)."""
    bank = PromptBank(tiny_backbone, hashing_embedder, routing="knn")
    bank.learn_task("many", _many_rows(1000), num_virtual_tokens=2, **fast_options(max_steps=1))
    fresh = [r["text"] for r in _many_rows(1000, seed=1)]
    routed = bank.route_many(fresh)
    rejected = sum(r.task is None for r in routed) / len(routed)
    assert 0.02 <= rejected <= 0.10, rejected


def test_task_similarities_is_the_routing_share(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options(warm_start=False))
    fruit_texts = [r["text"] for r in FRUIT]
    sims = tiny_bank.task_similarities(fruit_texts)
    routed = [r.task for r in tiny_bank.route_many(fruit_texts)]
    assert sims == {n: routed.count(n) / len(routed) for n in {"weather", "fruit"} if routed.count(n)}
    assert sims["fruit"] >= 0.9 and sims.get("weather", 0.0) <= 0.1
    # leaving "fruit" out, each text goes to its next-ranked task if that task accepts it
    assert set(tiny_bank.task_similarities(fruit_texts, exclude="fruit")) <= {"weather"}
    assert PromptBank(tiny_bank.backbone, tiny_bank.embedder).task_similarities(fruit_texts) == {}


def test_same_seed_same_prompt(tiny_backbone, hashing_embedder):
    a = PromptBank(tiny_backbone, hashing_embedder)
    b = PromptBank(tiny_backbone, hashing_embedder)
    for bank in (a, b):
        bank.learn_task("weather", WEATHER, method="ptuning_lstm", num_virtual_tokens=4, **fast_options(seed=3))
    for layer, t in a.soft_prompt("weather").items():
        assert torch.equal(t, b.soft_prompt("weather")[layer])


def _concat_reference(model, prompt, ids):
    """Uncached reference: prompt vectors concatenated in front of the token embeddings, deep layers written by
    hooks that overwrite the first P positions. Returns hidden states of the tokens, (T, d)."""
    p = prompt[0].shape[0]
    handles = []
    for layer, vec in prompt.items():
        if layer == 0:
            continue

        def hook(mod, args, kwargs, vec=vec):
            hs = (args[0] if args else kwargs["hidden_states"]).clone()
            hs[:, :p] = vec
            if args:
                return (hs, *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=hs)

        handles.append(decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        emb = model.get_input_embeddings()(torch.tensor([ids]))
        out = model.base_model(inputs_embeds=torch.cat([prompt[0][None], emb], 1))
    finally:
        for h in handles:
            h.remove()
    return out.last_hidden_state[0, p:]


@pytest.mark.parametrize("method", METHODS)
def test_cached_prefix_equals_concatenated_forward(tiny_bank, method):
    tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=5, **fast_options())
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    prompt = tiny_bank.soft_prompt("weather")
    ids = encode_input(tok, "the weather is fine")
    with torch.no_grad():
        ref = _concat_reference(model, prompt, ids)
        hid, _, _ = forward_hidden(
            model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [prompt_kv(model, prompt)]
        )
    torch.testing.assert_close(hid[0], ref, atol=1e-5, rtol=1e-5)


def test_same_output_alone_single_task_batch_and_mixed_batch(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, method="prompt_tuning", num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=6, **fast_options())
    tiny_bank.learn_task("echo", ECHO, method="ptuning_mlp", num_virtual_tokens=4, **fast_options())
    texts = ["the weather is grey", "a very long sentence about the weather being terribly cold and wet", "eat a plum"]
    alone = [tiny_bank.predict([texts[0]], task="weather")[0]]
    single = tiny_bank.predict(texts[:2], task="weather")
    mixed = tiny_bank.predict(texts + ["repeat sky"], task=["weather", "weather", "fruit", None])
    for x, y in [(alone[0], single[0]), (single[0], mixed[0]), (single[1], mixed[1])]:
        assert x.output == y.output
        for lab in x.label_scores:
            assert x.label_scores[lab] == pytest.approx(y.label_scores[lab], abs=1e-4)
    fruit_alone = tiny_bank.predict([texts[2]], task="fruit")[0]
    assert fruit_alone.label_scores == pytest.approx(mixed[2].label_scores, abs=1e-4)
    assert mixed[3].output is None and mixed[3].task is None
    # generation: mixed-task batch (with a no-prompt row) equals per-row runs
    gen_texts = ["repeat cat", "the weather is grey", "hello there"]
    gen_tasks = ["echo", "weather", None]
    batch = tiny_bank.generate(gen_texts, gen_tasks, max_new_tokens=6)
    rows = [tiny_bank.generate([t], [k], max_new_tokens=6)[0] for t, k in zip(gen_texts, gen_tasks)]
    assert batch == rows


def test_mixed_batch_hidden_states_match_per_row(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=7, **fast_options())
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    seqs = [encode_input(tok, t) for t in ["short", "a much longer input sentence here", "mid length one"]]
    kvs = [tiny_bank._prompt_kv("weather"), tiny_bank._prompt_kv("fruit"), None]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        batch, _, _ = forward_hidden(model, ids, mask, kvs)
        for b, (s, kv) in enumerate(zip(seqs, kvs)):
            one, _, _ = forward_hidden(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), [kv])
            torch.testing.assert_close(batch[b, -len(s) :], one[0], atol=1e-5, rtol=1e-5)


def test_save_load_save_identical_and_in_place(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, method="ptuning_lstm", num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("echo", ECHO, num_virtual_tokens=4, **fast_options())
    tiny_bank.remove_task("fruit")  # ids must stay stable across the round trip
    first = tmp_path / "bank"
    tiny_bank.save(first)
    files1 = _tree_bytes(first)
    loaded = PromptBank.load(first, backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    assert list(loaded.tasks) == ["weather", "echo"]
    loaded.save(first)  # into the folder it was loaded from
    assert _tree_bytes(first) == files1
    loaded.save(tmp_path / "copy")
    assert _tree_bytes(tmp_path / "copy") == files1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    texts = ["the weather is bad", "repeat dog"]
    assert [p.label_scores for p in loaded.predict(texts, task=["weather", "weather"])] == [
        p.label_scores for p in tiny_bank.predict(texts, task=["weather", "weather"])
    ]
    assert loaded.generate(texts, ["echo", None], max_new_tokens=4) == tiny_bank.generate(
        texts, ["echo", None], max_new_tokens=4
    )
    assert [r.ranked for r in loaded.route_many(texts)] == [r.ranked for r in tiny_bank.route_many(texts)]


def test_loaded_tensors_are_copies(tiny_bank, tmp_path):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    before = (tmp_path / "b" / "tasks" / "weather" / "prompt.safetensors").read_bytes()
    loaded._tasks["weather"].prompt[0].add_(1.0)
    assert (tmp_path / "b" / "tasks" / "weather" / "prompt.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "method, peft_type",
    [("prompt_tuning", "PROMPT_TUNING"), ("ptuning_mlp", "PROMPT_TUNING"), ("deep", "PREFIX_TUNING")],
)
def test_peft_loads_exported_task_with_equal_logits(tiny_bank, tmp_path, method, peft_type):
    """Input-level prompts export as PEFT PROMPT_TUNING, deep prompts as PREFIX_TUNING (their exact KV cache):
    PeftModel.from_pretrained on the task folder gives our logits."""
    import json

    peft = pytest.importorskip("peft")
    tiny_bank.learn_task("weather", WEATHER, method=method, num_virtual_tokens=4, **fast_options())
    tiny_bank.save(tmp_path / "bank")
    folder = tmp_path / "bank" / "tasks" / "weather"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    ids = encode_input(tok, "the weather is cold")
    mask = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        ours_hidden, _, _ = forward_hidden(model, torch.tensor([ids]), mask, [tiny_bank._prompt_kv("weather")])
        ours = model.get_output_embeddings()(ours_hidden)[0]
        theirs = peft.PeftModel.from_pretrained(model, str(folder))(input_ids=torch.tensor([ids]), attention_mask=mask)
    torch.testing.assert_close(ours, theirs.logits[0, -len(ids) :], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning_mlp", "deep"])
def test_peft_generation_on_an_exported_task_equals_the_bank(tiny_bank, tmp_path, method):
    """Greedy generation through PeftModel on an exported generation task gives the bank's text: for PROMPT_TUNING
    exports PEFT's ``generate`` without its KV cache (``use_cache=False``; with transformers 5 its cached generation
    drifts, see the README), for PREFIX_TUNING (deep) a loop of PeftModel forwards (its ``generate`` drops or
    shifts the prefix)."""
    peft = pytest.importorskip("peft")
    tiny_bank.learn_task("echo", ECHO, method=method, num_virtual_tokens=4, **fast_options())
    tiny_bank.save(tmp_path / "bank")
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "bank" / "tasks" / "echo")).eval()
    texts = ["repeat cat", "repeat moon", "say hello"]
    want = tiny_bank.generate(texts, task="echo", max_new_tokens=6)
    for text, expected in zip(texts, want):
        ids = torch.tensor([encode_input(tok, text)])
        with torch.no_grad():
            if method != "deep":
                out = pm.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                    use_cache=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                )[0, ids.shape[1] :]  # fmt: skip
            else:
                x = ids
                for _ in range(6):
                    nxt = int(pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
                    x = torch.cat([x, torch.tensor([[nxt]])], 1)
                    if nxt == tok.eos_token_id:
                        break
                out = x[0, ids.shape[1] :]
        assert tok.decode(out, skip_special_tokens=True).strip() == expected


def test_duplicate_and_invalid_task_names(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    with pytest.raises(TaskExistsError, match="weather"):
        tiny_bank.learn_task("weather", WEATHER, **fast_options(max_steps=1))
    for bad in ["../x", "/abs", "", ".hidden", "a/b", "x" * 200]:
        with pytest.raises(ValueError, match="invalid task name"):
            tiny_bank.learn_task(bad, WEATHER, **fast_options(max_steps=1))
    with pytest.raises(TaskNotFoundError, match="nope"):
        tiny_bank.predict(["hi"], task="nope")
    with pytest.raises(TaskNotFoundError):
        tiny_bank.remove_task("nope")


def test_bad_data_leaves_bank_untouched(tiny_bank, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        tiny_bank.learn_task("bad", bad)
    assert len(tiny_bank) == 0 and tiny_bank.router.ntotal == 0


def test_nan_loss_raises_and_leaves_bank_untouched(tiny_bank, monkeypatch):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=2))
    snapshot = (list(tiny_bank.tasks), tiny_bank.router.ntotal)
    import promptbank.train as train_mod

    monkeypatch.setattr(train_mod, "lm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingDivergedError, match="nan"):
        tiny_bank.learn_task("fruit", FRUIT, **fast_options())
    assert (list(tiny_bank.tasks), tiny_bank.router.ntotal) == snapshot


def test_routing_picks_the_right_task_and_rejects_off_topic(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=2, **fast_options(max_steps=1))
    assert tiny_bank.route("the weather is sunny today").task == "weather"
    assert tiny_bank.route("i would like to eat a banana").task == "fruit"
    off = tiny_bank.route("quantum chromodynamics lecture notes")
    assert off.task is None and off.ranked  # ranked candidates are still reported
    pred = tiny_bank.predict(["quantum chromodynamics lecture notes"])[0]
    assert pred.output is None and pred.task is None


@pytest.mark.parametrize("routing", ["lda", "knn"])
def test_routing_reports_the_threshold_it_decided_by(tiny_backbone, hashing_embedder, routing):
    bank = PromptBank(tiny_backbone, hashing_embedder, routing=routing)
    assert bank.routing_thresholds() == {}
    assert bank.route("anything") == Routing(None, None, [], None)
    bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    bank.learn_task("fruit", FRUIT, num_virtual_tokens=2, **fast_options(max_steps=1))
    limits = bank.routing_thresholds()
    assert set(limits) == {"weather", "fruit"} and all(np.isfinite(v) for v in limits.values())
    if routing == "knn":  # the cosine scorer's thresholds are the ones stored with the tasks
        assert limits == {n: pytest.approx(t.threshold) for n, t in bank.tasks.items()}
    for text in ("the weather is sunny today", "i would like to eat a banana", "quantum chromodynamics notes"):
        r = bank.route(text)
        first, score = r.ranked[0]
        assert r.score == score and r.threshold == pytest.approx(limits[first])
        assert r.task == (first if score >= r.threshold else None)


def test_only_prompt_parameters_receive_gradients(tiny_bank):
    from promptbank.causal import lm_loss
    from promptbank.prompts import PromptTuning

    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    module = PromptTuning({0: torch.randn(3, model.config.hidden_size)})
    loss = lm_loss(model, tok, [prompt_kv(model, module())], [encode_input(tok, "hi")], [[5, 6]])
    loss.backward()
    assert module.embeddings.grad is not None and module.embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_rank_labels_equals_full_sequence_likelihood(tiny_bank):
    """The two-forward label ranking (labels share the input's forward) equals scoring each full
    input+label sequence on its own, for a mixed-task batch with different label sets."""
    from promptbank.causal import rank_labels, target_logprobs

    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    kvs, inputs, label_ids = _ranking_case(tiny_bank)
    got = rank_labels(model, tok, kvs, inputs, label_ids)
    with torch.no_grad():
        for kv, inp, labs, g in zip(kvs, inputs, label_ids, got):
            ref = torch.stack([target_logprobs(model, tok, [kv], [inp], [lab])[0].sum() for lab in labs])
            torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-5)


def _ranking_case(bank):
    from promptbank.causal import encode_target

    bank.learn_task("weather", WEATHER, num_virtual_tokens=3, **fast_options())
    bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=5, **fast_options())
    tok = bank.backbone.tokenizer
    rows = [("weather", "the weather is odd"), ("fruit", "a long text about eating some fruit"), (None, "hi")]
    labels = [["good", "bad", "so-so"], ["red", "yellow"], ["x", "a longer label"]]
    kvs = [bank._prompt_kv(t) if t else None for t, _ in rows]
    inputs = [encode_input(tok, text) for _, text in rows]
    return kvs, inputs, [[encode_target(tok, lab) for lab in labs] for labs in labels]


def test_rank_labels_in_chunks_of_pairs_equals_one_forward(tiny_bank, monkeypatch):
    """Many labels are scored a bounded number of (row, label) pairs at a time: the scores do not change."""
    from promptbank import causal

    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    kvs, inputs, label_ids = _ranking_case(tiny_bank)
    whole = causal.rank_labels(model, tok, kvs, inputs, label_ids)  # 7 pairs, under the default chunk
    for chunk in (1, 2, 3):
        monkeypatch.setattr(causal, "LABEL_PAIRS_PER_FORWARD", chunk)
        for got, ref in zip(causal.rank_labels(model, tok, kvs, inputs, label_ids), whole):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_label_loss_is_the_cross_entropy_of_the_label_ranking(tiny_bank):
    """The classification objective: each row's gold label against all its labels, scored as rank_labels scores
    them (plus, with lm_weight, the gold label's per-token NLL); gradients reach the prompt, never the model."""
    from promptbank.causal import label_loss, rank_labels
    from promptbank.prompts import PromptTuning

    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    _, inputs, label_ids = _ranking_case(tiny_bank)
    module = PromptTuning({0: torch.randn(3, model.config.hidden_size)})
    gold = [2, 0, 1]
    scores = rank_labels(model, tok, [prompt_kv(model, module())] * 3, inputs, label_ids)
    ce = torch.stack([torch.logsumexp(s, 0) - s[g] for s, g in zip(scores, gold)])
    nll = torch.stack([-s[g] / len(labs[g]) for s, g, labs in zip(scores, gold, label_ids)])
    for weight in (0.0, 1.0):
        module.zero_grad()
        loss = label_loss(model, tok, [prompt_kv(model, module())] * 3, inputs, label_ids, gold, lm_weight=weight)
        torch.testing.assert_close(loss.detach(), (ce + weight * nll).mean(), atol=1e-5, rtol=1e-5)
        loss.backward()
        assert module.embeddings.grad is not None and module.embeddings.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())


def test_label_objective_trains_on_the_ranking_and_selects_on_dev_accuracy(tiny_bank):
    """objective="labels": the dev loss is the label cross-entropy, the dev accuracy is recorded at every
    evaluation (and drives the kept state); the default "lm" records neither and trains on the label tokens."""
    opts = fast_options(max_steps=12, eval_every=3, lr=0.5, warm_start=False)
    lm = tiny_bank.learn_task("weather_lm", WEATHER, num_virtual_tokens=3, **opts)
    assert lm.train_config["objective"] == "lm"
    assert not any("dev_accuracy" in h for h in lm.history)
    rec = tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=3, objective="labels", **opts)
    evals = [h for h in rec.history if h.get("dev_loss") is not None]
    assert len(evals) == 5 and all("dev_accuracy" in h for h in evals)
    kept = next(h for h in evals if h["step"] == rec.best_step)
    assert kept["dev_accuracy"] == max(h["dev_accuracy"] for h in evals)
    assert kept["dev_accuracy"] == pytest.approx(rec.dev_accuracy)  # measured again after training: the same
    # two labels: the dev loss is a cross-entropy over 2 choices, ln 2 for a prompt that cannot tell them apart
    assert 0 < evals[0]["dev_loss"] < 5 and evals[-1]["dev_loss"] < evals[0]["dev_loss"] + 1
    assert rec.dev_loss == kept["dev_loss"]


@pytest.mark.filterwarnings("ignore:.*no trained state beat")
def test_label_objective_ranks_gold_labels_among_a_bounded_subset(tiny_bank, monkeypatch):
    """More labels than label_subset: each step ranks the batch's gold labels among label_subset labels."""
    from promptbank import train

    seen = []
    real = train._label_batch_loss

    def spy(model, tok, module, pairs, label_ids, gold, lm_weight=0.0):
        seen.append((len(label_ids), len(pairs), list(gold), lm_weight))
        assert all(0 <= g < len(label_ids) for g in gold)
        return real(model, tok, module, pairs, label_ids, gold, lm_weight)

    monkeypatch.setattr(train, "_label_batch_loss", spy)
    rows = [{"text": f"item {i} of kind {c}", "label": c} for i in range(4) for c in "abcdef"]
    opts = fast_options(max_steps=4, batch_size=2, warm_start=False)
    tiny_bank.learn_task("kinds", rows, num_virtual_tokens=3, objective="labels+lm", label_subset=3, **opts)
    assert len(seen) == 4
    assert all(n == 3 and rows_ == 2 and w == 1.0 for n, rows_, _, w in seen)
    assert all(g[0] == 0 for _, _, g, _ in seen)  # the batch's gold labels come first in the subset


def test_objective_errors(tiny_bank, enc_bank):
    from promptbank.config import TrainConfig

    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="ranking")
    with pytest.raises(ValueError, match="label_subset"):
        TrainConfig(label_subset=1)
    with pytest.raises(ValueError, match="generation task"):
        tiny_bank.learn_task("echo", ECHO, objective="labels", **fast_options())
    with pytest.raises(ValueError, match="select_on='accuracy'"):
        tiny_bank.learn_task("weather", WEATHER, select_on="accuracy", **fast_options())
    with pytest.raises(ValueError, match="encoder"):
        enc_bank.learn_task("weather", WEATHER, objective="labels", **fast_options())
    assert not tiny_bank.tasks and not enc_bank.tasks
    rec = tiny_bank.learn_task("weather", WEATHER, objective="labels", select_on="accuracy", **fast_options())
    assert rec.train_config["select_on"] == "accuracy"


def test_bank_refuses_a_different_backbone(tiny_bank, tmp_path):
    from conftest import make_tiny_model

    from promptbank import BackboneMismatchError
    from promptbank.backbone import from_model

    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    tiny_bank.save(tmp_path / "bank")
    tok = tiny_bank.backbone.tokenizer
    other = from_model(make_tiny_model(len(tok), seed=1), tok, name="other")
    with pytest.raises(BackboneMismatchError, match="embedding_sha256"):
        PromptBank.load(tmp_path / "bank", backbone=other, embedder=tiny_bank.embedder)
    loaded = PromptBank.load(tmp_path / "bank", backbone=other, embedder=tiny_bank.embedder, allow_mismatch=True)
    assert list(loaded.tasks) == ["weather"]


def test_load_rejects_missing_or_newer_banks(tiny_bank, tmp_path):
    import json

    from promptbank import BankFormatError

    with pytest.raises(BankFormatError, match="not a promptbank bank"):
        PromptBank.load(tmp_path, backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    tiny_bank.save(tmp_path / "bank")
    manifest = tmp_path / "bank" / "promptbank.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(BankFormatError, match="newer"):
        PromptBank.load(tmp_path / "bank", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)


def test_prompt_hooks_do_not_leak_into_other_threads(tiny_bank):
    """Computing a deep prompt's prefix registers hooks on the shared model; a forward running in another
    thread at the same time must not see them."""
    import threading

    from promptbank.inject import _OverwriteHidden

    model = tiny_bank.backbone.model
    layer = decoder_layers(model)[1]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        clean = model.base_model(input_ids=ids).last_hidden_state
    handle = layer.register_forward_pre_hook(_OverwriteHidden(torch.zeros(1, 4, 32)), with_kwargs=True)
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(h=model.base_model(input_ids=ids).last_hidden_state))
        with torch.no_grad():
            t.start()
            t.join()
            hooked = model.base_model(input_ids=ids).last_hidden_state
    finally:
        handle.remove()
    torch.testing.assert_close(result["h"], clean)
    assert not torch.allclose(hooked, clean)


def test_prompt_prefix_cache_is_bounded_and_eviction_changes_nothing(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    tiny_bank.learn_task("fruit", FRUIT, num_virtual_tokens=4, **fast_options())
    texts = ["the weather is sunny today", "i would like to eat a lemon"] * 3
    tasks = ["weather", "fruit"] * 3
    ref = [(p.output, p.label_scores) for p in tiny_bank.predict(texts, tasks, batch_size=1)]
    tiny_bank.kv_cache_size = 1
    for _ in range(3):  # each call needs both tasks: the cache evicts on every miss
        got = [(p.output, p.label_scores) for p in tiny_bank.predict(texts, tasks, batch_size=1)]
        assert got == ref
        assert len(tiny_bank._kv) == 1


def test_bf16_backbone_trains_predicts_and_round_trips(tmp_path, hashing_embedder):
    """load_backbone(dtype=torch.bfloat16) (about 1.5x faster training steps on CPUs with AMX/AVX512-BF16, see
    benchmarks/serving.py --only precision): every method trains, predicts and survives save/load; prompts are
    stored in fp32."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    backbone = from_model(make_tiny_model(len(tok)).to(torch.bfloat16), tok, name="tiny-bf16")
    bank = PromptBank(backbone, hashing_embedder)
    for method in ("prompt_tuning", "ptuning_mlp", "deep"):
        rec = bank.learn_task(f"w_{method}", WEATHER, method=method, num_virtual_tokens=4, **fast_options())
        assert rec.dev_loss < rec.history[0]["dev_loss"]  # it learned
        assert all(t.dtype == torch.float32 for t in bank.soft_prompt(f"w_{method}").values())
    texts = [r["text"] for r in WEATHER[:3]]
    before = bank.predict(texts, task="w_deep")
    bank.save(tmp_path / "b")
    again = PromptBank.load(tmp_path / "b", backbone=backbone, embedder=hashing_embedder)
    assert [p.label_scores for p in again.predict(texts, task="w_deep")] == [p.label_scores for p in before]


@pytest.mark.parametrize("routing", ["lda", "knn"])
def test_one_example_task_learns_and_routes(tiny_backbone, hashing_embedder, routing):
    """One training row and no dev data (the README's one-row example): nothing is held out to calibrate the
    "no task" threshold on. It used to fail deep in the router ("in_task_scores is empty"); now it learns with a
    warning and routes its own input to itself."""
    bank = PromptBank(tiny_backbone, hashing_embedder, routing=routing)
    with pytest.warns(UserWarning, match="one training example and no dev data"):
        rec = bank.learn_task("faq", [{"input": "what are your hours", "target": "9 to 5"}], **fast_options())
    assert rec.kind == "generation"
    assert bank.route("what are your hours").task == "faq"


def test_route_of_a_list_says_to_use_route_many(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    with pytest.raises(TypeError, match=r"route\(\) takes one text, got list; route_many"):
        tiny_bank.route(["the weather is sunny", "rain"])
    assert [r.task for r in tiny_bank.route_many(["the weather is sunny"])] == [
        tiny_bank.route("the weather is sunny").task
    ]


def test_training_inputs_embedded_in_chunks_give_the_same_task(tiny_backbone, hashing_embedder, monkeypatch):
    """A large training set is embedded in chunks (with a progress bar): the keys and threshold are those of one
    call."""
    import promptbank.bank as bank_module

    data = _many_rows(40)
    whole = PromptBank(copy.deepcopy(tiny_backbone), hashing_embedder)
    whole.learn_task("t", data, num_virtual_tokens=2, **fast_options(max_steps=1))
    monkeypatch.setattr(bank_module, "EMBED_CHUNK", 7)
    chunked = PromptBank(copy.deepcopy(tiny_backbone), hashing_embedder)
    chunked.learn_task("t", data, num_virtual_tokens=2, **fast_options(max_steps=1, progress=True))
    np.testing.assert_array_equal(chunked._tasks["t"].keys, whole._tasks["t"].keys)
    assert chunked._tasks["t"].record.threshold == whole._tasks["t"].record.threshold
