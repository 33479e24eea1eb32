"""PromptBank: one frozen backbone, one trained soft prompt per task, routed by embedding keys."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import causal
from .backbone import Backbone, load_backbone
from .config import DEFAULT_LR, DEFAULT_LR_ENCODER, Method, PromptConfig, TrainConfig, resolve_truncation_side
from .embed import ROUTING_EMBEDDER, Embedder, load_embedder
from .errors import (
    AdapterError,
    ResumeError,
    TaskChangedError,
    TaskExistsError,
    TaskNotFoundError,
    VariantExistsError,
    VariantNotFoundError,
)
from .inject import PrefixKV, model_device, prompt_kv
from .lda import ROUTING_SCORERS, GaussianRouter
from .manifest import DEFAULT_VARIANT, validate_task_name
from .metrics import exact_match, f1_score, macro_f1
from .prompts import build_prompt_module, describe_task, text_init_ids, token_init, vocab_init_ids
from .router import Router, calibrate_threshold, make_prototypes
from .tasks import (
    TaskData,
    check_label_words,
    cut_to_tokens,
    keep_ids,
    label_texts,
    load_task_data,
    split_dev,
    truncate_inputs,
    warn_long_targets,
)
from .train import TrainResult, balanced_mean, dev_loss, effective_precision, train_loop, train_soft_prompt

logger = logging.getLogger(__name__)

# A task's routing score is the mean similarity of its 3 best keys (more robust than the single nearest key).
ROUTER_TOP_KEYS = 3
# Prompt prefix caches kept per bank, least recently used evicted beyond either limit: at most KV_CACHE_SIZE tasks
# (`bank.kv_cache_size`) and at most KV_CACHE_FRACTION of the backbone's parameter bytes (`bank.kv_cache_bytes`).
KV_CACHE_SIZE = 256
KV_CACHE_FRACTION = 0.05
# import_peft's input format for an adapter from outside a bank: the raw text, as PEFT feeds it
PEFT_TEMPLATE = "{input}"
# learn_task with progress on embeds a large training set this many inputs at a time, under a progress bar
EMBED_CHUNK = 1024
# predict / evaluate (classification) with progress=True run this many batches of rows per call, then move their
# progress bar (generation moves it after every batch)
EVAL_CHUNK = 16


@dataclass
class TaskRecord:
    """What the bank knows about one task (stored in the manifest)."""

    name: str
    kind: str  # "classification" | "generation"
    labels: list[str] | None
    prompt_config: dict[str, Any]
    train_config: dict[str, Any]
    template: str
    num_train: int
    num_dev: int
    steps: int
    best_step: int
    dev_loss: float | None
    dev_accuracy: float | None
    train_seconds: float
    threshold: float
    warm_start_from: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    variant: str = DEFAULT_VARIANT  # name of this prompt variant (in bank.tasks: the serving one)
    imported_from: dict[str, Any] | None = None  # import_peft: adapter file, its sha256, peft_type, base model
    label_words: dict[str, str] | None = None  # classification on a causal LM: label -> the text the model reads
    routing_examples: int = 0  # add_routing_examples: the task's last this many routing keys were added after training

    @property
    def label_texts(self) -> list[str] | None:
        """The text a causal LM ranks for each label (its label word, else the label itself); ``None`` for
        generation."""
        return label_texts(self.labels, self.label_words) if self.labels else None

    @property
    def method(self) -> Method:
        return Method(self.prompt_config["method"])

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data; ``variant``, ``imported_from``, ``label_words`` and ``routing_examples``
        are left out at their defaults (so a bank that uses none of them is readable by promptbank versions that
        predate them)."""
        d = asdict(self)
        if d["variant"] == DEFAULT_VARIANT:
            del d["variant"]
        if not d["routing_examples"]:
            del d["routing_examples"]
        for key in ("imported_from", "label_words"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        return cls(**data)


@dataclass
class Routing:
    """Result of :meth:`PromptBank.route`: the chosen task (``None`` = no task fits) and the ranking.

    ``score`` is the first-ranked task's score and ``threshold`` its "no task" threshold, on the same scale (both
    ``None`` when the bank has no task). ``guard`` is a second check of the learned router, present when it ranks
    tasks by label groups and its per-task Gaussians put another task first: ``(that task, its score, its
    threshold)`` (see :meth:`promptbank.lda.GaussianRouter.route_guarded`). The first-ranked task is chosen when
    ``score >= threshold`` and the query passes the guard's threshold too. The other ranked tasks' thresholds:
    :meth:`PromptBank.routing_thresholds`."""

    task: str | None
    score: float | None
    ranked: list[tuple[str, float]]
    threshold: float | None = None
    guard: tuple[str, float, float] | None = None


@dataclass
class Prediction:
    """One output of :meth:`PromptBank.predict`.

    ``output`` is the predicted label (classification) or generated text (generation task), ``None`` when
    routing found no task. ``route_score`` is set when the task was routed, ``label_scores`` for classification:
    per label, the causal LM's summed log-likelihood of the label's text; for a task with an embedding probe (the
    default, :class:`TrainConfig` ``probe``; encoder tasks always have a head) the normalised log-probability of the
    combined prediction instead (``exp`` of the values sums to 1).
    """

    output: str | None
    task: str | None
    route_score: float | None = None
    label_scores: dict[str, float] | None = None


@dataclass
class _Variant:
    """A prompt of a task that is not serving (see :meth:`PromptBank.learn_variant`); never changed in place."""

    record: TaskRecord  # record.variant is the variant's name; name, kind and labels are the task's
    prompt: dict[int, torch.Tensor]
    train_state: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None


@dataclass
class _Task:
    record: TaskRecord
    prompt: dict[int, torch.Tensor]  # folded soft prompt, fp32 (P, d) per layer
    keys: np.ndarray  # (k, d_embed) L2-normalised routing keys (embeddings of training inputs)
    train_state: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None  # encoder backbones: linear head {"weight": (L, d), "bias": (L,)}
    variants: dict[str, _Variant] = field(default_factory=dict)  # the non-serving prompt variants, by name
    key_groups: np.ndarray | None = None  # (k,) label / cluster of each key (learned router); None: one group

    def serving(self) -> _Variant:
        """The serving prompt as a variant (record.variant names it)."""
        return _Variant(self.record, self.prompt, self.train_state, self.head)


class PromptBank:
    """A frozen backbone plus one soft prompt per task.

    >>> bank = PromptBank.from_pretrained()          # SmolLM2-135M-Instruct + all-MiniLM-L6-v2
    >>> bank.learn_task("tickets", "tickets.jsonl")  # rows {"text", "label"}
    >>> bank.predict(["My card was charged twice"])  # routed to "tickets" automatically
    """

    def __init__(self, backbone: Backbone, embedder: Embedder, *, routing: str = "lda"):
        if backbone.kind not in ("causal_lm", "encoder"):
            raise ValueError(f"PromptBank supports causal LM and encoder backbones; got kind {backbone.kind!r}")
        if routing not in ROUTING_SCORERS:
            raise ValueError(f"routing must be one of {ROUTING_SCORERS}, got {routing!r}")
        self.routing = routing  # "lda": learned Gaussian router (promptbank.lda); "knn": cosine to the nearest keys
        self._lda: tuple[Router, GaussianRouter] | None = None  # the learned router, fitted for one router snapshot
        self.backbone = backbone
        self.embedder = embedder
        self.router = Router(embedder.dim, top_keys=ROUTER_TOP_KEYS)
        self._tasks: dict[str, _Task] = {}
        # Lazily computed prompt prefix cache per task (inference): name -> (the prompt it was computed from, kv,
        # its bytes). Least recently used first; at most `kv_cache_size` tasks and `kv_cache_bytes` bytes
        # (SmolLM2: 0.88 MiB per 20-token prompt).
        self._kv: OrderedDict[str, tuple[dict[int, torch.Tensor], PrefixKV, int]] = OrderedDict()
        self._kv_lock = threading.Lock()
        self._kv_cache_size = KV_CACHE_SIZE
        self._kv_cache_bytes: int | None = None  # None: KV_CACHE_FRACTION of the backbone's parameter bytes
        self._param_bytes: int | None = None
        # Writers (_insert, remove_task; _replace for promote / variants / resume) hold this while they build a new
        # task table (and router), then publish; neither is ever changed in place, so readers (predict, route,
        # save) use them without locking.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        backbone: str | os.PathLike | Backbone | None = None,
        *,
        embedder: str | Embedder | None = None,
        routing: str = "lda",
        **backbone_kwargs,
    ) -> PromptBank:
        """A new empty bank. ``backbone=None`` is SmolLM2-135M-Instruct (fetched and cached on first use);
        ``embedder=None`` is all-MiniLM-L6-v2 with its middle layer (:data:`promptbank.embed.ROUTING_EMBEDDER`).
        A name, a local folder or a :class:`Backbone` work too. ``routing``: ``"lda"`` (the learned router,
        :mod:`promptbank.lda`) or ``"knn"`` (cosine similarity to each task's nearest keys)."""
        bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, **backbone_kwargs)
        return cls(bb, load_embedder(ROUTING_EMBEDDER if embedder is None else embedder), routing=routing)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backbone: str | os.PathLike | Backbone | None = None,
        *,
        embedder: str | Embedder | None = None,
        allow_mismatch: bool = False,
        trust_index: bool = False,
    ) -> PromptBank:
        """Load a bank saved by :meth:`save`. ``backbone=None`` loads the backbone named in the manifest."""
        from .storage import load_bank

        return load_bank(
            cls, path, backbone=backbone, embedder=embedder, allow_mismatch=allow_mismatch, trust_index=trust_index
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank atomically to folder ``path`` (safe to save into the folder it was loaded from)."""
        from .storage import save_bank

        save_bank(self, path)

    # ------------------------------------------------------------------ inspection
    @property
    def tasks(self) -> dict[str, TaskRecord]:
        """Records of the stored tasks, by name, in insertion order."""
        with self._lock:  # never between publishing the task table and the router
            tasks = self._tasks
        return {name: t.record for name, t in tasks.items()}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __repr__(self) -> str:
        return (
            f"PromptBank(backbone={self.backbone.name!r}, embedder={self.embedder.name!r}, tasks={list(self._tasks)})"
        )

    def soft_prompt(self, name: str, variant: str | None = None) -> dict[int, torch.Tensor]:
        """A copy of task ``name``'s soft prompt ``{layer: (P, d)}`` (its serving one, or prompt variant
        ``variant``)."""
        return {k: v.clone() for k, v in _variant_of(self._get(name), variant).prompt.items()}

    def _get(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(self._tasks) or "none"
            raise TaskNotFoundError(f"no task named {name!r} in the bank (tasks: {known})") from None

    # ------------------------------------------------------------------ learning
    def learn_task(
        self,
        name: str,
        data: Any,
        method: str | Method = Method.PROMPT_TUNING,
        *,
        dev: Any = None,
        kind: str | None = None,
        labels: Sequence[str] | None = None,
        label_words: Mapping[str, str] | None = None,
        num_virtual_tokens: int = 20,
        layers: list[int] | None = None,
        encoder_hidden: int | None = None,
        template: str = causal.DEFAULT_TEMPLATE,
        **train_options,
    ) -> TaskRecord:
        """Train a new soft prompt for task ``name`` on ``data`` and store it; other tasks are not touched.

        ``data``: a JSONL/JSON/CSV/TSV/Parquet path, a list of dicts (``{"text","label"}`` or
        ``{"input","target"}``) or of tuples, a dict of columns, a DataFrame or a Hugging Face ``Dataset``
        (:func:`promptbank.tasks.load_task_data`). ``dev``: optional dev data (else ``dev_fraction`` of ``data`` is held out). ``method``:
        ``prompt_tuning`` | ``ptuning_mlp`` | ``ptuning_lstm`` | ``deep``. ``train_options`` are
        :class:`TrainConfig` fields (``max_steps``, ``lr``, ``batch_size``, ``seed``, ``warm_start`` ...).
        ``label_words`` (a verbalizer, classification only): ``{label: text}`` for labels whose names the model
        should not read as they are, e.g. ``{"ABBR": "abbreviation", "1": "terrible"}``. On a causal LM the
        prompt is trained to write that text and prediction ranks it; predictions, scores and :meth:`evaluate`
        still use the labels. Labels left out are their own text. Stored with the task (variants and
        :meth:`resume_task` use the task's). On an encoder backbone only the text initialisation reads them.
        If training fails (bad data, NaN loss, interrupt) the bank is left exactly as it was.
        """
        validate_task_name(name)
        if name in self._tasks:
            raise TaskExistsError(f"task {name!r} already exists; remove it first or choose another name")
        template = self._task_template(template)
        pconf = PromptConfig(
            method=method, num_virtual_tokens=num_virtual_tokens, layers=layers, encoder_hidden=encoder_hidden
        )
        tconf = self._train_config(train_options)
        task_data, train_data, dev_data, tconf = self._split_data(data, dev, kind, labels, tconf)
        words = check_label_words(label_words, task_data.kind, task_data.labels)

        # routing keys, threshold, warm start and the embedding probe (its fit, its dev accuracy): each input once
        train_emb = self._embed_training_inputs(train_data, tconf)
        dev_emb = self.embedder.encode([ex.whole_input for ex in dev_data.examples]) if dev_data else None
        keys, groups, threshold = self._routing_keys(train_data, dev_data, tconf, train_emb=train_emb, dev_emb=dev_emb)

        fit = self._fit(
            f"learn {name} ({pconf.method.value})",
            task_data,
            train_data,
            dev_data,
            pconf,
            tconf,
            template,
            train_emb=train_emb,
            dev_emb=dev_emb,
            label_words=words,
        )
        record = fit.record(name, DEFAULT_VARIANT, task_data, pconf, tconf, template, float(threshold), words)
        self._insert(_Task(record, fit.prompt, keys, fit.train_state, fit.head, key_groups=groups))
        logger.info(
            "learned task %r: %d steps, dev loss %s, dev accuracy %s",
            name,
            record.steps,
            record.dev_loss,
            record.dev_accuracy,
        )
        return record

    def _train_config(self, train_options: dict) -> TrainConfig:
        """``TrainConfig(**train_options)`` with the precision training will really run in (bf16 falls back to fp32,
        with a warning, on a CPU without native bf16), so the task's record says what happened."""
        tconf = TrainConfig(**train_options)
        precision = effective_precision(tconf.precision, model_device(self.backbone.model))
        return tconf if precision == tconf.precision else replace(tconf, precision=precision)

    def _task_template(self, template: Any) -> str:
        """A new task's (or variant's) template, checked (:func:`check_template`); on a causal LM with the tokenizer's
        BOS token in front where it starts every text with one (:func:`promptbank.causal.with_bos`)."""
        check_template(template)
        return template if self.is_encoder else causal.with_bos(self.backbone.tokenizer, template)

    def _split_data(
        self, data: Any, dev: Any, kind: str | None, labels: Sequence[str] | None, tconf: TrainConfig
    ) -> tuple[TaskData, TaskData, TaskData | None, TrainConfig]:
        """Load and truncate task data -> (all data, training part, dev part or None, ``tconf`` with its
        ``truncation_side`` resolved for the data's kind: :func:`promptbank.config.resolve_truncation_side`): ``dev``
        when given, else ``dev_fraction`` of the data (at most ``max_dev`` rows) when there are at least 4 rows."""
        tok = self.backbone.tokenizer
        task_data = load_task_data(data, kind=kind, labels=labels)
        if self.is_encoder and task_data.kind != "classification":
            raise ValueError(f"{task_data.source}: encoder backbones learn classification tasks only, not generation")
        side = resolve_truncation_side(tconf.truncation_side, task_data.kind)
        tconf = replace(tconf, truncation_side=side)
        hint = "; raise max_input_tokens (CLI: learn --max-input-tokens) to keep more"
        if side == "right":
            hint += ', or truncation_side="middle" / "left" (--truncation-side) to keep their ends'
        task_data = truncate_inputs(task_data, tok, tconf.max_input_tokens, hint=hint, side=side)
        if not self.is_encoder:
            warn_long_targets(
                task_data, tok, tconf.max_target_tokens, hint="; raise max_target_tokens (CLI: --max-target-tokens)"
            )
        if dev is not None:
            dev_data = load_task_data(dev, kind=task_data.kind, labels=task_data.labels)
            dev_data = truncate_inputs(dev_data, tok, tconf.max_input_tokens, hint=hint, side=side)
            train_data = task_data
        elif tconf.dev_fraction > 0 and len(task_data) >= 4:
            train_data, dev_data = split_dev(task_data, tconf.dev_fraction, seed=tconf.seed, max_dev=tconf.max_dev)
        else:
            train_data, dev_data = task_data, None
        return task_data, train_data, dev_data, tconf

    def _fit(
        self,
        desc: str,
        task_data: TaskData,
        train_data: TaskData,
        dev_data: TaskData | None,
        pconf: PromptConfig,
        tconf: TrainConfig,
        template: str,
        *,
        resume_from: _Variant | None = None,
        warm_exclude: str | None = None,
        train_emb: np.ndarray | None = None,
        dev_emb: np.ndarray | None = None,
        label_words: dict[str, str] | None = None,
    ) -> _Fit:
        """Train one soft prompt and its head (encoders: the linear head; classification tasks: with the embedding
        probe unless ``tconf.probe`` is off); stores nothing.

        A new prompt starts from the text / vocabulary initialisation or a warm start (from stored tasks other
        than ``warm_exclude``); with ``resume_from`` it starts from that variant's stored ``train_state`` (prompt
        module, P-Tuning encoder and head included). ``train_emb`` / ``dev_emb``: the routing embeddings of
        :meth:`_embedded_part` of the training data / of the dev inputs, if the caller has them (else computed here
        when the warm start or the embedding probe needs them). ``label_words``: the task's checked
        verbalizer (:func:`check_label_words`).
        """
        model, tok = self.backbone.model, self.backbone.tokenizer
        texts = label_texts(task_data.labels, label_words) if task_data.labels else None
        if tconf.probe and task_data.kind == "classification" and train_emb is None:
            train_emb = self._embed_training_inputs(train_data, tconf)  # the probe's fit and refit
        if tconf.objective != "lm" and (self.is_encoder or task_data.kind != "classification"):
            raise ValueError(
                f"objective={tconf.objective!r} trains a causal LM's classification task to rank its labels; "
                + (
                    "an encoder's head always trains on the labels' cross-entropy: leave objective at 'lm'"
                    if self.is_encoder
                    else "this is a generation task: use objective='lm'"
                )
            )
        if tconf.balance_labels and task_data.kind != "classification":
            raise ValueError("balance_labels balances a classification task's labels; this is a generation task")
        if tconf.select_on == "accuracy" and not self.is_encoder and tconf.objective == "lm":
            raise ValueError(
                "select_on='accuracy' needs the dev accuracy during training: an encoder backbone, or "
                "objective='labels' / 'labels+lm' on a causal LM; use 'loss' or 'auto'"
            )
        warm_from: list[dict[str, Any]] = []
        if resume_from is not None:
            init = {layer: t.clone() for layer, t in resume_from.prompt.items()}  # shapes only: the state overrides
        else:
            layer_set = pconf.resolved_layers(self.backbone.num_layers)
            if tconf.init == "text":
                desc_text = describe_task(task_data.kind, texts)
                init_ids = text_init_ids(tok, desc_text, pconf.num_virtual_tokens)
            else:
                gen = torch.Generator().manual_seed(tconf.seed)
                init_ids = vocab_init_ids(model, pconf.num_virtual_tokens, generator=gen, tokenizer=tok)
            init = token_init(model, init_ids, layer_set, causal=not self.is_encoder)
            if tconf.warm_start:
                if train_emb is None:
                    train_emb = self._embed_training_inputs(train_data, tconf)
                mixed, warm_from = self._warm_start(
                    train_emb, init, tconf.warm_start_k, tconf.warm_start_min_similarity, exclude=warm_exclude
                )
                if mixed is not None:
                    init = mixed
        defaults = DEFAULT_LR_ENCODER if self.is_encoder else DEFAULT_LR
        lr = tconf.lr if tconf.lr is not None else defaults[pconf.method]
        head = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tconf.seed)
            module = build_prompt_module(pconf, init).to(model_device(model))  # stored/warm inits may be on CPU
            state = resume_from.train_state if resume_from is not None else None
            if self.is_encoder:
                head_init = (
                    self._warm_head(task_data.labels, warm_from, tconf.warm_start_head_min_similarity)
                    if warm_from
                    else None
                )
                result, head = self._train_encoder(
                    module, train_data, dev_data, tconf, lr, desc, state=state, head_init=head_init
                )
                if tconf.probe:
                    head = head | self._fit_probe(train_data, tconf, train_emb)
                num_train, num_dev = len(train_data), len(dev_data) if dev_data else 0
            else:
                if state is not None:
                    _load_train_state(module, state, desc)
                enc = self._pair_encoder(template, tconf.max_target_tokens, label_words)
                train_pairs = [enc(ex.input, ex.target) for ex in train_data.examples]
                dev_pairs = [enc(ex.input, ex.target) for ex in dev_data.examples] if dev_data else []
                label_ids = None
                if tconf.objective != "lm":
                    label_ids = _label_ids(tok, texts, tconf.max_target_tokens)
                row_labels = None
                if task_data.kind == "classification":
                    index = {lab: i for i, lab in enumerate(task_data.labels)}
                    row_labels = [index[ex.target] for ex in train_data.examples]
                result = train_soft_prompt(
                    model,
                    tok,
                    module,
                    train_pairs,
                    dev_pairs,
                    tconf,
                    lr=lr,
                    desc=desc,
                    label_ids=label_ids,
                    labels=row_labels,
                )
                if tconf.probe and task_data.kind == "classification":
                    head = self._fit_probe(train_data, tconf, train_emb)
                num_train, num_dev = len(train_pairs), len(dev_pairs)

        by_accuracy = (self.is_encoder or tconf.objective != "lm") and tconf.select_on != "loss"
        if resume_from is None and dev_data and result.steps and result.best_step == 0:
            warnings.warn(
                f"{desc}: no trained state beat the initial one on the dev set "
                f"({'accuracy, then loss' if by_accuracy else 'loss'}) in "
                f"{result.steps} steps, so the "
                + (
                    "warm-started state was kept (from " + ", ".join(w["task"] for w in warm_from) + ")"
                    if warm_from
                    else "untrained state was kept"
                    + (" (a new linear head at zero: it predicts one label for everything)" if self.is_encoder else "")
                )
                + "; more examples or steps, a larger dev set (dev=) or another lr may help",
                UserWarning,
                stacklevel=3,
            )
        dev_acc = None
        probed = head is not None and "probe_weight" in head
        if probed and dev_data and dev_emb is None:  # the dev accuracy's probe scores, and the probe's refit
            dev_emb = self.embedder.encode([ex.whole_input for ex in dev_data.examples])
        if dev_data and task_data.kind == "classification":
            if self.is_encoder:
                dev_acc = self._encoder_accuracy(
                    result.prompt,
                    head,
                    task_data.labels,
                    dev_data,
                    tconf.max_input_tokens,
                    dev_emb,
                    tconf.truncation_side,
                )
            else:
                dev_acc = self._accuracy(
                    result.prompt,
                    task_data.labels,
                    template,
                    dev_data,
                    tconf.max_target_tokens,
                    label_words=label_words,
                    head=head,
                    embeddings=dev_emb,
                )
        if probed and dev_data and tconf.probe_refit:
            # nothing of the probe is chosen on the dev rows (its C is fixed): once they have measured the dev
            # accuracy, it learns from them too
            head = head | self._fit_probe(train_data, tconf, train_emb, dev=(dev_data, dev_emb))
        return _Fit(result, head, dev_acc, warm_from, num_train, num_dev, tconf.keep_train_state)

    @staticmethod
    def _embedded_part(train_data: TaskData, tconf: TrainConfig) -> TaskData:
        """The training rows that go through the routing embedder: all of them, or at most ``max_embedded``
        (label-stratified for classification, each label keeping its share and at least one row; seeded by
        ``tconf.seed``), in their original order."""
        n = len(train_data)
        if n <= tconf.max_embedded:
            return train_data
        if train_data.kind == "classification" and train_data.labels:
            index = {lab: i for i, lab in enumerate(train_data.labels)}
            groups = np.array([index[ex.target] for ex in train_data.examples], dtype=np.int64)
        else:
            groups = np.zeros(n, dtype=np.int64)
        keep = _stratified_subset(groups, tconf.max_embedded, tconf.seed)
        return replace(train_data, examples=[train_data.examples[i] for i in keep])

    def _embed_training_inputs(self, train_data: TaskData, tconf: TrainConfig) -> np.ndarray:
        """Routing embeddings of :meth:`_embedded_part` of the training data (with ``tconf.progress`` and more than
        :data:`EMBED_CHUNK` of them, embedded that many at a time under a progress bar). Each input is embedded as
        given, before ``max_input_tokens`` cut it (``Example.whole_input``), since routing and the embedding probe
        embed a query whole: keys, threshold, warm start's shares and the probe then see what inference sees (for
        ``truncation_side="left"`` / ``"middle"`` the cut text is another part of the input)."""
        texts = [ex.whole_input for ex in self._embedded_part(train_data, tconf).examples]
        return _in_chunks(
            texts, self.embedder.encode, EMBED_CHUNK, tconf.progress, "embed training inputs", unit="input",
            join=np.concatenate,
        )  # fmt: skip

    def _routing_keys(
        self,
        train_data: TaskData,
        dev_data: TaskData | None,
        tconf: TrainConfig,
        *,
        train_emb: np.ndarray | None = None,
        dev_emb: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Routing keys, their groups and the cosine ("knn" scorer) threshold for a task with these examples.

        Keys: the embeddings of (at most ``max_keys``, label-stratified) training inputs, drawn from the
        :meth:`_embedded_part`. Groups: the label of each key for classification, else its k-means cluster
        (``n_prototypes`` clusters); the learned router (:mod:`promptbank.lda`) fits one Gaussian per group. The
        threshold accepts all but ``threshold_quantile`` of held-out in-task queries under the cosine scorer, each
        scored against the keys as a query would be: dev inputs, embedded training inputs that are not keys, and
        each key against the other keys. ``train_emb`` / ``dev_emb``: the embeddings of the embedded part / of the
        dev inputs when the caller has them.
        """
        if train_emb is None:
            train_emb = self._embed_training_inputs(train_data, tconf)
        train_data = self._embedded_part(train_data, tconf)
        inputs = [ex.input for ex in train_data.examples]
        if len(train_emb) != len(inputs):
            raise ValueError(f"{len(train_emb)} embeddings for {len(inputs)} embedded training inputs")
        if train_data.kind == "classification" and train_data.labels:
            index = {lab: i for i, lab in enumerate(train_data.labels)}
            groups = np.array([index[ex.target] for ex in train_data.examples], dtype=np.int64)
        else:
            groups = _cluster_groups(train_emb, tconf.n_prototypes, tconf.seed)
        keep = _stratified_subset(groups, tconf.max_keys, tconf.seed)
        keys = np.ascontiguousarray(train_emb[keep])
        _, groups = np.unique(groups[keep], return_inverse=True)  # dense group ids 0..G-1
        held_out = [_loo_scores(keys, self.router.top_keys)]
        rest = np.setdiff1d(np.arange(len(train_emb)), keep)  # embedded, not a key: held out already
        if len(rest):
            held_out.append(_top_mean(train_emb[rest] @ keys.T, self.router.top_keys))
        if dev_data:
            if dev_emb is None:
                dev_emb = self.embedder.encode([ex.whole_input for ex in dev_data.examples])
            held_out.append(_top_mean(dev_emb @ keys.T, self.router.top_keys))
        scores = np.concatenate(held_out)
        if scores.size:
            threshold = calibrate_threshold(scores, tconf.threshold_quantile)
        else:  # one training example and no dev data: nothing held out to calibrate on
            warnings.warn(
                "one training example and no dev data: the cosine router's 'no task' threshold cannot be "
                "calibrated and is 0 (any query with a positive score may be routed to this task)",
                UserWarning,
                stacklevel=3,
            )
            threshold = 0.0
        return keys, groups.astype(np.int64), threshold

    @property
    def is_encoder(self) -> bool:
        """True when the backbone is a BERT-family encoder (classification through per-task heads)."""
        return self.backbone.kind == "encoder"

    def _train_encoder(
        self,
        module,
        train_data: TaskData,
        dev_data: TaskData | None,
        tconf: TrainConfig,
        lr: float,
        desc: str,
        *,
        state: dict[str, torch.Tensor] | None = None,
        head_init: dict[str, torch.Tensor] | None = None,
    ):
        """Train a soft prompt plus a linear head on the mean-pooled encoder output (cross-entropy). ``state``: a
        stored train state (``prompt.*`` and ``head.*`` tensors) to resume from. ``head_init``: the head's
        starting ``{"weight", "bias"}`` (a warm start; else zeros)."""
        from torch import nn

        from .encoder import Head, encode_texts, pooled

        model, tok = self.backbone.model, self.backbone.tokenizer
        labels = train_data.labels
        index = {lab: i for i, lab in enumerate(labels)}
        max_tokens = self._encoder_tokens(tconf.max_input_tokens, warn=True)
        side = tconf.truncation_side
        seqs = encode_texts(tok, [ex.input for ex in train_data.examples], max_tokens, side)
        device = model_device(model)
        ys = torch.tensor([index[ex.target] for ex in train_data.examples], device=device)
        head = Head(self.backbone.hidden_size, len(labels)).to(device)
        if head_init is not None:
            with torch.no_grad():
                head.linear.weight.copy_(head_init["weight"])
                head.linear.bias.copy_(head_init["bias"])
        both = nn.ModuleDict({"prompt": module, "head": head})
        if state is not None:
            _load_train_state(both, state, desc)

        def batch_loss(idx: list[int]) -> torch.Tensor:
            prompt = module()  # once per batch, shared by its rows
            feats = pooled(model, tok, [seqs[i] for i in idx], [prompt] * len(idx))  # (B, d)
            return torch.nn.functional.cross_entropy(head(feats), ys[idx])

        eval_loss, dev_metrics = None, None
        if dev_data:
            dev_seqs = encode_texts(tok, [ex.input for ex in dev_data.examples], max_tokens, side)
            dev_ys = torch.tensor([index[ex.target] for ex in dev_data.examples], device=device)

            last_accuracy = [float("nan")]  # set by each dev evaluation, read by the history hook

            @torch.no_grad()
            def eval_loss() -> float:
                prompt, losses, hits = module(), [], []
                for s in range(0, len(dev_seqs), tconf.batch_size):
                    feats = pooled(
                        model,
                        tok,
                        dev_seqs[s : s + tconf.batch_size],
                        [prompt] * len(dev_seqs[s : s + tconf.batch_size]),
                    )
                    logits, ys_ = head(feats), dev_ys[s : s + tconf.batch_size]
                    losses += torch.nn.functional.cross_entropy(logits, ys_, reduction="none").tolist()
                    hits += (logits.argmax(-1) == ys_).float().tolist()
                if tconf.balance_labels:  # each label's rows count as much as another's
                    gold = dev_ys.tolist()
                    last_accuracy[0] = balanced_mean(hits, gold)
                    return balanced_mean(losses, gold)
                last_accuracy[0] = sum(hits) / len(dev_seqs)
                return sum(losses) / len(dev_seqs)

            dev_metrics = {"dev_accuracy": lambda: last_accuracy[0]}  # free: same forward as the dev loss

        groups = [
            {"params": [p for p in module.parameters() if p.requires_grad], "lr": lr},
            {"params": list(head.parameters()), "lr": tconf.head_lr},
        ]
        result = train_loop(
            model,
            both,
            len(seqs),
            batch_loss,
            eval_loss,
            tconf,
            param_groups=groups,
            fold=module.fold,
            desc=desc,
            lengths=[len(s) for s in seqs],
            labels=ys.tolist(),
            dev_metrics=dev_metrics,
            select_on="dev_accuracy" if dev_metrics and tconf.select_on != "loss" else None,
            # a new zero head predicts one label for everything: not a state to keep (a resumed or warm one is)
            initial_is_candidate=state is not None or head_init is not None,
        )
        return result, head.tensors()

    def _fit_probe(
        self,
        train_data: TaskData,
        tconf: TrainConfig,
        train_emb: np.ndarray | None,
        dev: tuple[TaskData, np.ndarray] | None = None,
    ) -> dict:
        """The embedding probe of a new head (:func:`promptbank.encoder.fit_probe` on the routing embeddings of the
        :meth:`_embedded_part` of the training inputs, ``train_emb`` when the caller has them), and of the dev rows
        too when ``dev`` (the dev data, its routing embeddings) is given."""
        from .encoder import fit_probe

        if train_emb is None:
            train_emb = self._embed_training_inputs(train_data, tconf)
        train_data = self._embedded_part(train_data, tconf)
        if len(train_emb) != len(train_data):
            raise ValueError(f"{len(train_emb)} embeddings for {len(train_data)} embedded training inputs")
        examples, emb = train_data.examples, np.asarray(train_emb)
        if dev is not None:
            if len(dev[1]) != len(dev[0]):
                raise ValueError(f"{len(dev[1])} embeddings for {len(dev[0])} dev inputs")
            examples, emb = examples + dev[0].examples, np.concatenate([emb, np.asarray(dev[1])])
        index = {lab: i for i, lab in enumerate(train_data.labels)}
        ys = [index[ex.target] for ex in examples]
        weights = None
        if tconf.balance_labels:  # n / (labels present * rows of the label), scikit-learn's "balanced"
            counts = np.bincount(ys, minlength=len(train_data.labels))
            weights = [len(ys) / (np.count_nonzero(counts) * counts[y]) for y in ys]
        return fit_probe(emb, ys, len(train_data.labels), float(tconf.probe_c), sample_weight=weights)

    def _encoder_logits(
        self,
        texts: Sequence[str],
        prompts: Sequence[dict | None],
        heads: Sequence[dict],
        max_tokens: int | Sequence[int],
        batch_size: int = 32,
        embeddings: np.ndarray | None = None,
        sides: str | Sequence[str] = "right",
    ) -> list[torch.Tensor]:
        """Each row's label scores under its prompt and head. ``max_tokens`` / ``sides``: the input token cap and
        truncation side of every row, or of each (its task's ``max_input_tokens`` and ``truncation_side``). Heads
        with an embedding probe need the rows' routing embeddings: ``embeddings`` (one per text) when the caller has
        them, else computed here for those rows."""
        from .encoder import encode_texts, head_logits, pooled

        model, tok = self.backbone.model, self.backbone.tokenizer
        emb = self._probe_embeddings(texts, heads, embeddings)
        caps = [max_tokens] * len(texts) if isinstance(max_tokens, int) else list(max_tokens)
        seqs = encode_texts(tok, texts, [self._encoder_tokens(c) for c in caps], sides)
        # Batches of similar length (little padding); each row's result does not depend on its batch.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[torch.Tensor | None] = [None] * len(seqs)
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                rows = order[s : s + batch_size]
                feats = pooled(model, tok, [seqs[i] for i in rows], [prompts[i] for i in rows])
                for i, f in zip(rows, feats):
                    out[i] = head_logits(heads[i], f[None], emb.get(i))[0]
        return out  # type: ignore[return-value]

    def _probe_embeddings(
        self, texts: Sequence[str], heads: Sequence[Mapping[str, torch.Tensor] | None], embeddings: np.ndarray | None
    ) -> dict[int, torch.Tensor]:
        """Row index -> routing embedding (1, e) of each row whose head has an embedding probe: taken from
        ``embeddings`` (one per text) when the caller has them (routed rows), else computed for those rows only."""
        probed = [i for i, h in enumerate(heads) if h is not None and "probe_weight" in h]
        if not probed:
            return {}
        if embeddings is None:
            vecs = self.embedder.encode([texts[i] for i in probed])
        else:
            if len(embeddings) != len(texts):
                raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} texts")
            vecs = np.asarray(embeddings)[probed]
        return {i: torch.as_tensor(np.asarray(v), dtype=torch.float32)[None] for i, v in zip(probed, vecs)}

    def _with_probes(
        self,
        scores: list[torch.Tensor],
        texts: Sequence[str],
        heads: Sequence[Mapping[str, torch.Tensor] | None],
        embeddings: np.ndarray | None = None,
    ) -> list[torch.Tensor]:
        """Causal LM: each row's label scores (summed log-likelihoods), combined with its task's embedding probe
        where it has one, as encoder heads combine theirs: the normalised product of the two distributions,
        ``log_softmax(log_softmax(lm) + probe log-probabilities)``. Rows without a probe keep their scores."""
        from .encoder import with_probe

        emb = self._probe_embeddings(texts, heads, embeddings)
        out = list(scores)
        for i, e in emb.items():
            out[i] = torch.log_softmax(with_probe(scores[i][None], heads[i], e)[0], -1)  # type: ignore[arg-type]
        return out

    def _encoder_accuracy(
        self, prompt, head, labels, data: TaskData, max_tokens: int, embeddings=None, side: str = "right"
    ) -> float:
        logits = self._encoder_logits(
            [ex.input for ex in data.examples],
            [prompt] * len(data),
            [head] * len(data),
            max_tokens,
            32,
            embeddings,
            side,
        )
        return sum(labels[int(lg.argmax())] == ex.target for lg, ex in zip(logits, data.examples)) / len(data)

    def _pair_encoder(self, template: str, max_target_tokens: int, label_words: Mapping[str, str] | None = None):
        """(input, target) -> token ids of the templated input and of the target (its label word, if it has one)."""
        tok = self.backbone.tokenizer
        words = label_words or {}

        def enc(inp: str, target: str) -> tuple[list[int], list[int]]:
            target = words.get(target, target)
            return causal.encode_input(tok, inp, template), causal.encode_target(tok, target, max_target_tokens)

        return enc

    def _insert(self, task: _Task) -> None:
        """Add a fully built task, all or nothing, and atomically for concurrent readers: new copies of the router
        (which validates) and the table are built, then published, the table first, so any task a reader routes to
        is in the table."""
        name = task.record.name
        with self._lock:
            router = self.router.copy()
            router.add(name, task.keys, task.record.threshold)
            # one copy of the keys: the task holds the router's (validated, read-only) array
            task = replace(task, keys=router.keys(name, copy=False))
            tasks = {**self._tasks, name: task}
            self._kv.pop(name, None)
            self._tasks = tasks
            self.router = router

    def task_similarities(self, texts: Sequence[str], *, exclude: str | None = None) -> dict[str, float]:
        """For each stored task, the share of ``texts`` the router ranks first for and whose threshold they pass
        (:class:`Routing`'s ``guard`` is not applied: this measures likeness, it does not reject): how much a new
        task's inputs look like that task's inputs, in [0, 1] with the bank's own calibration. Tasks that no text reaches are left out. Task ``exclude`` is skipped (a text whose best
        task it is goes to its next-ranked task). This is the warm-start similarity of :meth:`learn_task`."""
        texts = _as_texts(texts)
        router = self.router
        if not len(router) or not texts:
            return {}
        emb = self.embedder.encode(texts)
        return self._routing_shares(router, emb, exclude)

    def _routing_shares(self, router: Router, emb: np.ndarray, exclude: str | None) -> dict[str, float]:
        scorer = self._learned_router(router) if self.routing == "lda" else router
        counts: dict[str, int] = {}
        for ranked in scorer.route(emb, top_k=2 if exclude is not None else 1):
            best = next(((n, s) for n, s in ranked if n != exclude), None)
            if best is not None and best[1] >= scorer.threshold(best[0]):
                counts[best[0]] = counts.get(best[0], 0) + 1
        return {n: c / len(emb) for n, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}

    def _warm_start(
        self,
        train_emb: np.ndarray,
        init: dict[int, torch.Tensor],
        k: int,
        min_similarity: float,
        *,
        exclude: str | None = None,
    ):
        """Share-weighted mix of the ``k`` stored prompts of the same shape that the new task's inputs route to
        (SPoT-style transfer, with the router as the similarity).

        A stored task's similarity is the share of the new task's training inputs the router sends to it and
        accepts (:meth:`task_similarities`); only tasks with share >= ``min_similarity`` count, since a prompt
        trained for an unrelated task is a worse start than the label-text initialisation. Task ``exclude``
        never counts. (Cosine of mean embeddings, used before, was 0.6-0.99 for unrelated tasks with the
        routing embedder: mean-pooled middle-layer states share a large common direction.)
        """
        router, tasks = self.router, self._tasks
        if not len(router):
            return None, []
        shape = {layer: tuple(t.shape) for layer, t in init.items()}
        shares = self._routing_shares(router, train_emb, exclude)
        cands = []
        for name, t in tasks.items():
            if name == exclude or {layer: tuple(v.shape) for layer, v in t.prompt.items()} != shape:
                continue
            share = shares.get(name, 0.0)
            if share >= min_similarity:  # min_similarity 0: every stored task of the same shape
                cands.append((share, name))
        cands = sorted(cands, key=lambda c: (-c[0], c[1]))[:k]
        if not cands:
            return None, []
        total = sum(s for s, _ in cands)
        weights = [s / total if total > 0 else 1 / len(cands) for s, _ in cands]
        mixed = {layer: sum(w * tasks[n].prompt[layer] for w, (_, n) in zip(weights, cands)) for layer in init}
        info = [
            {"task": n, "similarity": round(s, 6), "weight": round(float(w), 6)} for (s, n), w in zip(cands, weights)
        ]
        return mixed, info

    def _warm_head(
        self, labels: Sequence[str] | None, warm_from: list[dict[str, Any]], min_similarity: float = 0.0
    ) -> dict | None:
        """A starting head for a new encoder task from the heads of the warm-start tasks that have every one of its
        labels (by name) and a similarity (routing share) >= ``min_similarity``: their rows for those labels, mixed
        with the warm-start weights renormalised over them. A head that lacks some label would leave that label's
        row at zero among trained rows, biasing the start against it, so such tasks lend only their prompt (as do
        tasks below ``min_similarity``). Marks each entry of ``warm_from`` with ``"head": True/False``. ``None``
        when no task qualifies (the head starts at zero)."""
        if not labels:
            return None
        tasks, parts = self._tasks, []
        for w in warm_from:
            t = tasks.get(w["task"])
            src = {lab: i for i, lab in enumerate(t.record.labels or [])} if t is not None and t.head else {}
            w["head"] = w["similarity"] >= min_similarity and all(lab in src for lab in labels)
            if w["head"]:
                rows = torch.tensor([src[lab] for lab in labels])
                parts.append((w["weight"], t.head["weight"][rows], t.head["bias"][rows]))
        if not parts:
            return None
        total = sum(p[0] for p in parts)
        return {
            "weight": sum(p[0] / total * p[1] for p in parts).float(),
            "bias": sum(p[0] / total * p[2] for p in parts).float(),
        }

    def remove_task(self, name: str) -> None:
        """Delete task ``name`` (its soft prompt, keys and record)."""
        with self._lock:  # copy, then publish: the router first, so it never names a task missing from the table
            self._get(name)
            router = self.router.copy()
            router.remove(name)
            tasks = {n: t for n, t in self._tasks.items() if n != name}
            self.router = router
            self._tasks = tasks
            self._kv.pop(name, None)

    def add_routing_examples(
        self, name: str, texts: str | Sequence[str], *, seed: int = 0, progress: bool = False
    ) -> TaskRecord:
        """Add ``texts`` as routing keys of task ``name``: queries like them are then routed to it. No training;
        the soft prompt, head and probe are unchanged, and so is every other task.

        For inputs that a task should take but that do not look like its training inputs: another format (the
        training texts were lower-cased or stop-word-stripped, the queries are natural sentences), another source
        of the same kind of text, or queries that went to the wrong task or to "no task" (``bank.route`` shows
        which and by how much). No labels are needed: the texts only tell the router where the task's inputs
        lie. Each text is embedded whole, as a query is.

        The new keys form new groups of the learned router (one per ~4 texts, at most the task's
        ``n_prototypes``, by k-means), beside the label groups of the training inputs, so a handful of examples
        of a new format is a Gaussian of its own rather than a shift of the old ones. The learned router is
        refitted; the task's "no task" threshold stays calibrated on its training keys alone (a few examples far
        from everything must not make the task accept anything), and other tasks' thresholds move only as the
        shared covariance does. Needs the learned router (``routing="lda"``, the default): the cosine scorer's
        threshold, calibrated on the training inputs, would reject texts unlike them.
        :meth:`remove_routing_examples` takes them all out again. Returns the task's record (its
        ``routing_examples`` counts the added keys). On any failure the bank is left as it was.
        """
        if self.routing != "lda":
            raise ValueError(
                f"add_routing_examples needs the learned router (routing='lda'); this bank routes with "
                f"{self.routing!r}, whose thresholds would reject texts unlike the training inputs. Set "
                "bank.routing = 'lda' (the default for new banks; saved with the bank) first"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        texts = _as_texts(texts)
        if not texts:
            raise ValueError("texts is empty: pass at least one text to add as a routing example")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"texts[{i}] is empty or blank: a routing example needs text")
        task = self._get(name)
        emb = _in_chunks(
            texts, self.embedder.encode, EMBED_CHUNK, progress, f"embed routing examples of {name}", unit="text",
            join=np.concatenate,
        )  # fmt: skip
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        n_protos = int(task.record.train_config.get("n_prototypes", TrainConfig.n_prototypes))
        _, new_groups = np.unique(_cluster_groups(emb, n_protos, seed), return_inverse=True)
        old_groups = task.key_groups if task.key_groups is not None else np.zeros(len(task.keys), dtype=np.int64)
        groups = np.concatenate([old_groups, new_groups.astype(np.int64) + int(old_groups.max(initial=-1)) + 1])
        from .storage import MAX_KEYS

        if len(groups) > MAX_KEYS:
            raise ValueError(f"task {name!r} would have {len(groups)} routing keys; at most {MAX_KEYS} are stored")
        with self._lock:
            if self._tasks.get(name) is not task:
                raise TaskChangedError(f"task {name!r} was changed or removed meanwhile; nothing was added")
            router = self.router.copy()
            router.extend(name, emb)
            record = replace(task.record, routing_examples=task.record.routing_examples + len(texts))
            self._publish_keys(name, replace(task, record=record), router, groups)
        logger.info("task %r: %d routing examples added (%d keys)", name, len(texts), len(groups))
        return record

    def remove_routing_examples(self, name: str) -> TaskRecord:
        """Take out every routing key that :meth:`add_routing_examples` added to task ``name``: its keys and
        groups are those its training gave it again. Returns the task's record."""
        with self._lock:
            task = self._get(name)
            n = task.record.routing_examples
            if not n:
                return task.record
            keep = len(task.keys) - n
            router = self.router.copy()
            router.truncate(name, keep)
            groups = None if task.key_groups is None else task.key_groups[:keep]
            record = replace(task.record, routing_examples=0)
            self._publish_keys(name, replace(task, record=record), router, groups)
        logger.info("task %r: %d routing examples removed", name, n)
        return record

    def _publish_keys(self, name: str, task: _Task, router: Router, groups: np.ndarray | None) -> None:
        """Publish task ``name`` with its keys from ``router`` (a new router whose keys for it changed) and these
        key groups; the caller holds ``self._lock``. The table first, then the router (both name the task)."""
        task = replace(task, keys=router.keys(name, copy=False), key_groups=groups)
        tasks = dict(self._tasks)
        tasks[name] = task
        self._tasks = tasks
        self.router = router

    # ------------------------------------------------------------------ resume, prompt variants, PEFT import
    def _replace(self, name: str, task: _Task) -> None:
        """Publish a new version of stored task ``name`` whose routing keys and threshold are unchanged (so the
        router stays as it is): a new table, copy-on-write, in the same order. The caller holds ``self._lock``."""
        tasks = dict(self._tasks)
        tasks[name] = task
        self._tasks = tasks
        self._kv.pop(name, None)

    def resume_task(
        self, name: str, data: Any, *, dev: Any = None, variant: str | None = None, **train_options
    ) -> TaskRecord:
        """Continue training task ``name``'s soft prompt on ``data`` from its stored ``train_state``.

        The method and prompt config are the task's; the :class:`TrainConfig` is the stored one with
        ``train_options`` applied (``max_steps``, ``lr``, ...); a task with an embedding probe gets it refitted on
        ``data``, a task without one (``probe=False``, or stored before it could have one) stays without, unless
        ``probe=`` is passed. Training starts from the stored module state (the prompt vectors, P-Tuning MLP/LSTM
        encoder weights, and on encoder backbones the head) with a fresh AdamW schedule (optimizer moments are not
        stored). The step-0 dev evaluation is the stored state and a later state replaces it only if it is better
        by the ``select_on`` rule, so on the same dev data the selection measure cannot get worse (the dev loss; on
        encoders by default the dev accuracy, then the loss). Routing keys and threshold are kept. ``variant`` resumes one of the task's non-serving prompt variants instead of the serving one.

        The returned record counts steps, seconds and history across runs (history steps continue from the
        previous ``steps``; the resumed run's step-0 entry has ``"resumed": True``). Raises :class:`ResumeError`
        when there is no train state (learned with ``keep_train_state=False``) or it does not fit the prompt
        config, :class:`TaskChangedError` when the task was changed by another writer meanwhile. On any failure
        the bank is left exactly as it was; other tasks are never touched.
        """
        task = self._get(name)
        var = _variant_of(task, variant)
        old = var.record
        if not var.train_state:
            raise ResumeError(
                f"task {name!r} (variant {old.variant!r}) has no stored train state to resume from (it was learned "
                "with keep_train_state=False); learn it again, or learn a new variant"
            )
        pconf = PromptConfig.from_dict(old.prompt_config)
        # resuming keeps the task with or without its embedding probe (a task stored before probes existed had
        # none, whatever its config says) unless probe= is passed
        stored = {**old.train_config, "probe": bool(var.head) and "probe_weight" in var.head}
        stored["truncation_side"] = _truncation_side(old)  # tasks stored before the setting: "right"
        tconf = TrainConfig.from_dict({**stored, **train_options})
        task_data, train_data, dev_data, tconf = self._split_data(data, dev, old.kind, old.labels, tconf)
        desc = f"resume {name}/{old.variant} ({pconf.method.value})"
        fit = self._fit(
            desc,
            task_data,
            train_data,
            dev_data,
            pconf,
            tconf,
            old.template,
            resume_from=var,
            label_words=old.label_words,
        )
        r = fit.result
        history = [dict(e, step=e["step"] + old.steps) for e in r.history]
        history[0]["resumed"] = True
        record = replace(
            old,
            train_config=tconf.to_dict(),
            num_train=fit.num_train,
            num_dev=fit.num_dev,
            steps=old.steps + r.steps,
            best_step=old.steps + r.best_step if r.best_step else old.best_step,
            dev_loss=r.best_dev_loss,
            dev_accuracy=fit.dev_accuracy,
            train_seconds=round(old.train_seconds + r.seconds, 3),
            history=[*old.history, *history],
        )
        new_var = _Variant(record, fit.prompt, fit.train_state, fit.head)
        with self._lock:
            if self._tasks.get(name) is not task:
                raise TaskChangedError(f"task {name!r} was changed or removed while it was resumed; nothing was stored")
            if var.record is task.record:
                new = replace(
                    task, record=record, prompt=new_var.prompt, train_state=new_var.train_state, head=fit.head
                )
            else:
                new = replace(task, variants={**task.variants, old.variant: new_var})
            self._replace(name, new)
        logger.info(
            "resumed task %r (variant %r): %d more steps, dev loss %s", name, old.variant, r.steps, r.best_dev_loss
        )
        return record

    def learn_variant(
        self,
        task: str,
        variant: str,
        data: Any,
        method: str | Method = Method.PROMPT_TUNING,
        *,
        dev: Any = None,
        num_virtual_tokens: int = 20,
        layers: list[int] | None = None,
        encoder_hidden: int | None = None,
        template: str | None = None,
        **train_options,
    ) -> TaskRecord:
        """Train another soft prompt for existing task ``task`` and store it as non-serving variant ``variant``.

        Same kind, labels and label words as the task (``data`` rows must use its labels); method, prompt shape,
        template (default: the task's) and ``train_options`` are free, as in :meth:`learn_task`. A warm start draws
        on the other tasks only, never on this task's own prompts. The serving prompt, routing and other tasks are not
        touched; use :meth:`compare` to evaluate the variants and :meth:`promote` to serve one. On failure nothing
        is stored. Returns the variant's record (``record.variant == variant``).
        """
        _check_variant_name(variant)
        t = self._get(task)
        if variant == t.record.variant or variant in t.variants:
            raise VariantExistsError(f"task {task!r} already has a prompt variant {variant!r}")
        template = t.record.template if template is None else template
        template = self._task_template(template)
        pconf = PromptConfig(
            method=method, num_virtual_tokens=num_virtual_tokens, layers=layers, encoder_hidden=encoder_hidden
        )
        tconf = self._train_config(train_options)
        task_data, train_data, dev_data, tconf = self._split_data(data, dev, t.record.kind, t.record.labels, tconf)
        desc = f"learn {task}/{variant} ({pconf.method.value})"
        words = t.record.label_words
        fit = self._fit(
            desc, task_data, train_data, dev_data, pconf, tconf, template, warm_exclude=task, label_words=words
        )
        record = fit.record(task, variant, task_data, pconf, tconf, template, t.record.threshold, words)
        with self._lock:  # the task may have changed meanwhile (another variant, a promote): add to what is there
            cur = self._tasks.get(task)
            if cur is None or _label_set(cur.record) != _label_set(t.record):
                raise TaskChangedError(
                    f"task {task!r} was removed or replaced while variant {variant!r} was trained; nothing was stored"
                )
            if variant == cur.record.variant or variant in cur.variants:
                raise VariantExistsError(f"task {task!r} already has a prompt variant {variant!r}")
            record = replace(record, threshold=cur.record.threshold)
            new_var = _Variant(record, fit.prompt, fit.train_state, fit.head)
            self._replace(task, replace(cur, variants={**cur.variants, variant: new_var}))
        logger.info("learned variant %r of task %r: dev loss %s", variant, task, record.dev_loss)
        return record

    def variants(self, task: str) -> dict[str, TaskRecord]:
        """Records of task ``task``'s prompt variants by name: the serving one first (``bank.tasks[task]``), then
        the others in the order they were added."""
        t = self._get(task)
        return {t.record.variant: t.record, **{n: v.record for n, v in t.variants.items()}}

    def promote(self, task: str, variant: str) -> TaskRecord:
        """Make prompt variant ``variant`` the one task ``task`` serves; the previous serving prompt becomes a
        variant under its own name. Routing keys and threshold stay the task's; the prompt cache is invalidated.
        Promoting the serving variant changes nothing. Returns the task's new record."""
        with self._lock:
            t = self._get(task)
            if variant == t.record.variant:
                return t.record
            v = _variant_of(t, variant)
            others = {n: x for n, x in t.variants.items() if n != variant}
            # the routing examples are the task's, counted on its serving record only
            others[t.record.variant] = replace(t.serving(), record=replace(t.record, routing_examples=0))
            record = replace(v.record, threshold=t.record.threshold, routing_examples=t.record.routing_examples)
            self._replace(task, _Task(record, v.prompt, t.keys, v.train_state, v.head, others, t.key_groups))
        logger.info("task %r now serves prompt variant %r", task, variant)
        return record

    def remove_variant(self, task: str, variant: str) -> None:
        """Delete non-serving prompt variant ``variant`` of task ``task`` (promote another one first to remove the
        serving prompt, or use :meth:`remove_task`)."""
        with self._lock:
            t = self._get(task)
            if variant == t.record.variant:
                raise ValueError(
                    f"variant {variant!r} is the one task {task!r} serves; promote another variant first, "
                    "or remove the task"
                )
            _variant_of(t, variant)
            others = {n: x for n, x in t.variants.items() if n != variant}
            self._replace(task, replace(t, variants=others))

    def compare(self, task: str, data: Any, *, batch_size: int = 16) -> dict[str, dict[str, Any]]:
        """Evaluate every prompt variant of ``task`` on the same labelled ``data`` (no routing).

        Returns ``{variant: metrics}``, serving variant first. Metrics: ``serving`` (bool), ``method``, ``n``,
        ``loss`` (causal LMs: mean per-token target cross-entropy, as ``dev_loss``; encoders: mean label
        cross-entropy) and, for classification, ``accuracy``.
        """
        t = self._get(task)
        rec = t.record
        raw = load_task_data(data, kind=rec.kind, labels=rec.labels)
        versions = [t.serving(), *t.variants.values()]
        # each variant sees the inputs cut as it was trained (variants may differ in max_input_tokens and side)
        cut: dict[tuple[int, str], TaskData] = {}
        # the inputs' routing embeddings (of the whole inputs, as predict embeds them), once for every variant with
        # an embedding probe
        probed = any(v.head and "probe_weight" in v.head for v in versions)
        emb = self.embedder.encode([ex.input for ex in raw.examples]) if probed else None
        out: dict[str, dict[str, Any]] = {}
        for v in versions:
            r = v.record
            max_in, side = int(r.train_config.get("max_input_tokens", 256)), _truncation_side(r)
            if (max_in, side) not in cut:
                cut[max_in, side] = truncate_inputs(raw, self.backbone.tokenizer, max_in, side=side)
            td = cut[max_in, side]
            row: dict[str, Any] = {"serving": v.record is rec, "method": r.method.value, "n": len(td)}
            if self.is_encoder:
                logits = self._encoder_logits(
                    [ex.input for ex in td.examples],
                    [v.prompt] * len(td),
                    [v.head] * len(td),
                    max_in,
                    batch_size,
                    emb,
                    side,
                )
                stacked = torch.stack(logits)
                ys = torch.tensor([rec.labels.index(ex.target) for ex in td.examples], device=stacked.device)
                row["loss"] = float(torch.nn.functional.cross_entropy(stacked, ys))
                row["accuracy"] = int((stacked.argmax(-1) == ys).sum()) / len(ys)  # as evaluate: 0.825, not 0.82499
            else:
                row["loss"] = self._target_loss(r, v.prompt, td, batch_size)
                if rec.kind == "classification":
                    row["accuracy"] = self._accuracy(
                        v.prompt,
                        rec.labels,
                        r.template,
                        td,
                        _max_target_tokens(r),
                        batch_size,
                        label_words=r.label_words,
                        head=v.head,
                        embeddings=emb,
                    )
            out[r.variant] = row
        return out

    def import_peft(
        self,
        name: str,
        folder: str | os.PathLike,
        data: Any,
        *,
        dev: Any = None,
        kind: str | None = None,
        labels: Sequence[str] | None = None,
        label_words: Mapping[str, str] | None = None,
        template: str | None = None,
        **train_options,
    ) -> TaskRecord:
        """File a PEFT soft-prompt adapter as new task ``name`` (method ``prompt_tuning``).

        ``folder`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` of a ``PROMPT_TUNING`` or
        ``P_TUNING`` adapter for this bank's causal LM (``task_type`` ``CAUSAL_LM``, one transformer submodule,
        ``token_dim`` = the hidden size). P-Tuning adapters hold the encoder's output embeddings (what PEFT saves),
        so they import as their folded prompt. Pickle files (``adapter_model.bin``) are refused, never loaded.
        The adapter was trained with some input format: ``template`` is that format, for the bank's outputs to equal
        the adapter's. Default (``None``): when ``folder`` is a task folder of a saved bank (``BANK/tasks/NAME``,
        where :meth:`save` writes each causal task's PEFT export), that task's own template, and its
        ``label_words`` unless given; else ``"{input}"``, the raw text PEFT feeds. Where the tokenizer starts every
        text with a BOS token, the template gets it in front, as the tokenizer's ids that PEFT was fed had it
        (:func:`promptbank.causal.with_bos`).

        ``data`` (rows as for :meth:`learn_task`, ``dev`` too) gives the example inputs for the routing keys and
        threshold, and the label set (or ``labels=``) of a classification task (``label_words``: the texts the
        adapter was trained to write for them, as in :meth:`learn_task`); dev loss and accuracy are measured on the
        dev part. ``train_options`` are :class:`TrainConfig` fields (``n_prototypes``, ``seed``, ...; a later
        :meth:`resume_task` trains with them). No embedding probe is fitted: the task's label scores are the
        adapter's own. The record's ``imported_from`` names the adapter file, its sha256 and PEFT type. Raises
        :class:`AdapterError` naming the file and the offending value.
        """
        from .storage import exported_task, read_peft_adapter

        validate_task_name(name)
        if name in self._tasks:
            raise TaskExistsError(f"task {name!r} already exists; remove it first or choose another name")
        source_words = None
        if template is None:
            source = exported_task(folder)  # a saved bank's task: its own input format and label words
            template = PEFT_TEMPLATE if source is None else source["template"]
            if source is not None and label_words is None:
                label_words = source_words = source.get("label_words")
        template = self._task_template(template)  # PEFT users feed the tokenizer's ids, BOS included
        if self.is_encoder:
            raise AdapterError(
                f"{folder}: PEFT prompt adapters are imported into causal-LM banks only; backbone "
                f"{self.backbone.name!r} is an encoder"
            )
        tconf = self._train_config(train_options)
        embeddings, info = read_peft_adapter(folder, self.backbone)
        task_data, train_data, dev_data, tconf = self._split_data(data, dev, kind, labels, tconf)
        try:
            words = check_label_words(label_words, task_data.kind, task_data.labels)
        except ValueError as e:
            if source_words is None:
                raise
            raise ValueError(
                f"the label words of the exported task in {folder} do not fit this data: {e}; pass label_words= "
                "(CLI: --label-words) for this data's labels"
            ) from None

        keys, groups, threshold = self._routing_keys(train_data, dev_data, tconf)

        prompt = {0: embeddings}
        pconf = PromptConfig(method=Method.PROMPT_TUNING, num_virtual_tokens=int(embeddings.shape[0]))
        loss = acc = None
        if dev_data:
            enc = self._pair_encoder(template, tconf.max_target_tokens, words)
            pairs = [enc(ex.input, ex.target) for ex in dev_data.examples]
            model, tok = self.backbone.model, self.backbone.tokenizer
            loss = dev_loss(model, tok, lambda: prompt, pairs, tconf.batch_size)
            if task_data.kind == "classification":
                acc = self._accuracy(
                    prompt, task_data.labels, template, dev_data, tconf.max_target_tokens, label_words=words
                )
        record = TaskRecord(
            name=name,
            kind=task_data.kind,
            labels=list(task_data.labels) if task_data.labels else None,
            prompt_config=pconf.to_dict(),
            train_config=tconf.to_dict(),
            template=template,
            num_train=len(train_data),
            num_dev=len(dev_data) if dev_data else 0,
            steps=0,
            best_step=0,
            dev_loss=loss,
            dev_accuracy=acc,
            train_seconds=0.0,
            threshold=float(threshold),
            imported_from=info,
            label_words=words,
        )
        state = {"embeddings": embeddings.clone()} if tconf.keep_train_state else {}  # a PromptTuning state
        self._insert(_Task(record, prompt, keys, state, key_groups=groups))
        logger.info("imported %s adapter %s as task %r", info["peft_type"], info["file"], name)
        return record

    # ------------------------------------------------------------------ inference
    def _call_kv(self, names: Sequence[str | None], table: Mapping[str, _Task] | None = None) -> list[PrefixKV | None]:
        """Each row's prompt prefix (``None`` for a row without a task), every task's fetched once: within one
        call a task is never recomputed, even when the call names more tasks than the cache budget holds.
        ``table``: the call's snapshot of the task table, so that the prefixes are those of the prompts whose
        templates and labels the call uses (a promote landing mid-call does not mix the two)."""
        table = self._tasks if table is None else table
        once = {n: self._prompt_kv(n, table[n].prompt) for n in dict.fromkeys(names) if n is not None}
        return [None if n is None else once[n] for n in names]

    def _prompt_kv(self, name: str, prompt: dict | None = None) -> PrefixKV:
        """Task ``name``'s prompt prefix (of ``prompt``, a snapshot's, else the serving one), cached.

        Cached with the prompt it was computed from: a prompt replaced meanwhile (promote, resume_task) never gets
        an old cache, even when a reader races the writer's invalidation; the prefix of a prompt that is no longer
        the serving one is computed for its caller but not cached."""
        if prompt is None:
            prompt = self._tasks[name].prompt
        with self._kv_lock:
            hit = self._kv.get(name)
            if hit is not None and hit[0] is prompt:
                self._kv.move_to_end(name)
                return hit[1]
        with torch.no_grad():
            kv = self._packed_kv(prompt_kv(self.backbone.model, prompt))
        nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        current = self._tasks.get(name)
        if current is None or current.prompt is not prompt:
            return kv  # stale (replaced or removed meanwhile): not worth a cache slot
        with self._kv_lock:  # evicted entries stay valid for callers holding them
            self._kv[name] = (prompt, kv, nbytes)
            self._kv.move_to_end(name)
            self._trim_kv()
        return kv

    @property
    def kv_cache_size(self) -> int:
        """At most how many tasks' prompt prefix caches inference keeps (default 256, :data:`KV_CACHE_SIZE`);
        :attr:`kv_cache_bytes` limits them too. Setting it evicts the least recently used beyond it."""
        return self._kv_cache_size

    @kv_cache_size.setter
    def kv_cache_size(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"kv_cache_size must be a positive int, got {n!r}")
        with self._kv_lock:
            self._kv_cache_size = n
            self._trim_kv()

    @property
    def kv_cache_bytes(self) -> int:
        """Byte budget of the prompt prefix caches (each task's per-layer prompt keys/values, computed on first
        use): least recently used tasks are evicted beyond it, and recomputed on their next use (same outputs).
        A miss costs one forward over the ``P`` prompt positions: for SmolLM2-135M, 20 positions, one CPU thread,
        about 0.6x the time of classifying one query with its task given (150 vs 250 ms on a loaded machine).

        Default: :data:`KV_CACHE_FRACTION` (5 %) of the backbone's parameter bytes, so the cache grows with the
        model it serves, not with the number of tasks, and stays small next to the weights every request reads
        anyway (SmolLM2-135M fp32: 26 MiB, 29 tasks at 0.88 MiB per 20-token prompt; a bf16 backbone halves
        both). Set an int (bytes; ``0`` caches nothing) or ``None`` (back to the default); setting it evicts at
        once. :attr:`kv_cache_size` (a task count) applies as well.
        """
        if self._kv_cache_bytes is not None:
            return self._kv_cache_bytes
        if self._param_bytes is None:  # the backbone never changes: counted once, not on every cache insert
            self._param_bytes = sum(p.numel() * p.element_size() for p in self.backbone.model.parameters())
        return int(KV_CACHE_FRACTION * self._param_bytes)

    @kv_cache_bytes.setter
    def kv_cache_bytes(self, n: int | None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"kv_cache_bytes must be an int >= 0 or None (the default), got {n!r}")
        with self._kv_lock:
            self._kv_cache_bytes = n
            self._trim_kv()

    @property
    def kv_cache_nbytes(self) -> int:
        """Bytes the cached prompt prefixes hold now (at most :attr:`kv_cache_bytes`)."""
        with self._kv_lock:
            return sum(entry[2] for entry in list(self._kv.values()))

    def _trim_kv(self) -> None:
        """Evict least recently used prefixes until both limits hold; the caller holds ``_kv_lock``."""
        budget = self.kv_cache_bytes
        held = sum(entry[2] for entry in list(self._kv.values()))  # list(): one step, writers pop without the lock
        while self._kv and (len(self._kv) > self._kv_cache_size or held > budget):
            try:
                held -= self._kv.popitem(last=False)[1][2]
            except KeyError:  # emptied meanwhile by a writer (remove_task, _insert, _replace)
                break

    @staticmethod
    def _packed_kv(kv: PrefixKV) -> PrefixKV:
        """``kv`` copied into one contiguous block, as per-layer views of it (same shapes and values). One
        allocation per task instead of two per layer: the cache does not fragment the heap (measured: 100 SmolLM2
        prefixes held ~30 MiB more RSS than their 88 MiB unpacked) and an evicted prefix frees its memory."""
        k0 = kv[0][0]
        if any(t.shape != k0.shape or t.dtype != k0.dtype or t.device != k0.device for pair in kv for t in pair):
            return kv  # layers of different shapes: kept as they are
        block = torch.empty((len(kv), 2, *k0.shape), dtype=k0.dtype, device=k0.device)
        for i, (k, v) in enumerate(kv):
            block[i, 0].copy_(k)
            block[i, 1].copy_(v)
        return [(block[i, 0], block[i, 1]) for i in range(len(kv))]

    def set_index(self, index: str = "flat", **options) -> None:
        """Change the FAISS index of the routing keys (used by ``routing="knn"``): ``"flat"`` (exact, default),
        ``"hnsw"`` (``hnsw_m``, ``ef_construction``, ``ef_search``) or ``"ivf"`` (``nlist``, ``nprobe``); see
        :class:`promptbank.router.Router`. Saved with the bank. Keys, ids and thresholds are unchanged."""
        with self._lock:
            self.router = self.router.copy(index=index, **options)

    def route(self, text: str, *, top_k: int = 3) -> Routing:
        """Rank tasks for one query; ``task`` is ``None`` when the first-ranked task's score is under its threshold
        (or the query fails :class:`Routing`'s ``guard``).

        ``ranked`` holds ``(task, score)`` pairs best first. With the learned router the scores are the per-label
        ones the thresholds apply to, and the ranking is by whichever discriminant that router chose (see
        :mod:`promptbank.lda`), so the scores need not decrease along ``ranked``."""
        if not isinstance(text, str):
            raise TypeError(f"route() takes one text, got {type(text).__name__}; route_many(texts) routes several")
        return self.route_many([text], top_k=top_k)[0]

    def route_many(self, texts: Sequence[str], *, top_k: int = 3) -> list[Routing]:
        return self._route(_as_texts(texts), top_k)[0]

    def _route(self, texts: list[str], top_k: int = 3) -> tuple[list[Routing], np.ndarray | None]:
        """-> (routings, the texts' routing embeddings, or None when the bank has no task)."""
        router = self.router  # one snapshot for the whole call (a concurrent writer publishes a new one)
        if not len(router):
            return [Routing(None, None, []) for _ in texts], None
        emb = self.embedder.encode(texts)
        if self.routing == "lda":
            scorer = self._learned_router(router)
            ranks, guards = scorer.route_guarded(emb, top_k=max(1, top_k))
        else:
            scorer, ranks, guards = router, router.route(emb, top_k=max(1, top_k)), [None] * len(texts)
        out = []
        for ranked, g in zip(ranks, guards, strict=True):
            best, score = ranked[0]
            threshold = float(scorer.threshold(best))
            guard = None if g is None else (g[0], g[1], float(scorer.threshold(g[0])))
            ok = score >= threshold and (guard is None or guard[1] >= guard[2])
            out.append(Routing(best if ok else None, score, ranked, threshold, guard))
        return out, emb

    def routing_thresholds(self) -> dict[str, float]:
        """Each task's "no task" threshold under the bank's routing scorer, on the scale of :class:`Routing`'s
        scores: a query goes to its first-ranked task when that task's score is at least this (and, where
        :class:`Routing` has a ``guard``, the guard task's score is at least its own). Set when the task
        is learned (``TrainConfig.threshold_quantile`` of held-out in-task queries fall under it); the learned
        router recalibrates them whenever the task set changes."""
        router = self.router
        if not len(router):
            return {}
        scorer = self._learned_router(router) if self.routing == "lda" else router
        return {name: float(scorer.threshold(name)) for name in router.tasks}

    def _learned_router(self, router: Router) -> GaussianRouter:
        """The learned router for this router snapshot (refitted from the keys when the task set changed)."""
        cached = self._lda
        if cached is not None and cached[0] is router:
            return cached[1]
        tasks = self._tasks
        if any(n in tasks and tasks[n].keys is not router.keys(n, copy=False) for n in router.tasks):
            # a writer changed some task's keys (routing examples) after this router snapshot was taken: its
            # groups in the table are for the new keys. Fit the newest consistent pair instead (writers publish both
            # under the lock).
            with self._lock:
                router, tasks = self.router, self._tasks
            cached = self._lda
            if cached is not None and cached[0] is router:
                return cached[1]
        spec = {}
        for name in router.tasks:
            keys, t = router.keys(name, copy=False), tasks.get(name)
            groups = t.key_groups if t is not None and t.key_groups is not None else None
            if groups is not None and len(groups) != len(keys):
                groups = None
            q = t.record.train_config.get("threshold_quantile", 0.05) if t is not None else 0.05
            spec[name] = (keys, groups, q, t.record.routing_examples if t is not None else 0)
        scorer = GaussianRouter(spec, router.dim)
        self._lda = (router, scorer)
        return scorer

    def _resolve_tasks(self, texts: list[str], task) -> tuple[list[str | None], list[float | None], np.ndarray | None]:
        """-> (task per text, routing score per text, routing embeddings when routed, else None)."""
        if task is None:
            routes, emb = self._route(texts)
            return [r.task for r in routes], [r.score for r in routes], emb
        names = [task] * len(texts) if isinstance(task, str) else list(task)
        if len(names) != len(texts):
            raise ValueError(f"got {len(names)} task names for {len(texts)} texts")
        for n in names:
            if n is not None:
                self._get(n)
        return names, [None] * len(texts), None

    def predict(
        self,
        texts: str | Sequence[str],
        task: str | Sequence[str | None] | None = None,
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[Prediction]:
        """Predict for each text. ``task=None`` routes each text; a name applies that task to all; a list
        gives one task (or ``None``) per text. Classification ranks the task's labels by likelihood; a
        generation task generates greedily, up to its ``max_target_tokens`` (its training targets' token cap;
        rows of several generation tasks: the largest). Texts with no task get ``output=None``. ``progress``: a
        progress bar over the texts (predicted :data:`EVAL_CHUNK` batches at a time)."""
        texts = _as_texts(texts)
        if progress and len(texts) > EVAL_CHUNK * batch_size:
            per_row = task is not None and not isinstance(task, str)
            if per_row and len(task) != len(texts):
                raise ValueError(f"got {len(task)} task names for {len(texts)} texts")
            return _in_chunks(
                list(range(len(texts))),
                lambda rows: self.predict(
                    [texts[i] for i in rows], [task[i] for i in rows] if per_row else task, batch_size=batch_size
                ),
                EVAL_CHUNK * batch_size,
                True,
                "predict",
            )
        names, scores, emb = self._resolve_tasks(texts, task)
        table = self._tasks  # one snapshot for the call: each task's template, labels and prompt belong together
        preds: list[Prediction | None] = [None] * len(texts)
        cls_rows = [i for i, n in enumerate(names) if n is not None and table[n].record.kind == "classification"]
        gen_rows = [i for i, n in enumerate(names) if n is not None and table[n].record.kind == "generation"]
        if cls_rows:
            tasks = [table[names[i]] for i in cls_rows]
            rows_text = [texts[i] for i in cls_rows]
            if self.is_encoder:  # per-task linear heads on the pooled encoder output
                logits = self._encoder_logits(  # each row cut as its task's training inputs were
                    rows_text,
                    [t.prompt for t in tasks],
                    [t.head for t in tasks],
                    [int(t.record.train_config.get("max_input_tokens", 256)) for t in tasks],
                    batch_size,
                    embeddings=None if emb is None else emb[cls_rows],
                    sides=[_truncation_side(t.record) for t in tasks],
                )
                scored = [torch.log_softmax(lg, -1) for lg in logits]
            else:  # rank each task's label set by likelihood behind its soft prompt
                scored = self._rank_rows(
                    rows_text,
                    [t.record.template for t in tasks],
                    self._call_kv([names[i] for i in cls_rows], table),
                    [self._label_ids(t.record) for t in tasks],
                    batch_size,
                    [_max_input_tokens(t.record) for t in tasks],
                    [_truncation_side(t.record) for t in tasks],
                )
                scored = self._with_probes(
                    scored, rows_text, [t.head for t in tasks], None if emb is None else emb[cls_rows]
                )
            for i, t, lp in zip(cls_rows, tasks, scored):
                labels = t.record.labels
                preds[i] = Prediction(
                    labels[int(lp.argmax())], names[i], scores[i], {lab: float(v) for lab, v in zip(labels, lp)}
                )
        if gen_rows:
            cap = max(_max_target_tokens(table[names[i]].record) for i in gen_rows)
            outs = self._generate(
                [texts[i] for i in gen_rows],
                [names[i] for i in gen_rows],
                table,
                max_new_tokens=cap,
                batch_size=batch_size,
            )
            for i, out in zip(gen_rows, outs):
                preds[i] = Prediction(out, names[i], scores[i])
        for i, n in enumerate(names):
            if n is None:
                preds[i] = Prediction(None, None, scores[i])
        return preds  # type: ignore[return-value]

    def _label_ids(self, record: TaskRecord) -> list[list[int]]:
        return _label_ids(self.backbone.tokenizer, record.label_texts, record.train_config.get("max_target_tokens"))

    def generate(
        self,
        texts: str | Sequence[str],
        task: str | Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Generate a continuation for each text behind its task's soft prompt (routed when ``task=None``).

        Texts with no task are answered by the plain backbone (through its chat template when it has one).
        Rows of different tasks share each forward. ``progress``: a progress bar over the rows, advanced batch by
        batch (when there is more than one batch); the outputs are the same with or without it, sampled ones too.
        """
        if self.is_encoder:
            raise ValueError(f"encoder backbone {self.backbone.name!r} classifies (predict); it cannot generate text")
        texts = _as_texts(texts)
        names, _, _ = self._resolve_tasks(texts, task)
        return self._generate(
            texts,
            names,
            self._tasks,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )

    def _generate(
        self,
        texts: list[str],
        names: list[str | None],
        table: Mapping[str, _Task],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = False,
        desc: str = "generate",
    ) -> list[str]:
        """:meth:`generate` for resolved task names, with templates and prompts from one task-table snapshot.
        ``progress``: a progress bar over the rows, advanced after each batch, or for a single batch over its
        decoding steps (one generator runs through all batches either way, so sampled outputs do not depend on
        it)."""
        gen = torch.Generator().manual_seed(seed)
        outputs: list[str] = []
        row_kv = self._call_kv(names, table)
        bar = on_step = None
        if progress and texts:
            from tqdm.auto import tqdm

            if len(texts) > batch_size:
                bar = tqdm(total=len(texts), desc=desc, unit="row", leave=False)
            else:  # one batch (a few long answers can take a minute): its decoding steps
                bar = tqdm(total=max_new_tokens, desc=desc, unit="token", leave=False)
                on_step = bar.update
        try:
            for s in range(0, len(texts), batch_size):
                outputs += self._generate_batch(
                    texts[s : s + batch_size],
                    names[s : s + batch_size],
                    row_kv[s : s + batch_size],
                    table,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    generator=gen,
                    on_step=on_step,
                )
                if bar is not None and on_step is None:
                    bar.update(min(batch_size, len(texts) - s))
        finally:
            if bar is not None:
                bar.close()
        return outputs

    def _generate_batch(
        self, texts, names, kv, table, *, max_new_tokens, temperature, top_p, generator, on_step=None
    ) -> list[str]:
        """One batch of :meth:`_generate`: its rows' inputs fitted to the positions, decoded answers."""
        tok, model = self.backbone.tokenizer, self.backbone.model
        inputs = self._fit_inputs(
            texts,
            [None if n is None else table[n].record.template for n in names],
            kv,
            max_new_tokens,
            "the answer",
            [None if n is None else _max_input_tokens(table[n].record) for n in names],
            ["right" if n is None else _truncation_side(table[n].record) for n in names],
        )
        ids = causal.generate(
            model,
            tok,
            kv,
            inputs,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            on_step=on_step,
        )
        return [tok.decode(x, skip_special_tokens=True).strip() for x in ids]

    def _plain_input(self, text: str) -> list[int]:
        tok = self.backbone.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return causal.encode_input(tok, text, causal.with_bos(tok, "{input}"))

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        data: Any,
        task: str | None = None,
        *,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        progress: bool = False,
    ) -> dict[str, float]:
        """Score :meth:`predict` on labelled data.

        Classification data (``{"text", "label"}`` rows): returns ``{"accuracy", "macro_f1", "n"}``; macro F1 is the
        mean F1 over the labels that occur in the data (:func:`promptbank.metrics.macro_f1`), the number to read
        when a few labels dominate.
        Generation data (``{"input", "target"}`` rows): each input is answered by greedy generation (what
        :meth:`predict` and :meth:`generate` do) and scored against its target as the SQuAD v1.1 script does
        (:mod:`promptbank.metrics`: lower case, no punctuation or articles): ``{"exact_match", "f1", "n"}`` as
        fractions, plus, with ``task`` given, ``"loss"``: the mean per-token cross-entropy of the targets behind
        the task's prompt (teacher-forced, as the task's ``dev_loss``). ``max_new_tokens``: default the task's
        ``max_target_tokens`` (its training targets' token cap; routed rows: the largest of their tasks').

        With ``task`` given this is the task's own score (no routing); with ``task=None`` every row is routed
        first, so routing errors count as wrong answers (a row routed to no task scores 0). ``progress``: a progress
        bar over the rows (classification rows are then predicted :data:`EVAL_CHUNK` batches at a time; generation
        moves it after each batch).
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        td = load_task_data(data, min_labels=1)  # a test set may hold one label
        rec = None if task is None else self._get(task).record
        if rec is not None and td.kind != rec.kind:
            raise ValueError(f"{td.source}: task {task!r} is a {rec.kind} task; this is {td.kind} data")
        if rec is not None and rec.kind == "classification":  # every gold label one the task can predict
            td = load_task_data(td, labels=rec.labels)
        if td.kind == "classification":
            texts = [ex.input for ex in td.examples]
            preds = [
                p.output
                for p in _in_chunks(
                    texts,
                    lambda chunk: self.predict(chunk, task, batch_size=batch_size),
                    EVAL_CHUNK * batch_size,
                    progress,
                    "evaluate",
                )
            ]
            golds = [ex.target for ex in td.examples]
            correct = sum(p == g for p, g in zip(preds, golds))
            occur = set(golds)
            present = [lab for lab in td.labels if lab in occur]  # the data's labels that occur in it
            return {"accuracy": correct / len(td), "macro_f1": macro_f1(preds, golds, present), "n": len(td)}
        return self._evaluate_generation(td, task, batch_size, max_new_tokens, progress)

    def _evaluate_generation(
        self, td: TaskData, task: str | None, batch_size: int, max_new_tokens: int | None, progress: bool = False
    ) -> dict[str, float]:
        if self.is_encoder:
            raise ValueError(f"encoder backbone {self.backbone.name!r} classifies; it cannot be scored on generation")
        texts = [ex.input for ex in td.examples]
        names, _, _ = self._resolve_tasks(texts, task)
        table = self._tasks  # one snapshot: prompts, templates and caps belong together
        if max_new_tokens is None:
            max_new_tokens = max((_max_target_tokens(table[n].record) for n in set(names) if n), default=64)
        outputs = self._generate(
            texts,
            names,
            table,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="evaluate",
        )
        kinds = [None if n is None else table[n].record.kind for n in names]
        # a row routed to no task, or to a classification task, gets no generated answer
        answers = [out if kind == "generation" else "" for out, kind in zip(outputs, kinds)]
        golds = [[ex.target] for ex in td.examples]
        result = {
            "exact_match": sum(exact_match(a, g) for a, g in zip(answers, golds)) / len(td),
            "f1": sum(f1_score(a, g) for a, g in zip(answers, golds)) / len(td),
            "n": len(td),
        }
        if task is not None:
            rec = table[task].record
            cut = truncate_inputs(
                td,
                self.backbone.tokenizer,
                int(rec.train_config.get("max_input_tokens", 256)),
                hint=" for the target loss, as training cut them (the answers were generated from whole inputs)",
                side=_truncation_side(rec),
            )
            result["loss"] = self._target_loss(rec, table[task].prompt, cut, batch_size)
        return result

    def _target_loss(self, record: TaskRecord, prompt, data: TaskData, batch_size: int) -> float:
        """Mean per-token cross-entropy of ``data``'s targets (label words for labels) behind ``prompt``, encoded
        with ``record``'s template and target cap: the task's ``dev_loss`` on other data."""
        enc = self._pair_encoder(record.template, _max_target_tokens(record), record.label_words)
        pairs = [enc(ex.input, ex.target) for ex in data.examples]
        return dev_loss(self.backbone.model, self.backbone.tokenizer, lambda: prompt, pairs, batch_size)

    def _accuracy(
        self,
        prompt: dict[int, torch.Tensor],
        labels: list[str],
        template: str,
        data: TaskData,
        max_target_tokens: int,
        batch_size: int = 16,
        *,
        label_words: Mapping[str, str] | None = None,
        head: Mapping[str, torch.Tensor] | None = None,
        embeddings: np.ndarray | None = None,
    ) -> float:
        """Accuracy of an (unstored) soft prompt on classification data (ranking each label's text), with the
        embedding probe of ``head`` when it has one (``embeddings``: the inputs' routing embeddings, if known)."""
        tok, model = self.backbone.tokenizer, self.backbone.model
        with torch.no_grad():
            kv = prompt_kv(model, prompt)
        n = len(data)
        label_ids = _label_ids(tok, label_texts(labels, label_words), max_target_tokens)
        inputs = [ex.input for ex in data.examples]
        ll = self._rank_rows(inputs, [template] * n, [kv] * n, [label_ids] * n, batch_size)
        ll = self._with_probes(ll, inputs, [head] * n, embeddings)
        return sum(labels[int(lp.argmax())] == ex.target for lp, ex in zip(ll, data.examples)) / n

    def _rank_rows(
        self, texts, templates, kvs, label_ids, batch_size: int, caps=None, sides=None
    ) -> list[torch.Tensor]:
        """Causal LM: label log-likelihoods per row (rows may use different prompts and label sets). ``caps``:
        each row's input token cap (its task's ``max_input_tokens``), ``None`` for none; ``sides``: each row's
        truncation side (its task's ``truncation_side``; default ``"right"``)."""
        tok, model = self.backbone.tokenizer, self.backbone.model
        caps = [None] * len(texts) if caps is None else caps
        sides = ["right"] * len(texts) if sides is None else sides
        out: list[torch.Tensor] = []
        for s in range(0, len(texts), batch_size):
            sl = slice(s, s + batch_size)
            reserve = max((len(x) for ids in label_ids[sl] for x in ids), default=0)
            inputs = self._fit_inputs(texts[sl], templates[sl], kvs[sl], reserve, "the labels", caps[sl], sides[sl])
            out += causal.rank_labels(model, tok, kvs[sl], inputs, label_ids[sl])
        return out

    def _encoder_tokens(self, max_tokens: int, *, warn: bool = False) -> int:
        """``max_tokens`` capped at the encoder's position limit (its config's, and its tokenizer's
        ``model_max_length`` when set), so that no row runs past the position table (an IndexError otherwise);
        ``warn``: say so when the cap bites (training, where ``max_input_tokens`` was asked for). The RoBERTa family
        numbers positions from ``padding_idx + 1``, which takes that many from its table."""
        from .encoder import position_offset

        model = self.backbone.model
        table = _max_positions(model)
        table = None if table is None else table - position_offset(model)
        caps = [table, getattr(self.backbone.tokenizer, "model_max_length", None)]
        limit = min((c for c in caps if isinstance(c, int) and 0 < c < 1_000_000), default=max_tokens)
        if warn and max_tokens > limit:
            warnings.warn(
                f"max_input_tokens={max_tokens} is more than the encoder's {limit} positions; inputs are cut to "
                f"{limit} tokens",
                UserWarning,
                stacklevel=4,
            )
        return min(max_tokens, limit)

    def _fit_inputs(
        self,
        texts: Sequence[str],
        templates: Sequence[str | None],
        kvs: Sequence[PrefixKV | None],
        reserve: int,
        what: str,
        caps: Sequence[int | None],
        sides: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """Token ids of each row's input (``causal.encode_input`` with its template; a row whose template is ``None``
        has no task: the plain backbone's input). ``caps``: each row's input token cap (:func:`_max_input_tokens`:
        a classification task's ``max_input_tokens``; ``None``: none); a longer text is first cut to it exactly as
        training cut the task's inputs (:func:`promptbank.tasks.cut_to_tokens` on the row's side of ``sides``,
        its task's ``truncation_side``; default ``"right"``), silently, since that is the task's setting. A row
        whose soft prompt + input + ``reserve`` more tokens (label or answer tokens) would still run past the
        backbone's position limit has its text cut further on the same side until it fits; one ``UserWarning``
        says how many. Models without a position limit in their config are not cut there."""
        tok = self.backbone.tokenizer
        limit = _max_positions(self.backbone.model)

        def encode(text: str, template: str | None) -> list[int]:
            return self._plain_input(text) if template is None else causal.encode_input(tok, text, template)

        sides = ["right"] * len(texts) if sides is None else sides
        out, n_cut = [], 0
        for text, template, kv, cap, side in zip(texts, templates, kvs, caps, sides, strict=True):
            if cap is not None and template is not None:
                text = cut_to_tokens(tok, text, cap, side)
            ids = encode(text, template)
            room = None if limit is None else limit - reserve - (0 if kv is None else int(kv[0][0].shape[-2]))
            if room is not None and len(ids) > room:
                tokens = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
                keep = len(tokens) - (len(ids) - room)  # the template's own tokens stay
                while keep >= 1:
                    ids = encode(tok.decode(keep_ids(tokens, keep, side), skip_special_tokens=True), template)
                    if len(ids) <= room:
                        break
                    keep -= 1  # re-tokenizing a cut text can give more tokens (merges across the cut)
                if keep < 1:
                    raise ValueError(
                        f"the backbone's {limit} positions leave no room for an input: the soft prompt, the template "
                        f"and up to {reserve} tokens of {what} take them all"
                    )
                n_cut += 1
            out.append(ids)
        if n_cut:
            warnings.warn(
                f"cut {n_cut} of {len(texts)} inputs to fit the backbone's {limit} positions (soft prompt + input + "
                f"up to {reserve} tokens of {what})",
                UserWarning,
                stacklevel=4,
            )
        return out

    def prompt_prefix(self, name: str) -> PrefixKV:
        """Task ``name``'s soft prompt as its per-layer key/value prefix, the ``row_kv`` entry that the
        :mod:`promptbank.causal` functions take. Computed on first use, then cached (until the task is removed).
        """
        self._get(name)
        return self._prompt_kv(name)

    def prompt_embeds(
        self, texts: str | Sequence[str], task: str | Sequence[str | None] | None = None
    ) -> list[torch.Tensor]:
        """Each text as the input-embedding sequence the bank's forward sees, for serving with vLLM
        (``llm.generate({"prompt_embeds": e})`` on an engine made with ``enable_prompt_embeds=True``).

        One float32 CPU tensor ``(P + T, hidden_size)`` per text: its task's soft prompt vectors, then the token
        embeddings of its templated input exactly as :meth:`predict` / :meth:`generate` build it. ``task`` routes
        as in :meth:`predict`; a text with no task gets the plain token embeddings (``T`` rows, no prompt) of the
        input :meth:`generate` would give the backbone. Input-level methods only (``prompt_tuning``,
        ``ptuning_mlp``, ``ptuning_lstm``): a ``deep`` task or an encoder bank raises ``ValueError``. A
        classification task's embedding probe is not part of it (the engine sees the prompt alone). See
        :func:`promptbank.export.prompt_embeds`.
        """
        from .export import prompt_embeds

        return prompt_embeds(self, texts, task)


@dataclass
class _Fit:
    """What :meth:`PromptBank._fit` trained (nothing stored yet)."""

    result: TrainResult
    head: dict[str, torch.Tensor] | None
    dev_accuracy: float | None
    warm_from: list[dict[str, Any]]
    num_train: int
    num_dev: int
    keep_train_state: bool

    @property
    def prompt(self) -> dict[int, torch.Tensor]:
        return self.result.prompt

    @property
    def train_state(self) -> dict[str, torch.Tensor]:
        return self.result.train_state if self.keep_train_state else {}

    def record(
        self,
        name: str,
        variant: str,
        task_data: TaskData,
        pconf: PromptConfig,
        tconf: TrainConfig,
        template: str,
        threshold: float,
        label_words: dict[str, str] | None = None,
    ) -> TaskRecord:
        r = self.result
        return TaskRecord(
            name=name,
            kind=task_data.kind,
            labels=list(task_data.labels) if task_data.labels else None,
            prompt_config=pconf.to_dict(),
            train_config=tconf.to_dict(),
            template=template,
            num_train=self.num_train,
            num_dev=self.num_dev,
            steps=r.steps,
            best_step=r.best_step,
            dev_loss=r.best_dev_loss,
            dev_accuracy=self.dev_accuracy,
            train_seconds=round(r.seconds, 3),
            threshold=threshold,
            warm_start_from=self.warm_from,
            history=r.history,
            variant=variant,
            label_words=label_words,
        )


def _label_set(record: TaskRecord) -> tuple:
    """What a task's prompt variants must share: kind, labels and label words."""
    return record.kind, record.labels, record.label_words or None


def _load_train_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a stored train state into a freshly built module (copies), refusing one that does not fit it."""
    want = module.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [
        f"{k} {list(state[k].shape)} (expected {list(want[k].shape)})"
        for k in want
        if k in state and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    if missing or extra or bad:
        raise ResumeError(
            f"{what}: the stored train state does not fit the task's prompt config "
            f"(missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {bad[:5]})"
        )
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})


def _check_variant_name(variant: str) -> str:
    """Variant names follow the task-name rules (they become folder names too)."""
    try:
        return validate_task_name(variant)
    except ValueError:
        raise ValueError(
            f"invalid variant name {variant!r}: use 1-128 letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-', no '..')"
        ) from None


def _variant_of(task: _Task, variant: str | None) -> _Variant:
    """Prompt variant ``variant`` of ``task`` (``None``: the serving one)."""
    if variant is None or variant == task.record.variant:
        return task.serving()
    try:
        return task.variants[variant]
    except KeyError:
        known = ", ".join([task.record.variant, *task.variants])
        raise VariantNotFoundError(
            f"task {task.record.name!r} has no prompt variant {variant!r} (variants: {known})"
        ) from None


def _in_chunks(rows: list, fn, size: int, progress: bool, desc: str, *, unit: str = "row", join=None):
    """``fn(rows)``, or with ``progress`` (and more than ``size`` rows) ``fn`` over consecutive chunks of ``size``
    rows under a progress bar, the parts joined by ``join`` (default: list concatenation). Callers pass a
    ``size`` of whole batches, so each chunk is batched as the whole call would be."""
    if not progress or len(rows) <= size:
        return fn(rows)
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=len(rows), desc=desc, unit=unit, leave=False) as bar:
        for i in range(0, len(rows), size):
            parts.append(fn(rows[i : i + size]))
            bar.update(min(size, len(rows) - i))
    return join(parts) if join is not None else [x for part in parts for x in part]


def _stratified_subset(groups: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` rows, each group keeping its share (and at least one row)."""
    n = len(groups)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(groups, return_counts=True)
    quota = np.maximum(1, np.floor(counts * limit / n)).astype(int)
    chosen = [
        rng.choice(np.flatnonzero(groups == g), size=min(q, c), replace=False) for g, q, c in zip(ids, quota, counts)
    ]
    return np.sort(np.concatenate(chosen))


def _top_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Row-wise mean of the ``k`` largest values of a (n, m) similarity matrix (the router's task score)."""
    k = min(k, sims.shape[1])
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


def _cluster_groups(emb: np.ndarray, n_prototypes: int, seed: int) -> np.ndarray:
    """Each row's k-means cluster (one per ~4 rows, at most ``n_prototypes``): the key groups of inputs that have
    no labels (generation tasks' training inputs, routing examples)."""
    centers = make_prototypes(emb, min(n_prototypes, max(1, len(emb) // 4)), seed=seed)
    return np.argmax(emb @ centers.T, axis=1).astype(np.int64)


def _loo_scores(emb: np.ndarray, k: int) -> np.ndarray:
    """Leave-one-out routing scores of a task's own inputs against its other inputs."""
    if len(emb) < 2:
        return np.zeros(0, dtype=np.float32)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return _top_mean(sims[:, :], min(k, len(emb) - 1))


def _truncation_side(record: TaskRecord) -> str:
    """Where the task's over-long inputs are cut (``TrainConfig.truncation_side``; tasks stored before the setting
    existed were cut on the right)."""
    return str(record.train_config.get("truncation_side") or "right")


def _max_target_tokens(record: TaskRecord) -> int:
    """The task's training-target token cap: how long its labels may be, and its generated answers by default."""
    return int(record.train_config.get("max_target_tokens", 64))


def _max_input_tokens(record: TaskRecord) -> int | None:
    """The input token cap that inference applies to a causal-LM task's inputs: a classification task's
    ``max_input_tokens``, as its training inputs were cut (``benchmarks/input_cut.py``); ``None`` (whole inputs)
    for a generation task, whose question may come after a long context (retrieval-augmented answering), where
    cutting the tail would drop what is asked."""
    cap = record.train_config.get("max_input_tokens")
    return None if cap is None or record.kind != "classification" else int(cap)


def check_template(template: Any) -> None:
    """Raise ``ValueError`` unless ``template`` is a string whose only field is ``{input}`` (what a bank's manifest
    accepts: other fields, attribute lookups or format specs are refused), with a hint for literal braces."""
    from .storage import _check_template

    if not _check_template(template):
        raise ValueError(
            f"template must be a string with {{input}} as its only field (write literal braces as {{{{ and }}}}), got "
            f"{template!r:.200}"
        )


def _max_positions(model: torch.nn.Module) -> int | None:
    """The backbone's position limit from its config (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _label_ids(tokenizer, labels: Sequence[str], max_target_tokens: int | None) -> list[list[int]]:
    """Token ids of each label as a training target (what the soft prompt was trained to produce)."""
    return [causal.encode_target(tokenizer, lab, max_target_tokens) for lab in labels]


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return out
