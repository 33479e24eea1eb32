"""Configuration dataclasses. Each validates itself in ``__post_init__`` and round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class Method(str, Enum):
    """Soft-prompt methods."""

    PROMPT_TUNING = "prompt_tuning"  # Lester et al. 2021: P free input vectors
    PTUNING_MLP = "ptuning_mlp"  # Liu et al. 2021 (P-Tuning v1), MLP prompt encoder
    PTUNING_LSTM = "ptuning_lstm"  # P-Tuning v1, bidirectional-LSTM prompt encoder
    DEEP = "deep"  # Liu et al. 2022 (P-Tuning v2): prompt vectors at every (chosen) layer

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        if isinstance(value, Method):
            return value
        aliases = {
            "pt": "prompt_tuning",
            "ptuning": "ptuning_mlp",
            "p_tuning": "ptuning_mlp",
            "mlp": "ptuning_mlp",
            "lstm": "ptuning_lstm",
            "ptuning_v2": "deep",
            "prefix": "deep",
        }
        key = str(value).strip().lower().replace("-", "_")
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown soft-prompt method {value!r}; choose one of: {choices}") from None


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass
class PromptConfig:
    """Shape of a soft prompt.

    ``layers`` (deep prompts only): ``None`` = every decoder layer, else a list of layer indices; layer 0 (the
    input embedding) is always included. ``encoder_hidden``: hidden size of the P-Tuning prompt encoder
    (default: the model's hidden size).
    """

    method: Method = Method.PROMPT_TUNING
    num_virtual_tokens: int = 20
    layers: list[int] | None = None
    encoder_hidden: int | None = None

    def __post_init__(self) -> None:
        self.method = Method.parse(self.method)
        if not isinstance(self.num_virtual_tokens, int) or not 1 <= self.num_virtual_tokens <= 512:
            raise ValueError(f"num_virtual_tokens must be an int in [1, 512], got {self.num_virtual_tokens!r}")
        if self.layers is not None:
            if self.method is not Method.DEEP:
                raise ValueError(f"layers= applies to deep prompts only, not {self.method.value}")
            if any(not isinstance(x, int) or x < 0 for x in self.layers):
                raise ValueError(f"layers must be non-negative ints, got {self.layers!r}")
            self.layers = sorted(set(self.layers) | {0})
        if self.encoder_hidden is not None and self.encoder_hidden < 1:
            raise ValueError(f"encoder_hidden must be positive, got {self.encoder_hidden}")

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The decoder layers that receive prompt vectors, for a model with ``num_layers`` layers."""
        if self.method is not Method.DEEP:
            return [0]
        layers = list(range(num_layers)) if self.layers is None else self.layers
        bad = [x for x in layers if x >= num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {num_layers}-layer model")
        return layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptConfig:
        return _from_dict(cls, data)


# Default learning rates (AdamW). Prompt tuning and P-Tuning encoders: absolute. Deep prompts: relative to each
# layer's scale (see promptbank.prompts.DeepPrompt). First chosen on dev loss of the bundled example tasks with
# SmolLM2-135M (80 steps). Deep prompts then measured on real data by ``benchmarks/lr_study.py`` (held-out rows of
# six datasets' train pools, 3 seeds): mean held-out accuracy 66.2 % at 3e-2 vs 60.0 % at the first choice 1e-1
# (better in 13 of 18 runs, worse in 3) and 64.0 % at 1e-2. At 1e-1 the training loss bounced back right after the
# warm-up and was still 0.17-0.32 over the last ten of 80 steps (TREC, seed 0); at 3e-2 it fell to 0.00-0.01.
# Pass lr= to override.
DEFAULT_LR = {
    Method.PROMPT_TUNING: 3e-2,
    Method.PTUNING_MLP: 1e-2,
    Method.PTUNING_LSTM: 1e-2,
    Method.DEEP: 3e-2,
}
# Encoder backbones (BERT family; linear head on the pooled output, head_lr separately): chosen on SST-2 dev
# accuracy by ``benchmarks/efficiency.py --lr-sweep`` on all-MiniLM-L6-v2 (deep: 1e-2 89.1 %, 3e-2 85.9 %, 1e-1
# 82.8 %), in line with P-Tuning v2's 5e-3 - 1e-2 for deep prompts on BERT-family models.
DEFAULT_LR_ENCODER = {
    Method.PROMPT_TUNING: 1e-2,
    Method.PTUNING_MLP: 1e-3,
    Method.PTUNING_LSTM: 1e-3,
    Method.DEEP: 1e-2,
}


# Training objectives of a causal-LM classification task (TrainConfig.objective)
OBJECTIVES = ("lm", "labels", "labels+lm")
PRECISIONS = ("fp32", "bf16")  # TrainConfig.precision: the training forwards' matrix products
TRUNCATION_SIDES = ("right", "left", "middle")
"""Where an over-long input is cut (``TrainConfig.truncation_side``): ``"right"`` cuts its end and keeps the first
tokens (as Hugging Face tokenizers truncate); ``"left"`` cuts its start and keeps the last tokens (an input whose
question or instruction comes after a long context); ``"middle"`` keeps the first half and the last half of the
allowed tokens (instructions or questions at either end, a long document between). ``TrainConfig`` also takes
``"auto"`` (the default): :func:`resolve_truncation_side`."""


def resolve_truncation_side(side: str, kind: str) -> str:
    """The side a task of ``kind`` is cut on: ``side`` itself, or for ``"auto"`` ``"middle"`` on generation tasks (a
    question or instruction may come first or last; on RAG-style answer inputs, passages then the question, keeping
    both ends answered best: README, "Where to cut inputs that end with their question") and ``"right"`` on
    classification tasks (measured with it: "Inference inputs cut like training inputs")."""
    if side == "auto":
        return "middle" if kind == "generation" else "right"
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be 'auto' or one of {', '.join(map(repr, TRUNCATION_SIDES))}")
    return side


@dataclass
class TrainConfig:
    """Training options for :meth:`PromptBank.learn_task`.

    ``max_steps`` optimizer steps of ``batch_size`` examples, AdamW with linear warm-up over ``warmup_ratio`` of
    the steps then linear decay; every ``eval_every`` steps the dev set is measured and the best soft prompt
    kept (``select_on``); training stops after ``patience`` evaluations without improvement. ``dev_fraction`` of the data is
    held out when no dev set is given. ``lr=None`` picks the method's default (:data:`DEFAULT_LR` on causal LMs, :data:`DEFAULT_LR_ENCODER` on encoders).
    ``init``: ``"text"`` starts the soft prompt from the tokens of an instruction naming the task's labels,
    ``"vocab"`` from randomly sampled vocabulary tokens; with ``warm_start`` and a stored task of the same shape,
    the mix of the soft prompts of the ``warm_start_k`` stored tasks that the router sends the most of the new
    task's training inputs to (weighted by that share; only shares >= ``warm_start_min_similarity``) is used
    instead; on encoder backbones the head starts from those of these tasks that have all the new task's labels
    (rows matched by label name) and a share >= ``warm_start_head_min_similarity`` (default 0.5: most of the new
    task's inputs look like the source's; a head is a task's decision boundary, and mixing in the heads of weakly
    similar tasks hurt: on CR, SST-2's and MR's heads at shares 0.10 / 0.04 cost 7.8 points in
    ``benchmarks/transfer.py``), else at zero. ``keep_train_state`` stores the prompt module's state
    (P-Tuning encoders are much larger than the folded prompt) so training can be resumed.
    ``max_input_tokens``: inputs longer than this many tokens are cut to it (one warning says how many), on
    ``truncation_side`` (:data:`TRUNCATION_SIDES`): ``"right"`` keeps the first tokens, ``"left"`` the last (an
    input that ends with its question after a long context), ``"middle"`` the first and last halves; ``"auto"``
    (default) is ``"middle"`` for generation tasks and ``"right"`` for classification
    (:func:`resolve_truncation_side`). The task keeps both (the side resolved), and inference cuts a classification
    task's inputs the same way (generation tasks' inputs are given whole, as far as the backbone's positions allow,
    cut on the same side beyond that).
    ``length_bucketing`` (off by default): batches group examples of similar length (sorted within chunks of 50
    batches, batch order shuffled; every example still once per epoch), so little compute goes to padding (AG
    News at batch 16: 39.5 % -> 4.5 % padded positions). Off by default because where length goes with the label
    (short positive vs long negative reviews, a small dataset sorted whole) batches become nearly single-label and
    training suffers: on a 2-label toy task whose labels differ by one token, the dev loss rose instead of falling.
    Routing: the task's keys are the routing embeddings of at most ``max_keys`` training inputs (label-stratified),
    grouped by label (classification) or into ``n_prototypes`` k-means clusters (generation); the "no task"
    threshold rejects ``threshold_quantile`` of held-out in-task queries. ``max_embedded``: at most this many
    training inputs (label-stratified, seeded) go through the routing embedder: the keys are drawn from them, and
    the cosine threshold's held-out scores, warm start's routing shares and the embedding probe use them (every row
    stays in the training pool). A time budget for a large dataset's embedding pass; a dataset with at most that many
    training rows is embedded whole (fewer cost the probe accuracy on CLINC150's 150 labels: README, Data).
    ``select_on``: which dev number picks the state that is kept. ``"loss"``: the lowest dev loss.
    ``"accuracy"``: the highest dev accuracy, ties broken by the lower dev loss (classification on an encoder
    backbone, where the dev forward gives both at once). ``"auto"`` (default): accuracy where it is measured,
    else loss. Why accuracy on encoders: a new linear head starts at zero (uniform predictions, dev loss ln C);
    on a small dev set a trained head that is right more often but confidently wrong on a few examples has a
    higher loss than that. (That zero head is never kept in any case: on CL-4's Amazon, 8 dev examples, it also
    tied on accuracy; a warm-started or resumed starting state is a candidate.)
    ``objective`` (classification on causal LMs; encoder heads always train on the labels' cross-entropy):
    ``"lm"`` (default) trains the soft prompt to produce the gold label's tokens (mean per-token cross-entropy);
    ``"labels"`` trains it to rank the gold label above the task's other labels, the way :meth:`predict` scores
    them (cross-entropy over the labels' summed log-likelihoods, :func:`promptbank.causal.label_loss`);
    ``"labels+lm"`` adds the first to the second. With either label objective the dev loss is that label
    cross-entropy and ``select_on="auto"`` keeps the state with the best dev accuracy (ties: lower dev loss).
    Each step also scores every (row, label) continuation: roughly 1.1-2x the step time at 2-6 labels, ~4x at 15
    (SmolLM2-135M). A task with more than ``label_subset`` labels ranks each batch's gold labels among that many
    (the rest drawn at random per step; sampled softmax), which bounds that cost. Not the default: on held-out
    train-pool rows it helped some tasks a lot and hurt others (README, "Training objective for classification").
    ``probe`` (classification tasks): after training, also fit an embedding probe, a logistic regression on the
    routing embeddings of the training inputs (L2-penalised, scikit-learn's ``C = probe_c``), stored in the task's
    ``head.safetensors``; the task's label scores are then the sum of the probe's log-probabilities and those of
    the prompted head (encoder backbones) or of the causal LM's label ranking (softmax over the labels' summed
    log-likelihoods), renormalised. Routed queries already have their embedding, so it costs no extra forward
    there (with the task given, one embedder call per batch). Why: with few examples the prompt and the probe err
    differently. Encoders: on CL-4 (16 examples per label) it added 0.1-0.8 ACC points per seed (mean 0.5),
    mostly on Amazon's 5-way ratings, where the prompted head alone is weak and unstable
    (``benchmarks/forgetting.py`` reports both). Causal LMs: see the README ("Embedding probe for causal-LM
    classification", ``benchmarks/probe_gate.py``). The record's dev accuracy is the combined task's with the
    probe fitted on the training part only; then, with ``probe_refit`` (default), the stored probe is refitted on
    the training and dev rows together (nothing of it is chosen on the dev rows: ``probe_c`` is fixed), so it
    learns from every labelled row, as a baseline fitted on all of them would (held out on CL-4: +0.4 points,
    ``benchmarks/probe_refit.py``; on its test sets -0.1). ``probe=False``: the prompt alone, which is also what a task's PEFT
    adapter or vLLM ``prompt_embeds`` export reproduces (neither carries the probe).
    ``precision``: ``"fp32"`` (default) or ``"bf16"``, the training forwards' matrix products in bfloat16 under
    ``torch.autocast`` (mixed precision: the backbone's weights, the soft prompt, its optimizer state and the
    backward's accumulation stay float32; dev evaluation and every later use of the task run in the backbone's
    own dtype, so a task trained either way is stored and served alike). On CPUs with native bf16 (AVX512-BF16,
    AMX) ``learn_task`` took 0.70x the time on the MiniLM encoder and 0.61x on SmolLM2-135M (medians), with held-out
    accuracy within noise of fp32 (README, "Mixed-precision training"); elsewhere it is slower, and a warning says
    so.
    ``balance_labels`` (classification, off by default): for data whose labels are far from equally common. Training
    batches are drawn label-balanced (each row's label uniform over the labels, then a row of that label, each
    label's rows cycled in a fresh shuffled order), the embedding probe weighs each row by ``n / (L * n_label)``
    (scikit-learn's ``class_weight="balanced"``), and where the dev accuracy picks the kept state (encoders, the
    label objectives) it is the balanced accuracy (the mean of the labels' recalls) and the dev loss the mean of
    the labels' mean losses (a causal LM's default ``"lm"`` objective selects on its per-token dev loss, which stays
    unweighted: there the balancing acts through the batches and the probe). The record's ``dev_accuracy`` stays
    the plain accuracy. It trades accuracy on the
    common labels for recall on the rare ones: held out on UNFAIR-ToS (90 % one label) macro-F1 rose and accuracy
    fell (``benchmarks/balance_labels.py``).
    """

    max_steps: int = 100
    batch_size: int = 8
    length_bucketing: bool = False
    lr: float | None = None
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 10
    patience: int = 5
    dev_fraction: float = 0.1
    max_dev: int = 64
    max_input_tokens: int = 256
    max_target_tokens: int = 64
    truncation_side: str = "auto"
    seed: int = 0
    progress: bool = True
    init: str = "text"
    warm_start: bool = True
    warm_start_k: int = 3
    warm_start_min_similarity: float = 0.25
    warm_start_head_min_similarity: float = 0.5
    keep_train_state: bool = True
    n_prototypes: int = 16
    max_keys: int = 256
    max_embedded: int = 16384
    threshold_quantile: float = 0.05
    select_on: str = "auto"
    objective: str = "lm"
    label_subset: int = 32
    probe: bool = True
    probe_c: float = 10.0
    probe_refit: bool = True
    precision: str = "fp32"
    balance_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "length_bucketing": isinstance(self.length_bucketing, bool),
            "lr": self.lr is None or self.lr > 0,
            "head_lr": self.head_lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "grad_clip": self.grad_clip >= 0,
            "eval_every": self.eval_every >= 1,
            "patience": self.patience >= 1,
            "dev_fraction": 0 <= self.dev_fraction < 1,
            "max_dev": self.max_dev >= 1,
            "max_input_tokens": self.max_input_tokens >= 1,
            "max_target_tokens": self.max_target_tokens >= 1,
            "truncation_side": self.truncation_side in ("auto", *TRUNCATION_SIDES),
            "init": self.init in ("text", "vocab"),
            "warm_start_k": self.warm_start_k >= 1,
            "warm_start_min_similarity": 0 <= self.warm_start_min_similarity <= 1,
            "warm_start_head_min_similarity": 0 <= self.warm_start_head_min_similarity <= 1,
            "n_prototypes": self.n_prototypes >= 1,
            "max_keys": self.max_keys >= 1,
            "max_embedded": self.max_embedded >= 1,
            "threshold_quantile": 0 <= self.threshold_quantile < 1,
            "select_on": self.select_on in ("auto", "loss", "accuracy"),
            "objective": self.objective in OBJECTIVES,
            "label_subset": isinstance(self.label_subset, int) and self.label_subset >= 2,
            "probe": isinstance(self.probe, bool),
            "probe_c": isinstance(self.probe_c, (int, float)) and self.probe_c > 0,
            "probe_refit": isinstance(self.probe_refit, bool),
            "precision": self.precision in PRECISIONS,
            "balance_labels": isinstance(self.balance_labels, bool),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid TrainConfig.{name}: {getattr(self, name)!r}")
        if self.balance_labels and self.length_bucketing:
            raise ValueError("balance_labels and length_bucketing each choose the batches: pass one of them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)
