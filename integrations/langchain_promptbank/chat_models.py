"""PTunedLLM: a LangChain chat model over a PromptBank's frozen causal LM, one soft prompt per call or per row."""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import run_in_executor
from pydantic import Field, PrivateAttr, model_validator

from promptbank import causal
from promptbank.bank import _max_input_tokens, _max_positions, _truncation_side
from promptbank.errors import TaskNotFoundError

from ._runtime import DTYPES, load_bank_cached, manifest_path, model_lock

logger = logging.getLogger(__name__)

# Per-call options accepted by invoke/stream/batch (besides ``stop``).
_CALL_OPTIONS = ("task", "max_tokens", "temperature", "top_p", "seed")
_MEDIA_BLOCKS = {"image", "image_url", "audio", "input_audio", "video", "file", "document"}

# Results computed by one batched forward in batch()/abatch(), handed to the per-input invoke path.
_PREFETCHED: ContextVar[_Prefetched | None] = ContextVar("langchain_promptbank_prefetched", default=None)


class PTunedLLM(BaseChatModel):
    """A LangChain chat model over the frozen causal LM of a :class:`promptbank.PromptBank`.

    Construct it from a saved bank folder (``PTunedLLM(bank_path="my_bank")``; the model is loaded on first use
    and shared by every PTunedLLM on the same folder and dtype) or from a bank in memory (``PTunedLLM(bank=bank)``).

    Which soft prompt answers is chosen per call with ``task`` (field default, ``invoke(..., task=)`` or
    ``.bind(task=)``):

    - ``None``: no soft prompt. The plain backbone answers the whole conversation through the tokenizer's chat
      template (messages in any order; if the template rejects the order, system messages are moved first and
      consecutive messages of one role are merged).
    - a task name: that task's soft prompt. Soft prompts are trained on the task template around one input
      (``"{input}\\nAnswer:"`` by default), so the model sees exactly that: the template around the content of the
      **last human message**; other messages are not shown to it. Leading whitespace of the answer is dropped
      (targets are trained after a space).
    - ``"auto"``: the last human message is routed by embedding; the chosen task (or ``None`` when no task fits,
      then the plain backbone answers as above) and the route score are in ``response_metadata["task"]`` and
      ``response_metadata["route_score"]``.

    Generation: greedy when ``temperature == 0`` (default), else sampling with ``top_p`` (``seed`` for
    repeatability); at most ``max_tokens`` new tokens; the output is cut at the first ``stop`` string and
    decoding stops once one appears. Only new text is returned. ``usage_metadata`` counts the tokenised input
    (soft-prompt positions are not tokens; their number is ``response_metadata["soft_prompt_tokens"]``) and the
    generated tokens (including a final end-of-sequence token).

    Inputs are fitted as :meth:`promptbank.PromptBank.generate` fits them: a classification task's input is cut to
    its ``max_input_tokens`` as its training inputs were; and where the backbone has a position limit (GPT-2's
    1,024; SmolLM2's 8,192), an input that would not fit with its soft prompt and ``max_tokens`` new tokens is cut
    to its first tokens (a task's input inside its template; with no task, the last human message, the other
    messages and the chat template kept whole), with one warning.

    Streaming yields text token by token (multi-byte characters are never split; text that may be the start of
    a stop string is held back). Decoding runs in the consumer's thread, one forward per ``next()``: there is no
    background thread, an error surfaces in the consumer, and a consumer that stops iterating stops decoding. ``batch()``/``abatch()`` run all inputs through one batched generation (one
    forward per decoding step, each row with its own soft prompt, so ``task="auto"`` gives mixed-task batches)
    and then return each row through LangChain's ordinary per-input path, so callbacks and tracing behave as for
    ``invoke``. Calls are thread-safe: forwards on a shared model take its lock one decoding step at a time, and
    soft prompts are per row (no global adapter switching). Async methods run the sync code in an executor.

    Not supported: tool calling (``bind_tools`` raises ``NotImplementedError``), structured output, images or
    other non-text content, per-call model override.
    """

    bank_path: str | None = None
    """Folder of a saved bank (``PromptBank.save``). Exactly one of ``bank_path`` and ``bank``."""
    bank: Any = Field(default=None, exclude=True)
    """A :class:`promptbank.PromptBank` in memory."""
    backbone: str | None = None
    """With ``bank_path``: load this model folder or name instead of the one recorded in the manifest."""
    embedder: str | None = None
    """With ``bank_path``: routing embedder spec overriding the manifest's (must give the same dimension)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """With ``bank_path``: dtype to load the backbone in (stay in float32 on CPU)."""
    task: str | None = None
    """Default soft prompt: a task name, ``"auto"`` (route) or ``None`` (plain backbone)."""
    model_name: str | None = None
    """Reported as ``response_metadata["model_name"]``; defaults to the backbone's name."""
    max_tokens: int = 256
    """Most new tokens per answer."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the sampling generator (``temperature > 0``); ``None`` uses torch's global generator."""
    stop: list[str] | None = None
    """Default stop strings (a per-call ``stop`` replaces them)."""
    streaming: bool = False
    """Let ``invoke`` go through ``_stream`` (so streaming callbacks get tokens)."""

    _bank: Any = PrivateAttr(default=None)
    _bank_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> PTunedLLM:
        from promptbank import PromptBank
        from promptbank.storage import read_manifest

        if (self.bank is None) == (self.bank_path is None):
            raise ValueError("PTunedLLM needs exactly one of bank_path= (a saved bank folder) or bank= (a PromptBank)")
        if self.bank is not None:
            if not isinstance(self.bank, PromptBank):
                raise TypeError(f"bank must be a promptbank.PromptBank, got {type(self.bank).__name__}")
            tasks, name, kind = set(self.bank.tasks), self.bank.backbone.name, self.bank.backbone.kind
        else:
            manifest = read_manifest(manifest_path(self.bank_path).parent)  # cheap: JSON only, no model
            tasks, name = set(manifest["tasks"]), self.backbone or manifest["backbone"]["name"]
            kind = manifest["backbone"].get("kind", "causal_lm")
        if kind != "causal_lm":
            raise ValueError(
                f"PTunedLLM generates text, so it needs a causal LM bank; this bank's backbone is {kind!r}"
            )
        if self.model_name is None:
            self.model_name = str(name)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _check_options(self.task, self.max_tokens, self.temperature, self.top_p, known=tasks)
        return self

    # ------------------------------------------------------------------ LangChain plumbing
    @property
    def _llm_type(self) -> str:
        return "promptbank"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "bank_path": self.bank_path,
            "dtype": self.dtype,
            "task": self.task,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="promptbank",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else str(self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        raise NotImplementedError(
            "PTunedLLM does not support tool calling: it generates plain text from a frozen causal LM with a "
            "task's soft prompt. Use a tool-calling chat model for agents, and PTunedLLM for the text steps."
        )

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any):
        raise NotImplementedError(
            "PTunedLLM does not support structured output (no tool calling or JSON mode); parse its text output "
            "with an output parser instead."
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the backbone's own tokenizer (no special tokens added)."""
        return self._get_bank().backbone.tokenizer(text, add_special_tokens=False)["input_ids"]

    def get_bank(self):
        """The :class:`promptbank.PromptBank` behind this model (loaded on first use)."""
        return self._get_bank()

    def _get_bank(self):
        if self.bank is not None:
            return self.bank
        with self._bank_lock:
            if self._bank is None:
                self._bank = load_bank_cached(
                    self.bank_path, backbone=self.backbone, embedder=self.embedder, dtype=self.dtype
                )
            return self._bank

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        opts = self._options(stop, kwargs)
        prefetched = _PREFETCHED.get()
        if prefetched is not None:
            result = prefetched.take(self, messages, opts)
            if result is not None:
                return result
        return self._generate_rows([messages], opts)[0]

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The base class reports each chunk to the callbacks (on_llm_new_token); it is not done here.
        opts = self._options(stop, kwargs)
        bank = self._get_bank()
        rows = self._prepare(bank, [messages], opts)
        decoders = [_RowText(bank.backbone.tokenizer, opts.stop, lstrip=rows[0].task is not None)]
        for pieces in self._decode(bank, rows, decoders, opts):
            for _, piece in pieces:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        meta = self._metadata(bank, rows[0], decoders[0])
        last = AIMessageChunk(
            content="",
            usage_metadata=_usage(rows[0], decoders[0]),
            response_metadata=meta,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last, generation_info={"finish_reason": meta["finish_reason"]})

    def _generate_rows(self, messages_list: list[list[BaseMessage]], opts: _Options) -> list[ChatResult]:
        """One batched generation for several conversations (each row with its own soft prompt or none)."""
        bank = self._get_bank()
        rows = self._prepare(bank, messages_list, opts)
        tok = bank.backbone.tokenizer
        decoders = [_RowText(tok, opts.stop, lstrip=r.task is not None) for r in rows]
        for _ in self._decode(bank, rows, decoders, opts):
            pass
        results = []
        for row, dec in zip(rows, decoders):
            meta = self._metadata(bank, row, dec)
            msg = AIMessage(content=dec.text, usage_metadata=_usage(row, dec), response_metadata=meta)
            gen = ChatGeneration(message=msg, generation_info={"finish_reason": meta["finish_reason"]})
            results.append(ChatResult(generations=[gen]))
        return results

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Options:
        extra = set(kwargs) - set(_CALL_OPTIONS) - {"stream"}
        if "model" in extra:
            raise ValueError("PTunedLLM serves one backbone: a per-call model= override is not supported")
        if extra:
            raise TypeError(
                f"PTunedLLM got unexpected keyword arguments {sorted(extra)}; per-call options are "
                f"{', '.join(_CALL_OPTIONS)} and stop"
            )
        opts = _Options(
            task=kwargs.get("task", self.task),
            max_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(stop if stop is not None else (self.stop or ())),
        )
        _check_options(opts.task, opts.max_tokens, opts.temperature, opts.top_p)
        for s in opts.stop:
            if not isinstance(s, str):
                raise TypeError(f"stop sequences must be strings, got {s!r}")
        return opts

    def _prepare(self, bank, messages_list: list[list[BaseMessage]], opts: _Options) -> list[_Row]:
        """Model input of each conversation: task template around the last human message, or chat template."""
        tok = bank.backbone.tokenizer
        chats = [_to_chat(m) for m in messages_list]
        if opts.task == "auto":
            routes = bank.route_many([_last_user_text(c) for c in chats])
            names, scores = [r.task for r in routes], [r.score for r in routes]
        else:
            if opts.task is not None and opts.task not in bank:
                raise TaskNotFoundError(f"no task named {opts.task!r} in the bank (tasks: {', '.join(bank.tasks)})")
            names, scores = [opts.task] * len(chats), [None] * len(chats)
        with model_lock(bank.backbone.model):
            kvs = [None if n is None else bank.prompt_prefix(n) for n in names]
        # a task row: the bank's own input fit (a classification task's input cut to its max_input_tokens as in
        # training; then, like every row, cut on its task's truncation side until soft prompt + input + max_tokens
        # fit the backbone's positions, with one warning)
        tasked = [i for i, n in enumerate(names) if n is not None]
        records = bank.tasks  # one snapshot (built per access)
        fitted = bank._fit_inputs(
            [_last_user_text(chats[i]) for i in tasked],
            [records[names[i]].template for i in tasked],
            [kvs[i] for i in tasked],
            opts.max_tokens,
            "the answer",
            [_max_input_tokens(records[names[i]]) for i in tasked],
            [_truncation_side(records[names[i]]) for i in tasked],
        )
        ids_of = dict(zip(tasked, fitted))
        limit, n_cut = _max_positions(bank.backbone.model), 0
        for i, name in enumerate(names):
            if name is None:
                ids_of[i], cut = _fit_chat(tok, chats[i], limit, opts.max_tokens)
                n_cut += cut
        if n_cut:
            warnings.warn(
                f"cut the last human message of {n_cut} of {len(names)} conversations to fit the backbone's {limit} "
                f"positions (the conversation + up to {opts.max_tokens} tokens of the answer)",
                UserWarning,
                stacklevel=3,
            )
        return [
            _Row(list(ids_of[i]), name, None if score is None else float(score), opts.task == "auto", kv=kv)
            for i, (name, score, kv) in enumerate(zip(names, scores, kvs))
        ]

    def _decode(self, bank, rows: list[_Row], decoders: list[_RowText], opts: _Options) -> Iterator[list]:
        """Run the batched decoding; yield, per step, ``[(row, new text), ...]`` (text already safe to show)."""
        model, tok = bank.backbone.model, bank.backbone.tokenizer
        lock = model_lock(model)
        row_kv = [r.kv for r in rows]
        for row, kv in zip(rows, row_kv):
            row.prompt_tokens = 0 if kv is None else int(kv[0][0].shape[2])
        generator = None
        if opts.seed is not None:
            generator = torch.Generator(device=bank.backbone.device).manual_seed(opts.seed)
        end_ids = causal.end_token_ids(model, tok)
        steps = causal.generate_steps(
            model,
            tok,
            row_kv,
            [r.ids for r in rows],
            max_new_tokens=opts.max_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            generator=generator,
        )
        try:
            while True:
                with lock:  # one forward; released between steps so other threads interleave
                    new = next(steps, None)
                if new is None:
                    break
                pieces = []
                for i, token in enumerate(new):
                    dec = decoders[i]
                    if token is None or dec.done:
                        continue
                    piece = dec.end("stop", counted=True) if token in end_ids else dec.push(token)
                    if piece:
                        pieces.append((i, piece))
                yield pieces
                if all(d.done for d in decoders):
                    break
            tail = [(i, d.end("length")) for i, d in enumerate(decoders) if not d.done]
            if any(piece for _, piece in tail):
                yield [(i, piece) for i, piece in tail if piece]
        finally:
            steps.close()  # a consumer that stops early: no further forward runs

    def _metadata(self, bank, row: _Row, dec: _RowText) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "model_name": self.model_name,
            "model_provider": "promptbank",
            "task": row.task,
            "soft_prompt_tokens": row.prompt_tokens,
            "finish_reason": dec.finish_reason,
        }
        if row.routed:
            meta["route_score"] = row.score
        return meta

    # ------------------------------------------------------------------ batching
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Generate for all inputs in one batched decoding, then return each through the per-input path.

        Falls back to LangChain's default (one ``invoke`` per input, in threads) for a single input, when
        ``streaming=True`` or an LLM cache is set, or when preparing the batch fails (each input then raises its
        own error, or returns it with ``return_exceptions=True``).
        """
        table = self._prefetch(inputs, kwargs) if self._batchable(inputs) else None
        token = _PREFETCHED.set(table) if table is not None else None
        try:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            if token is not None:
                _PREFETCHED.reset(token)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Async :meth:`batch`: the batched decoding runs in an executor thread."""
        table = await run_in_executor(None, self._prefetch, inputs, kwargs) if self._batchable(inputs) else None
        token = _PREFETCHED.set(table) if table is not None else None
        try:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        finally:
            if token is not None:
                _PREFETCHED.reset(token)

    def _batchable(self, inputs: list) -> bool:
        return len(inputs) > 1 and not self.streaming and not self.cache and get_llm_cache() is None

    def _prefetch(self, inputs: list, kwargs: dict[str, Any]) -> _Prefetched | None:
        kwargs = dict(kwargs)
        stop = kwargs.pop("stop", None)
        try:
            opts = self._options(stop, kwargs)
            messages_list = [self._convert_input(x).to_messages() for x in inputs]
            results = self._generate_rows(messages_list, opts)
        except Exception as e:  # the per-input path reports it, input by input
            logger.debug("batched generation not used (%s: %s); generating input by input", type(e).__name__, e)
            return None
        table = _Prefetched(self)
        for messages, result in zip(messages_list, results):
            table.put(messages, opts, result)
        return table


@dataclass(frozen=True)
class _Options:
    task: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass
class _Row:
    ids: list[int]
    task: str | None
    score: float | None
    routed: bool
    prompt_tokens: int = 0
    kv: Any = None
    """The task's soft prompt as its key/value prefix (``PromptBank.prompt_prefix``), ``None`` without a task."""


class _Prefetched:
    """Results of one batched generation, keyed by what determines a row's output (roles, texts, options)."""

    def __init__(self, owner: PTunedLLM):
        self.owner = owner
        self._lock = threading.Lock()
        self._table: dict[tuple, deque[ChatResult]] = {}

    @staticmethod
    def _key(messages: list[BaseMessage], opts: _Options) -> tuple:
        return tuple((m["role"], m["content"]) for m in _to_chat(messages)), opts

    def put(self, messages: list[BaseMessage], opts: _Options, result: ChatResult) -> None:
        with self._lock:
            self._table.setdefault(self._key(messages, opts), deque()).append(result)

    def take(self, owner: PTunedLLM, messages: list[BaseMessage], opts: _Options) -> ChatResult | None:
        if owner is not self.owner:
            return None
        try:
            key = self._key(messages, opts)
        except ValueError:
            return None
        with self._lock:
            queue = self._table.get(key)
            return queue.popleft() if queue else None


class _RowText:
    """One row's text: incremental detokenisation, then stop strings (text that may begin one is held back)."""

    def __init__(self, tokenizer, stop: Sequence[str], *, lstrip: bool):
        self.detok = causal.IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self.lstrip = lstrip
        self.raw = ""  # decoded text so far (may run past a stop string)
        self.sent = 0  # characters of raw already handed out
        self.n_tokens = 0
        self.done = False
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.raw[: self.sent]

    def push(self, token_id: int) -> str:
        self.n_tokens += 1
        self.raw += self.detok.push(token_id)
        return self._release(final=False)

    def end(self, reason: str, *, counted: bool = False) -> str:
        """Finish the row (``counted``: the end token was generated and counts as output)."""
        self.n_tokens += int(counted)
        self.raw += self.detok.flush()
        piece = self._release(final=True)
        self.done = True
        self.finish_reason = self.finish_reason or reason
        return piece

    def _release(self, final: bool) -> str:
        if self.lstrip and self.sent == 0:
            self.raw = self.raw.lstrip()
        # Released text never ends with the start of a stop string, so a stop can only begin at >= sent.
        hits = [i for i in (self.raw.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.raw = self.raw[:end]
            self.done, self.finish_reason = True, "stop"
        elif final:
            end = len(self.raw)
        else:
            end = len(self.raw) - _partial_stop(self.raw, self.stop)
        piece = self.raw[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _usage(row: _Row, dec: _RowText) -> UsageMetadata:
    n_in, n_out = len(row.ids), dec.n_tokens
    return UsageMetadata(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)


def _check_options(task, max_tokens, temperature, top_p, *, known: set[str] | None = None) -> None:
    if task is not None and not isinstance(task, str):
        raise TypeError(f"task must be a task name, 'auto' or None, got {task!r}")
    if known is not None and task not in (None, "auto") and task not in known:
        raise TaskNotFoundError(f"no task named {task!r} in the bank (tasks: {', '.join(sorted(known)) or 'none'})")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


# ---------------------------------------------------------------------- messages -> model input
def _role(m: BaseMessage) -> str:
    if isinstance(m, ChatMessage):
        return m.role
    for cls, role in (
        (SystemMessage, "system"),
        (HumanMessage, "user"),
        (AIMessage, "assistant"),
        (ToolMessage, "tool"),
        (FunctionMessage, "function"),
    ):
        if isinstance(m, cls):
            return role
    raise ValueError(f"PTunedLLM cannot take a {type(m).__name__}")


def _to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("PTunedLLM needs at least one message")
    chat = []
    for m in messages:
        if isinstance(m.content, list):
            for block in m.content:
                if isinstance(block, dict) and block.get("type") in _MEDIA_BLOCKS:
                    raise ValueError(f"PTunedLLM takes text only; got a {block['type']!r} block in a {m.type} message")
        chat.append({"role": _role(m), "content": m.text})
    return chat


def _last_user_text(chat: list[dict[str, str]]) -> str:
    """The text a task's soft prompt is applied to: the last human message (or, with none, the last message)."""
    for m in reversed(chat):
        if m["role"] == "user":
            return m["content"]
    return chat[-1]["content"]


def _fit_chat(tokenizer, chat: list[dict[str, str]], limit: int | None, reserve: int) -> tuple[list[int], bool]:
    """Token ids of the conversation rendered for the plain backbone (:func:`_render_chat`), at most ``limit -
    reserve`` of them (the backbone's positions less the answer's tokens): if it is longer, the last human message
    is cut to its first tokens until it fits (as the bank cuts an over-long input; the chat template's own tokens
    stay). Returns ``(ids, whether it was cut)``; ``limit=None`` (no position limit): never cut. Raises
    ``ValueError`` when even one token of that message leaves no room."""
    room = None if limit is None else limit - reserve
    ids = _chat_ids(tokenizer, chat)
    if room is None or len(ids) <= room:
        return list(ids), False
    last = max((i for i, m in enumerate(chat) if m["role"] == "user"), default=len(chat) - 1)
    tokens = tokenizer(chat[last]["content"], add_special_tokens=False, verbose=False)["input_ids"]
    keep = len(tokens) - (len(ids) - room)
    while keep >= 1:
        text = tokenizer.decode(tokens[:keep], skip_special_tokens=True)
        cut = [*chat[:last], {**chat[last], "content": text}, *chat[last + 1 :]]
        ids = _chat_ids(tokenizer, cut)
        if len(ids) <= room:
            return list(ids), True
        keep -= 1  # re-tokenizing a cut text can give more tokens (merges across the cut)
    raise ValueError(
        f"the backbone's {limit} positions leave no room for the conversation: its other messages, the chat "
        f"template and up to {reserve} tokens of the answer take them all"
    )


def _chat_ids(tokenizer, chat: list[dict[str, str]]) -> list[int]:
    """Token ids of :func:`_render_chat`'s text (a leading BOS token as its id, as :func:`causal.encode_input`)."""
    return list(causal.encode_input(tokenizer, _render_chat(tokenizer, chat), "{input}"))


def _render_chat(tokenizer, chat: list[dict[str, str]]) -> str:
    """The conversation through the tokenizer's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):  # (a chat template writes the BOS token itself, if any)
        return (
            (causal.bos_text(tokenizer) or "") + "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
        )
    errors = []
    for candidate in _orderings(chat):
        try:
            return tokenizer.apply_chat_template(candidate, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # templates raise (jinja2 TemplateError, ...) on orders they do not accept
            errors.append(f"{type(e).__name__}: {e}")
    raise ValueError(f"the tokenizer's chat template rejected these messages: {errors[-1]}")


def _orderings(chat: list[dict[str, str]]) -> Iterator[list[dict[str, str]]]:
    """The messages as given, then with system messages first and runs of one role merged, then with the
    system text folded into the first user message (for templates without a system role)."""
    yield chat
    system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
    merged: list[dict[str, str]] = []
    for m in chat:
        if m["role"] == "system":
            continue
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    yield ([{"role": "system", "content": system}] if system else []) + merged
    if system:
        if merged and merged[0]["role"] == "user":
            folded = [{"role": "user", "content": system + "\n\n" + merged[0]["content"]}, *merged[1:]]
        else:
            folded = [{"role": "user", "content": system}, *merged]
        yield folded
