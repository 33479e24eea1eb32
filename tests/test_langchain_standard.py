"""langchain-tests standard suites for the LangChain integration, on a tiny bank: a tiny GQA Llama saved to a folder
(the tiny byte-level tokenizer with a simple chat template), two tasks learned in a few steps, hashing embedder.
The tiny model writes garbage, which is all the suites need.

Expected skips, all for features PTunedLLM does not claim: tool calling, structured output, JSON mode,
multimodal inputs, per-call model override, LangChain serialisation, init from environment variables (no API
keys), VCR timing. The async tests need pytest-asyncio with ``asyncio_mode = "auto"`` (set in pyproject.toml).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import fast_options, make_tiny_model, make_tiny_tokenizer

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import (  # noqa: E402
    ChatModelIntegrationTests,
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests  # noqa: E402

from langchain_promptbank import FaissRetriever, PromptBankEmbeddings, PTunedLLM  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WEATHER = [
    ("will it rain tomorrow in the city", "rain"),
    ("sunny skies and warm weather today", "sun"),
    ("heavy rain and storm clouds tonight", "rain"),
    ("clear sunny morning with no clouds", "sun"),
    ("is rain expected this weekend", "rain"),
    ("bright sun and blue sky all day", "sun"),
    ("drizzle and showers over the hills", "rain"),
    ("hot sunny afternoon at the beach", "sun"),
]
BILLING = [
    {"input": "my card was charged twice for the invoice", "target": "refund"},
    {"input": "please send a copy of my invoice payment", "target": "invoice"},
    {"input": "refund the double charge on my card", "target": "refund"},
    {"input": "invoice total does not match the payment", "target": "invoice"},
    {"input": "charged again after cancelling my card payment", "target": "refund"},
    {"input": "where can I download the invoice for payment", "target": "invoice"},
    {"input": "the payment card charge needs a refund", "target": "refund"},
    {"input": "wrong invoice amount on my card payment", "target": "invoice"},
]


@functools.lru_cache(maxsize=1)
def tiny_bank_dir() -> Path:
    """Build the tiny bank once per process: ``<tmp>/model`` (model + tokenizer) and ``<tmp>/bank``."""
    from promptbank import PromptBank
    from promptbank.backbone import load_backbone
    from promptbank.embed import HashingEmbedder

    root = Path(tempfile.mkdtemp(prefix="promptbank-lc-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    make_tiny_model(len(tok), seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    bank = PromptBank(load_backbone(root / "model"), HashingEmbedder(dim=128))
    bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    bank.learn_task("billing", BILLING, method="deep", num_virtual_tokens=3, **fast_options())
    bank.save(root / "bank")
    return root / "bank"


class _NoTools:
    # bind_tools is overridden only to raise a clear error, so the suites' autodetection must be told.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False


class TestPTunedLLMUnit(_NoTools, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[PTunedLLM]:
        return PTunedLLM

    @property
    def chat_model_params(self) -> dict:
        return {"bank_path": str(tiny_bank_dir())}


class TestPTunedLLMIntegration(_NoTools, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[PTunedLLM]:
        return PTunedLLM

    @property
    def chat_model_params(self) -> dict:
        return {"bank_path": str(tiny_bank_dir()), "max_tokens": 8}


class TestPTunedLLMIntegrationWithTask(TestPTunedLLMIntegration):
    """The same suite with a soft prompt on every call (deep prompt: per-layer prefixes)."""

    @property
    def chat_model_params(self) -> dict:
        return {**super().chat_model_params, "task": "billing"}


class TestEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[PromptBankEmbeddings]:
        return PromptBankEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"embedder": "hashing-64"}


class TestEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[PromptBankEmbeddings]:
        return PromptBankEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"embedder": "hashing-64"}


class TestFaissRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[FaissRetriever]:
        return FaissRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        texts = [q for q, _ in WEATHER] + [r["input"] for r in BILLING]
        return {"texts": texts, "embeddings": PromptBankEmbeddings("hashing-64"), "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "is it going to rain"
