"""Focused tests of the LangChain integration on the tiny bank of test_langchain_standard (garbage text, real
mechanics): step-wise decoding, incremental detokenisation, task choice and routing metadata, stop strings,
streaming == invoke, usage counts, real batching, thread safety, embeddings, retriever and the RAG chain."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import make_tiny_tokenizer

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from test_langchain_standard import BILLING, WEATHER, tiny_bank_dir  # noqa: E402

from langchain_promptbank import (  # noqa: E402
    FaissRetriever,
    PromptBankEmbeddings,
    PTunedLLM,
    build_rag_chain,
    format_answer_input,
)
from langchain_promptbank.chat_models import _render_chat  # noqa: E402
from promptbank import PromptBank, TaskNotFoundError, causal  # noqa: E402
from promptbank.inject import prompt_kv  # noqa: E402

QUERIES = ["will it rain tonight", "refund my card charge", "hello there", "sunny beach day"]


@pytest.fixture(scope="module")
def bank_dir():
    return tiny_bank_dir()


@pytest.fixture
def llm(bank_dir):
    return PTunedLLM(bank_path=str(bank_dir), max_tokens=12)


@pytest.fixture
def fresh_bank(bank_dir, llm):
    """A bank object of its own (empty prompt-prefix cache) on the shared tiny backbone."""
    return PromptBank.load(bank_dir, backbone=llm.get_bank().backbone)


# ---------------------------------------------------------------------- promptbank additions
def test_generate_steps_matches_generate(llm):
    bank = llm.get_bank()
    model, tok = bank.backbone.model, bank.backbone.tokenizer
    kv = [bank.prompt_prefix("weather"), None, bank.prompt_prefix("billing")]
    inputs = [causal.encode_input(tok, q) for q in QUERIES[:3]]
    for temperature in (0.0, 0.8):
        ref = causal.generate(
            model,
            tok,
            kv,
            inputs,
            max_new_tokens=9,
            temperature=temperature,
            generator=torch.Generator().manual_seed(3),
        )
        rows = [[] for _ in inputs]
        ended = [False] * len(inputs)
        gen = torch.Generator().manual_seed(3)
        for new in causal.generate_steps(
            model, tok, kv, inputs, max_new_tokens=9, temperature=temperature, generator=gen
        ):
            for b, t in enumerate(new):
                if t is None:
                    assert ended[b]
                elif t == tok.eos_token_id:
                    ended[b] = True
                else:
                    rows[b].append(t)
        assert rows == ref


def test_generate_steps_stops_when_closed(llm):
    bank = llm.get_bank()
    model, tok = bank.backbone.model, bank.backbone.tokenizer
    calls = []
    handle = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        steps = causal.generate_steps(model, tok, [None], [causal.encode_input(tok, "hi")], max_new_tokens=50)
        next(steps)
        next(steps)
        steps.close()
    finally:
        handle.remove()
    assert len(calls) == 2  # prefill + one decoding step; nothing after close


def test_incremental_detokenizer_never_splits_characters(llm):
    tok = llm.get_bank().backbone.tokenizer
    text = "héllo wörld — 日本語 🎉 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    detok = causal.IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    # Invalid bytes (what a tiny random model emits) decode the same way streamed or at once.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok) - 3, (200,), generator=gen).tolist()
    detok = causal.IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True)


def test_prompt_prefix_is_cached_and_exact(fresh_bank):
    kv = fresh_bank.prompt_prefix("billing")
    assert fresh_bank.prompt_prefix("billing") is kv
    ref = prompt_kv(fresh_bank.backbone.model, fresh_bank.soft_prompt("billing"))
    assert all(torch.allclose(a, b) and torch.allclose(c, d) for (a, c), (b, d) in zip(kv, ref))
    with pytest.raises(TaskNotFoundError):
        fresh_bank.prompt_prefix("nope")


# ---------------------------------------------------------------------- PTunedLLM: construction
def test_construction_is_cheap_and_shares_the_model(bank_dir):
    a = PTunedLLM(bank_path=str(bank_dir))
    b = PTunedLLM(bank_path=str(bank_dir), task="weather")
    assert a._bank is None  # nothing loaded until first use
    assert a.get_bank() is b.get_bank()
    assert a.model_name == str(bank_dir.parent / "model")
    with pytest.raises(ValueError, match="exactly one"):
        PTunedLLM()
    with pytest.raises(ValueError, match="exactly one"):
        PTunedLLM(bank_path=str(bank_dir), bank=a.get_bank())
    with pytest.raises(TaskNotFoundError):
        PTunedLLM(bank_path=str(bank_dir), task="nope")
    with pytest.raises(TaskNotFoundError):
        a.invoke("hi", task="nope")
    with pytest.raises(TypeError, match="unexpected keyword"):
        a.invoke("hi", colour="blue")


def test_rejects_encoder_banks():
    from transformers import BertConfig, BertModel

    from promptbank.backbone import from_model
    from promptbank.embed import HashingEmbedder

    tok = make_tiny_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    bank = PromptBank(from_model(BertModel(cfg), tok, name="tiny-bert"), HashingEmbedder(dim=32))
    with pytest.raises(ValueError, match="causal LM"):
        PTunedLLM(bank=bank)


def test_from_bank_object_and_token_ids(llm):
    bank = llm.get_bank()
    other = PTunedLLM(bank=bank, max_tokens=12)
    assert other.invoke("hello").content == llm.invoke("hello").content
    assert other.get_token_ids("héllo") == bank.backbone.tokenizer("héllo", add_special_tokens=False)["input_ids"]


def test_no_tool_calling_or_structured_output(llm):
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.bind_tools([])
    with pytest.raises(NotImplementedError, match="structured output"):
        llm.with_structured_output({"type": "object"})


# ---------------------------------------------------------------------- PTunedLLM: what the model sees
def test_task_applies_template_to_last_human_message(llm):
    bank = llm.get_bank()
    q = QUERIES[1]
    messages = [SystemMessage("be brief"), HumanMessage("earlier"), AIMessage("ok"), HumanMessage(q)]
    for task in ("weather", "billing"):
        out = llm.invoke(messages, task=task)
        assert out.content.rstrip() == bank.generate([q], task=task, max_new_tokens=12)[0]  # generate strips both ends
        assert out.response_metadata["task"] == task
        assert "route_score" not in out.response_metadata
        assert out.response_metadata["soft_prompt_tokens"] == bank.soft_prompt(task)[0].shape[0]
    assert llm.bind(task="billing").invoke(messages).content == llm.invoke(messages, task="billing").content


def test_no_task_uses_chat_template_over_all_messages(llm):
    bank = llm.get_bank()
    model, tok = bank.backbone.model, bank.backbone.tokenizer
    messages = [AIMessage("first"), SystemMessage("sys"), HumanMessage("hi"), HumanMessage("again")]
    chat = [
        {"role": "assistant", "content": "first"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    ids = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    out = llm.invoke(messages)
    assert out.content == tok.decode(causal.generate(model, tok, [None], [ids], max_new_tokens=12)[0])
    assert out.usage_metadata["input_tokens"] == len(ids)
    assert out.response_metadata["task"] is None


def test_chat_template_fallback_reorders_for_strict_templates(llm):
    tok = copy.deepcopy(llm.get_bank().backbone.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system must come first') }}{% endif %}"
        "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    chat = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "b"},
    ]
    assert _render_chat(tok, chat) == "[system]s[user]a\n\nb[assistant]"


def test_auto_routes_and_reports_task_and_score(llm):
    bank = llm.get_bank()
    auto = llm.bind(task="auto")
    for q in [*QUERIES, WEATHER[0][0], BILLING[0]["input"]]:
        route = bank.route(q)
        out = auto.invoke([SystemMessage("ignored for routing"), HumanMessage(q)])
        assert out.response_metadata["task"] == route.task
        assert out.response_metadata["route_score"] == pytest.approx(route.score)
        expected = llm.invoke(q, task=route.task).content if route.task else None
        if expected is not None:
            assert out.content == expected
    assert {llm.invoke(q, task="auto").response_metadata["task"] for q in (WEATHER[1][0], BILLING[1]["input"])} == {
        "weather",
        "billing",
    }


# ---------------------------------------------------------------------- stop, streaming, usage
@pytest.mark.parametrize("task", [None, "weather"])
def test_stop_sequences_cut_output_and_stop_generation(llm, task):
    full = llm.invoke("hello there", task=task, max_tokens=16)
    text = full.content
    assert full.usage_metadata["output_tokens"] == 16 and len(text) >= 6
    stop = text[3:5]
    expected = text[: text.find(stop)]
    out = llm.invoke("hello there", task=task, max_tokens=16, stop=[stop, "never-appears"])
    assert out.content == expected
    assert out.response_metadata["finish_reason"] == "stop"
    assert out.usage_metadata["output_tokens"] < 16  # decoding stopped once the stop string appeared
    streamed = "".join(c.content for c in llm.stream("hello there", task=task, max_tokens=16, stop=[stop]))
    assert streamed == expected
    default_stop = llm.model_copy(update={"stop": [stop]})
    assert default_stop.invoke("hello there", task=task, max_tokens=16).content == expected


@pytest.mark.parametrize("task", [None, "billing", "auto"])
def test_stream_equals_invoke(llm, task):
    for q in QUERIES[:2]:
        ref = llm.invoke(q, task=task)
        chunks = list(llm.stream(q, task=task))
        assert len(chunks) > 2
        assert "".join(c.content for c in chunks) == ref.content
        last = chunks[-1]
        assert last.chunk_position == "last"
        assert last.usage_metadata == ref.usage_metadata
        assert last.response_metadata["task"] == ref.response_metadata["task"]
        assert sum(1 for c in chunks if c.usage_metadata) == 1


async def _astream_text(llm, q):
    return "".join([c.content async for c in llm.astream(q)])


def test_astream_and_ainvoke_equal_invoke(llm):
    import asyncio

    ref = llm.invoke("hello there").content
    assert asyncio.run(_astream_text(llm, "hello there")) == ref
    assert asyncio.run(llm.ainvoke("hello there")).content == ref


def test_usage_counts_real_tokens(llm):
    bank = llm.get_bank()
    tok = bank.backbone.tokenizer
    out = llm.invoke("refund my card", task="billing", max_tokens=5)
    n_in = len(causal.encode_input(tok, "refund my card", bank.tasks["billing"].template))
    assert out.usage_metadata == {"input_tokens": n_in, "output_tokens": 5, "total_tokens": n_in + 5}
    assert out.response_metadata["finish_reason"] == "length"


def test_stream_consumer_can_stop_early_and_errors_reach_it(llm, monkeypatch):
    stream = llm.stream("hello there", max_tokens=50)
    next(stream)
    stream.close()
    assert llm.invoke("hello there").content  # the model lock was released

    def broken(*args, **kwargs):
        yield [65]
        raise RuntimeError("forward failed")

    monkeypatch.setattr(causal, "generate_steps", broken)
    with pytest.raises(RuntimeError, match="forward failed"):
        for _ in llm.stream("hello there"):
            pass


# ---------------------------------------------------------------------- batching and threads
def _count_decodings(monkeypatch):
    calls = []
    real = causal.generate_steps

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(causal, "generate_steps", counting)
    return calls


def test_batch_is_one_decoding_and_equals_per_item(llm, monkeypatch):
    singles = [llm.invoke(q, task="auto") for q in QUERIES]
    calls = _count_decodings(monkeypatch)
    batched = llm.batch(QUERIES, task="auto")
    assert calls == [len(QUERIES)]  # one batched decoding of every row, mixed tasks
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.response_metadata["task"] for m in batched] == [m.response_metadata["task"] for m in singles]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in singles]
    assert len({m.id for m in batched}) == len(QUERIES)

    import asyncio

    calls.clear()
    abatched = asyncio.run(llm.bind(task="auto").abatch(QUERIES))
    assert calls == [len(QUERIES)]
    assert [m.content for m in abatched] == [m.content for m in singles]


def test_batch_falls_back_per_item_on_bad_input(llm):
    out = llm.batch(["hello there", []], return_exceptions=True)
    assert out[0].content == llm.invoke("hello there").content
    assert isinstance(out[1], ValueError)


def test_thread_safety_eight_threads(fresh_bank):
    llm = PTunedLLM(bank=fresh_bank, max_tokens=10)  # prefixes not computed yet: computed under contention
    jobs = [(q, t) for q in QUERIES[:2] for t in ("weather", "billing", None, "auto")]
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs))

    def work(i, q, t):
        barrier.wait()
        results[i] = llm.invoke(q, task=t).content

    threads = [threading.Thread(target=work, args=(i, q, t)) for i, (q, t) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [results[i] for i in range(len(jobs))] == [llm.invoke(q, task=t).content for q, t in jobs]


# ---------------------------------------------------------------------- embeddings, retriever, RAG
def test_embeddings_from_bank(llm):
    bank = llm.get_bank()
    emb = PromptBankEmbeddings(bank=bank)
    vec = emb.embed_query("rain")
    assert vec == pytest.approx(bank.embedder.encode(["rain"])[0].tolist())
    assert len(emb.embed_documents(["a", "b"])) == 2 and emb.dim == len(vec)
    with pytest.raises(ValueError):
        PromptBankEmbeddings("hashing-8", bank=bank)


def test_faiss_retriever_ranks_by_cosine():
    emb = PromptBankEmbeddings("hashing-128")
    texts = [q for q, _ in WEATHER] + [r["input"] for r in BILLING]
    retriever = FaissRetriever(texts=texts, metadatas=[{"i": i} for i in range(len(texts))], embeddings=emb, k=3)
    docs = retriever.invoke("refund the double charge")
    assert len(docs) == 3 and docs[0].page_content == "refund the double charge on my card"
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    import numpy as np

    sims = np.asarray(emb.embed_documents(texts)) @ np.asarray(emb.embed_query("refund the double charge"))
    assert [d.metadata["i"] for d in docs] == list(np.argsort(-sims)[:3])
    assert len(retriever.invoke("rain", k=len(texts) + 5)) == len(texts)
    assert FaissRetriever(documents=[], embeddings=emb).invoke("x") == []
    assert FaissRetriever.from_documents([Document("only")], emb, k=2).invoke("x")[0].page_content == "only"
    with pytest.raises(ValueError):
        FaissRetriever(texts=["a"], embeddings=emb, k=0)


def test_rag_chain(llm):
    emb = PromptBankEmbeddings(bank=llm.get_bank())
    texts = [q for q, _ in WEATHER] + [r["input"] for r in BILLING]
    retriever = FaissRetriever(texts=texts, embeddings=emb, k=5)
    q = "my card was charged twice"

    plain = build_rag_chain(llm, retriever, k=2).invoke(q)
    assert set(plain) == {"question", "query", "docs", "answer"}
    assert plain["query"] == q and len(plain["docs"]) == 2
    assert plain["docs"] == retriever.invoke(q, k=2)

    tuned = build_rag_chain(llm, retriever, rewrite_task="weather", answer_task="billing", k=3).invoke({"question": q})
    rewrite = llm.invoke(q, task="weather").content
    assert tuned["query"] == (rewrite.strip() or q)
    assert tuned["docs"] == retriever.invoke(tuned["query"], k=3)
    answer = llm.invoke([HumanMessage(format_answer_input(q, tuned["docs"]))], task="billing").content
    assert tuned["answer"] == answer

    appended = build_rag_chain(llm, retriever, rewrite_task="weather", query_mode="append").invoke(q)
    assert appended["query"] in (q, f"{q}\n{rewrite.strip()}")
    with pytest.raises(TypeError):
        build_rag_chain(llm, retriever).invoke(3)


# ---------------------------------------------------------------------- real default models
@pytest.mark.real_model
def test_readme_rag_example_and_multibyte_streaming_on_real_models():
    """The README example runs as written; on SmolLM2's byte-level BPE, streaming equals invoke with accents."""
    import re
    from pathlib import Path

    import langchain_promptbank

    readme = Path(langchain_promptbank.__file__).with_name("README.md").read_text(encoding="utf-8")
    scope: dict = {}
    exec(re.findall(r"```python\n(.*?)```", readme, re.S)[0], scope)  # noqa: S102 - our own README
    out, llm = scope["out"], scope["llm"]
    assert out["docs"][0].page_content.startswith("Canberra") and out["answer"].strip()

    q = "Write the French word for coffee, with its accent."
    ref = llm.invoke(q, max_tokens=8)
    chunks = [c.content for c in llm.stream(q, max_tokens=8)]
    assert "".join(chunks) == ref.content and not any("\ufffd" in c for c in chunks)
    assert ref.usage_metadata["output_tokens"] <= 8


def test_sampling_options(llm):
    greedy = llm.invoke("hello there", task="weather").content
    a = llm.invoke("hello there", task="weather", temperature=1.5, seed=7).content
    assert a == llm.invoke("hello there", task="weather", temperature=1.5, seed=7).content
    assert a != greedy or a != llm.invoke("hello there", task="weather", temperature=1.5, seed=8).content
    assert llm.invoke("hello there", max_tokens=3).usage_metadata["output_tokens"] == 3
    assert llm.model_copy(update={"streaming": True}).invoke("hello there").content == llm.invoke("hello there").content
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": -2}):
        with pytest.raises(ValueError):
            llm.invoke("hi", **bad)
