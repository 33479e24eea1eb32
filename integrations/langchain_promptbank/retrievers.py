"""FaissRetriever: a LangChain retriever over an in-memory list of texts or Documents (FAISS inner product)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import PrivateAttr, model_validator


class FaissRetriever(BaseRetriever):
    """The ``k`` documents most similar to the query by cosine similarity of their embeddings (exact search in a
    FAISS ``IndexFlatIP``, fine to ~10^5 documents). langchain-core only (no langchain-community).

    >>> retriever = FaissRetriever(texts=["Paris is in France.", "Rome is in Italy."], embeddings=emb, k=1)
    >>> retriever.invoke("Where is Rome?")            # [Document("Rome is in Italy.", metadata={"score": ...})]
    >>> retriever.invoke("Where is Rome?", k=2)       # per-call k

    Returned documents are copies with the similarity in ``metadata["score"]``.
    """

    documents: list[Document]
    """The documents searched (``texts=`` and optional ``metadatas=`` are accepted instead)."""
    embeddings: Embeddings
    """Embeds the documents (once, at construction) and the queries."""
    k: int = 4
    """Number of documents returned (fewer if there are fewer documents)."""

    _index: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _texts_to_documents(cls, data: Any) -> Any:
        if isinstance(data, dict) and "texts" in data:
            data = dict(data)
            texts = data.pop("texts")
            metadatas = data.pop("metadatas", None) or [{} for _ in texts]
            if len(metadatas) != len(texts):
                raise ValueError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
            if "documents" in data:
                raise ValueError("give either texts= or documents=, not both")
            data["documents"] = [Document(page_content=t, metadata=dict(m)) for t, m in zip(texts, metadatas)]
        return data

    @model_validator(mode="after")
    def _build_index(self) -> FaissRetriever:
        import faiss

        _check_k(self.k)
        if self.documents:
            vectors = _normalise(self.embeddings.embed_documents([d.page_content for d in self.documents]))
            self._index = faiss.IndexFlatIP(vectors.shape[1])
            self._index.add(vectors)
        return self

    @classmethod
    def from_texts(
        cls, texts: list[str], embeddings: Embeddings, *, metadatas: list[dict] | None = None, k: int = 4
    ) -> FaissRetriever:
        return cls(texts=texts, metadatas=metadatas, embeddings=embeddings, k=k)

    @classmethod
    def from_documents(cls, documents: list[Document], embeddings: Embeddings, *, k: int = 4) -> FaissRetriever:
        return cls(documents=documents, embeddings=embeddings, k=k)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return self.search_by_vector(self.embeddings.embed_query(query), k=k)

    def search_by_vector(self, vector: Sequence[float], *, k: int | None = None) -> list[Document]:
        """The ``k`` documents most similar to an embedding ``vector`` (normalised here), best first."""
        k = self.k if k is None else _check_k(k)
        if self._index is None:
            return []
        q = _normalise([list(vector)])
        if q.shape[1] != self._index.d:
            raise ValueError(f"query vector has dimension {q.shape[1]}, the documents {self._index.d}")
        scores, ids = self._index.search(q, min(k, len(self.documents)))
        out = []
        for score, i in zip(scores[0], ids[0]):
            doc = self.documents[int(i)]
            out.append(
                Document(page_content=doc.page_content, metadata={**doc.metadata, "score": float(score)}, id=doc.id)
            )
        return out

    def search_fused(
        self, queries: Sequence[str], weights: Sequence[float] | None = None, *, k: int | None = None
    ) -> list[Document]:
        """Rank documents by a weighted sum of their cosine similarities to several queries.

        ``sum_i weights[i] * cos(query_i, doc)`` equals the inner product of the doc with
        ``sum_i weights[i] * unit(query_i)``, so this is one exact search (scores in ``metadata["score"]`` are that
        sum divided by the vector's norm, which does not change the order). ``weights`` default to 1 each.
        Used by :func:`~langchain_promptbank.build_rag_chain` with ``query_mode="fuse"`` (question + rewrite).
        """
        queries = list(queries)
        weights = [1.0] * len(queries) if weights is None else [float(w) for w in weights]
        if not queries or len(weights) != len(queries):
            raise ValueError(f"need one weight per query and at least one query; got {len(queries)}, {len(weights)}")
        if not all(np.isfinite(weights)) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        if self._index is None:
            return []
        return self.search_by_vector(fuse_vectors(self.embeddings.embed_documents(queries), weights), k=k)


def fuse_vectors(vectors: Sequence[Sequence[float]], weights: Sequence[float]) -> np.ndarray:
    """``sum_i weights[i] * vectors[i] / |vectors[i]|``: the query whose inner product with a unit document
    vector is the weighted sum of the cosine similarities."""
    x = _normalise([list(v) for v in vectors])
    return (np.asarray(weights, dtype=np.float32)[:, None] * x).sum(0)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _normalise(vectors: list[list[float]]) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"embeddings must be finite (n, d) vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))
