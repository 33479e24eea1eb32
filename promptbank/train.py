"""The training loop: only soft-prompt parameters learn; the backbone stays frozen and bit-identical.

One explicit loop, top to bottom: AdamW with linear warm-up and decay, gradient clipping, dev loss every
``eval_every`` steps with early stopping (the best soft prompt is kept), NaN/inf detection, a progress bar.
The prompt's prefix keys/values are computed once per batch (at batch size 1) and shared by all rows.

When the examples' lengths are known, batches are length-bucketed (rows of similar length share a batch, so little
compute goes to padding). Under a distributed launcher (``torchrun``, ``accelerate launch``) the same loop runs
data-parallel, with no change to the caller's code: see :class:`_DataParallel`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .causal import label_cross_entropy, label_loss, label_scores, lm_loss
from .config import TrainConfig
from .errors import TrainingDivergedError
from .inject import model_device, prompt_kv
from .prompts import SoftPromptModule

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]  # (input ids, target ids)


@dataclass
class TrainResult:
    prompt: dict[int, torch.Tensor]  # folded best soft prompt {layer: (P, d)}
    train_state: dict[str, torch.Tensor]  # module state at the best step (encoders included), to resume
    steps: int
    best_step: int
    best_dev_loss: float | None
    stopped_early: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


def _check_frozen(model: nn.Module) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(f"backbone parameters must be frozen; trainable: {trainable[:5]}")


def _batch_loss(model, tokenizer, module: SoftPromptModule, pairs: Sequence[Pair]) -> torch.Tensor:
    kv = prompt_kv(model, module())  # once per batch, shared by its rows
    return lm_loss(model, tokenizer, [kv] * len(pairs), [p[0] for p in pairs], [p[1] for p in pairs])


def _label_batch_loss(
    model,
    tokenizer,
    module: SoftPromptModule,
    pairs: Sequence[Pair],
    label_ids: Sequence[list[int]],
    gold: list[int],
    lm_weight: float = 0.0,
) -> torch.Tensor:
    kv = prompt_kv(model, module())  # once per batch, shared by its rows
    inputs = [p[0] for p in pairs]
    return label_loss(model, tokenizer, [kv] * len(pairs), inputs, [label_ids] * len(pairs), gold, lm_weight)


@torch.no_grad()
def dev_label_metrics(
    model,
    tokenizer,
    module: SoftPromptModule,
    dev: Sequence[Pair],
    label_ids: Sequence[list[int]],
    gold: list[int],
    batch_size: int,
    balanced: bool = False,
) -> tuple[float, float]:
    """(mean label cross-entropy, accuracy) of the dev rows under the label objective; ``balanced``: each the
    mean over the gold labels of their rows' mean (:func:`balanced_mean`)."""
    kv = prompt_kv(model, module())
    losses: list[float] = []
    hits: list[float] = []
    for s in range(0, len(dev), batch_size):
        chunk = dev[s : s + batch_size]
        scores = label_scores(model, tokenizer, [kv] * len(chunk), [p[0] for p in chunk], [label_ids] * len(chunk))
        chunk_gold = gold[s : s + batch_size]
        losses += label_cross_entropy(scores, chunk_gold).tolist()
        hits += [float(int(sc.argmax()) == g) for sc, g in zip(scores, chunk_gold)]
    if balanced:
        return balanced_mean(losses, gold), balanced_mean(hits, gold)
    return sum(losses) / max(len(dev), 1), sum(hits) / max(len(dev), 1)


@torch.no_grad()
def dev_loss(model, tokenizer, module: SoftPromptModule, dev: Sequence[Pair], batch_size: int) -> float:
    """Mean per-token loss on ``dev`` (token-weighted over the whole set)."""
    kv = prompt_kv(model, module())
    total, count = 0.0, 0
    for s in range(0, len(dev), batch_size):
        chunk = dev[s : s + batch_size]
        n = sum(len(p[1]) for p in chunk)
        total += float(lm_loss(model, tokenizer, [kv] * len(chunk), [p[0] for p in chunk], [p[1] for p in chunk])) * n
        count += n
    return total / max(count, 1)


def _batches(n: int, batch_size: int, rng: random.Random):
    """Endless shuffled epochs of index batches (the last partial batch of an epoch is kept)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, n, batch_size):
            yield order[s : s + batch_size]


def _balanced_batches(labels: Sequence[int], batch_size: int, rng: random.Random):
    """Endless label-balanced index batches: each row's label drawn uniformly from the labels present, then the
    next row of that label, each label's rows cycled in a fresh shuffled order (a rare label's rows repeat more
    often than a common label's; none is skipped within its cycle)."""
    pools: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        pools.setdefault(int(lab), []).append(i)
    keys = sorted(pools)
    queues: dict[int, list[int]] = {k: [] for k in keys}
    while True:
        batch = []
        for _ in range(batch_size):
            k = keys[rng.randrange(len(keys))]
            if not queues[k]:
                queues[k] = pools[k][:]
                rng.shuffle(queues[k])
            batch.append(queues[k].pop())
        yield batch


def balanced_mean(values: Sequence[float], groups: Sequence[Hashable]) -> float:
    """The mean over groups of each group's mean value (with 0/1 hits and labels as groups: balanced accuracy)."""
    sums: dict[Hashable, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(float(v))
    return sum(sum(v) / len(v) for v in sums.values()) / max(len(sums), 1)


BUCKET_BATCHES = 50  # length-bucketed batches are sorted by length within chunks of this many batches


def _bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random):
    """Endless epochs of length-bucketed index batches: rows are padded to the longest in their batch, so batches
    of similar lengths waste little compute on padding.

    Each epoch: shuffle all indices, cut them into chunks of ``BUCKET_BATCHES * batch_size``, sort each chunk by
    length (stable: equal lengths keep their shuffled order), split the chunks into batches, shuffle the order of
    the batches. Every example appears exactly once per epoch; only the last chunk can end in a partial batch.
    Sorting within chunks rather than over the whole set keeps some randomness in which examples share a batch.
    """
    n, chunk = len(lengths), BUCKET_BATCHES * batch_size
    while True:
        order = list(range(n))
        rng.shuffle(order)
        epoch = []
        for c in range(0, n, chunk):
            part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
            epoch += [part[s : s + batch_size] for s in range(0, len(part), batch_size)]
        rng.shuffle(epoch)
        yield from epoch


def _world_size() -> int:
    """The number of processes of a distributed launch; 1 for a plain process.

    A process group that is already initialized (by the caller, or by ``accelerate``) is used as it is. Otherwise,
    when a launcher started several processes, the group is initialized through ``accelerate.PartialState``: NCCL
    on CUDA, gloo on CPU. Launchers recognised: torch's elastic launcher (``torchrun``, and ``accelerate launch
    --multi_gpu``, which runs it: ``WORLD_SIZE`` > 1 with ``RANK`` or ``LOCAL_RANK``) and MPI (``accelerate
    launch --cpu --mpirun_hostfile FILE``, or ``mpirun`` itself: ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE`` or
    ``MV2_COMM_WORLD_SIZE`` > 1, the variables accelerate reads). ``PartialState`` gets ``cpu=True`` on a machine
    without CUDA, where ``PartialState()`` would see a single process, and under MPI, where it needs ``cpu=True``
    to see the launch at all (gloo then; the gradients are moved to the CPU for it). Being a singleton, it then
    also gives the caller's later ``PartialState().is_main_process`` the right answer.
    """
    if not torch.distributed.is_available():
        return 1
    if not torch.distributed.is_initialized():
        env = os.environ
        elastic = int(env.get("WORLD_SIZE", "1")) > 1 and ("RANK" in env or "LOCAL_RANK" in env)
        mpi = not elastic and any(int(env.get(k, "1")) > 1 for k in _MPI_WORLD_SIZE)
        if not (elastic or mpi):
            return 1
        from accelerate import PartialState

        PartialState(cpu=mpi or not torch.cuda.is_available())
    return torch.distributed.get_world_size()


_MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # Open MPI, Intel MPI / MPICH, MVAPICH


class _DataParallel:
    """Data parallelism over the processes of a distributed launch, for a frozen backbone and a small trainable
    module.

    Every process holds the whole model and draws the same global batches (same seed). Each computes the loss of
    its shard of a batch (``idx[rank::world]``); then the trainable parameters' gradients are averaged across
    processes with one explicit all-reduce (no DistributedDataParallel wrapper: only the small trainable module
    needs syncing). Each shard's gradient is weighted by what its loss is a mean over (``loss_weight``: its rows,
    or its target tokens for a per-token loss), so a step equals the single-process step on the full batch up to
    float rounding; a process whose shard is empty (a small last batch) takes part with weight 0. Parameters,
    losses and decisions are identical on every process, so each returns the same result.
    """

    def __init__(self, params: list[torch.Tensor], loss_weight: Callable[[list[int]], float]):
        dist = torch.distributed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # NCCL moves CUDA tensors only; gloo (the CPU backend) CPU tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        self.params = params
        self.loss_weight = loss_weight
        with torch.no_grad():  # one starting point everywhere, as DistributedDataParallel does
            flat = self._flat(params)
            dist.broadcast(flat, src=0)
            self._unflat(flat, params)

    def _flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One float32 buffer on the communication device holding ``tensors``."""
        return torch.cat([t.detach().float().reshape(-1) for t in tensors]).to(self.device)

    @staticmethod
    def _unflat(flat: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
        for target, part in zip(targets, torch.split(flat, [t.numel() for t in targets])):
            target.copy_(part.view_as(target))

    def backward(self, batch_loss: Callable[[list[int]], torch.Tensor], idx: list[int]) -> float:
        """Loss and gradients of the global batch ``idx``: forward and backward of this process's shard, then the
        weighted mean over processes. Returns the global loss, the same on every process.

        A non-finite shard loss makes the all-reduced loss non-finite on every process, so all of them raise
        together (no process is left waiting in a collective); gradients are not synced then. A parameter that
        received no gradient on any process keeps ``grad=None``, as in a single process.
        """
        dist = torch.distributed
        shard = idx[self.rank :: self.world]
        weight, weighted_loss = 0.0, 0.0
        if shard:
            loss = batch_loss(shard)
            weight = float(self.loss_weight(shard))
            weighted_loss = loss.item() * weight
            if math.isfinite(weighted_loss):
                loss.backward()
        has_grad = [float(p.grad is not None) for p in self.params]
        stats = torch.tensor([weighted_loss, weight, *has_grad], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        total_loss, total_weight, grad_anywhere = stats[0].item(), stats[1].item(), stats[2:].tolist()
        if not math.isfinite(total_loss):
            return total_loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._flat(grads) * weight
        dist.all_reduce(flat)
        self._unflat(flat / total_weight, grads)
        for p, grad, anywhere in zip(self.params, grads, grad_anywhere):
            if anywhere:
                p.grad = grad
        return total_loss / total_weight

    def from_main(self, compute: Callable[[], float]) -> float:
        """``compute()`` run on the main process, its value returned on every process (so all decide alike)."""
        value = torch.tensor([compute() if self.rank == 0 else 0.0], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(value, src=0)
        return value.item()


def train_soft_prompt(
    model: nn.Module,
    tokenizer,
    module: SoftPromptModule,
    train: Sequence[Pair],
    dev: Sequence[Pair],
    config: TrainConfig,
    *,
    lr: float,
    desc: str = "training",
    on_step: Callable[[int, float], None] | None = None,
    label_ids: Sequence[list[int]] | None = None,
    labels: Sequence[int] | None = None,
) -> TrainResult:
    """Train a causal-LM soft prompt on ``train`` (lists of (input ids, target ids)); select on ``dev`` loss.
    ``labels``: a classification task's label index per training row (for ``config.balance_labels``).

    Batches are length-bucketed on input + target tokens (``config.length_bucketing``). Raises
    :class:`TrainingDivergedError` on a NaN/inf loss or gradient. ``model`` must be frozen.
    ``label_ids``: a classification task's labels (target ids, as in the pairs), given for the label objectives
    (``config.objective``): the loss is the cross-entropy of the gold label among the labels
    (:func:`promptbank.causal.label_loss`; at most ``config.label_subset`` labels per batch), plus the gold
    label's per-token loss for ``"labels+lm"``; the dev loss is that cross-entropy over all labels, and the state
    kept the one with the highest dev accuracy (ties: lower dev loss) unless ``config.select_on == "loss"``.
    """
    if label_ids is None:
        options = {
            "batch_loss": lambda idx: _batch_loss(model, tokenizer, module, [train[i] for i in idx]),
            "eval_loss": (lambda: dev_loss(model, tokenizer, module, dev, config.batch_size)) if dev else None,
            "loss_weight": lambda idx: sum(len(train[i][1]) for i in idx),  # lm_loss: a mean over target tokens
        }
    else:
        options = _label_objective(model, tokenizer, module, train, dev, config, label_ids)
    return train_loop(
        model,
        module,
        len(train),
        config=config,
        param_groups=[{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}],
        desc=desc,
        on_step=on_step,
        fold=module.fold,
        lengths=[len(inp) + len(tgt) for inp, tgt in train],
        labels=labels,
        **options,
    )


def _label_objective(model, tokenizer, module, train, dev, config: TrainConfig, label_ids) -> dict:
    """The :func:`train_loop` options of the label objectives (see :func:`train_soft_prompt`)."""
    index = {tuple(t): i for i, t in enumerate(label_ids)}
    gold_tr = [index[tuple(t)] for _, t in train]
    gold_dev = [index[tuple(t)] for _, t in dev]
    last_acc = [0.0]
    subset_rng = random.Random(config.seed)
    lm_weight = 1.0 if config.objective == "labels+lm" else 0.0

    def batch_loss(idx: list[int]) -> torch.Tensor:
        gold = [gold_tr[i] for i in idx]
        labels = list(range(len(label_ids)))
        if len(labels) > config.label_subset:  # sampled softmax: the batch's gold labels, then random others
            chosen = list(dict.fromkeys(gold))[: config.label_subset]
            taken = set(chosen)
            others = [g for g in labels if g not in taken]
            labels = chosen + subset_rng.sample(others, max(0, config.label_subset - len(chosen)))
            pos = {g: k for k, g in enumerate(labels)}
            keep = [k for k, g in enumerate(gold) if g in pos]  # a batch with more gold labels than the subset
            idx, gold = [idx[k] for k in keep], [pos[gold[k]] for k in keep]
        pairs = [train[i] for i in idx]
        return _label_batch_loss(model, tokenizer, module, pairs, [label_ids[g] for g in labels], gold, lm_weight)

    def eval_labels() -> float:
        loss, last_acc[0] = dev_label_metrics(
            model, tokenizer, module, dev, label_ids, gold_dev, config.batch_size, config.balance_labels
        )
        return loss

    return {
        "batch_loss": batch_loss,
        "eval_loss": eval_labels if dev else None,
        "dev_metrics": {"dev_accuracy": lambda: last_acc[0]} if dev else None,
        "select_on": "dev_accuracy" if dev and config.select_on != "loss" else None,
    }


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision training runs in for ``precision`` on ``device``: as asked, except that ``"bf16"`` on a CPU
    without native bf16 (no AVX512-BF16 / AMX-BF16) trains in ``"fp32"``, with a warning. There, bf16 autocast is
    emulated and slower, not faster: a MiniLM deep-prompt training step (batch 16 x 128 tokens, one thread) took
    14.7x as long as in fp32 on a 2-core AMD EPYC without AVX512-BF16."""
    if precision == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        warnings.warn(
            "precision='bf16': this CPU has no native bf16 (AVX512-BF16 / AMX), where bf16 training runs many times "
            "slower than fp32 (14.7x measured); training in fp32 instead",
            UserWarning,
            stacklevel=3,
        )
        return "fp32"
    return precision


def _in_precision(batch_loss: Callable[[list[int]], torch.Tensor], precision: str, device: torch.device):
    """``batch_loss`` run under ``torch.autocast`` in bfloat16 for ``precision="bf16"`` (mixed precision: weights
    and the loss's backward accumulation stay in their dtype); itself for ``"fp32"`` (and for ``"bf16"`` where
    :func:`effective_precision` says fp32)."""
    if effective_precision(precision, device) == "fp32":
        return batch_loss

    def in_bf16(indices: list[int]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return batch_loss(indices)

    return in_bf16


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo, read once; elsewhere assumed so)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_loop(
    model: nn.Module,
    module: nn.Module,
    n_train: int,
    batch_loss: Callable[[list[int]], torch.Tensor],
    eval_loss: Callable[[], float] | None,
    config: TrainConfig,
    *,
    param_groups: list[dict],
    fold: Callable[[], dict[int, torch.Tensor]],
    desc: str = "training",
    on_step: Callable[[int, float], None] | None = None,
    lengths: Sequence[int] | None = None,
    loss_weight: Callable[[list[int]], float] = len,
    dev_metrics: dict[str, Callable[[], float]] | None = None,
    select_on: str | None = None,
    initial_is_candidate: bool = True,
    labels: Sequence[int] | None = None,
) -> TrainResult:
    """The loop itself, for any frozen backbone: ``batch_loss(indices)`` is the loss of a batch of training
    examples, ``eval_loss()`` the dev loss (``None``: no dev set, keep the last state). ``module`` holds every
    trainable tensor (its state at the best dev loss is restored at the end); ``fold()`` gives the soft prompt.

    ``lengths``: each training example's length in tokens; with ``config.length_bucketing`` batches are drawn
    length-bucketed (:func:`_bucketed_batches`), else (or without lengths) plainly shuffled. ``labels``: each
    training example's label index, needed by ``config.balance_labels`` (label-balanced batches,
    :func:`_balanced_batches`).
    ``loss_weight(indices)``: how many terms ``batch_loss(indices)`` is a mean over (default: its rows; a
    per-token loss gives its token count). Used only in a distributed launch, where each process computes the loss
    of a shard of every batch and the shards' gradients are averaged with these weights (:class:`_DataParallel`);
    every process then returns the same result (``seconds`` aside). A single process runs exactly as without it.
    ``dev_metrics``: more dev numbers to record in ``history`` next to each dev loss, e.g.
    ``{"dev_accuracy": fn}``; each ``fn()`` is called right after ``eval_loss()`` (so it can return a value that
    evaluation computed). They are recorded only, unless named by ``select_on``.
    ``select_on``: ``None`` keeps the state with the lowest dev loss; the name of a ``dev_metrics`` entry keeps
    the state where that number is highest, ties (within 1e-9) going to the lower dev loss. Either way a state
    replaces the kept one only if it is strictly better, so the starting state (step 0) is kept when nothing
    beats it, and patience counts evaluations that are not better.
    ``initial_is_candidate=False``: the starting state is measured and recorded but never kept when there is a
    dev set; the first evaluation after training replaces it whatever its numbers (for a starting state that is
    no model at all, like a zero-initialised classification head, which predicts one label for everything).
    """
    _check_frozen(model)
    if not n_train:
        raise ValueError("no training examples")
    if lengths is not None and len(lengths) != n_train:
        raise ValueError(f"{len(lengths)} lengths for {n_train} training examples")
    if config.balance_labels and (labels is None or len(labels) != n_train):
        raise ValueError("balance_labels needs each training example's label (a classification task)")
    if select_on is not None and select_on not in (dev_metrics or {}):
        raise ValueError(f"select_on={select_on!r} is not one of the dev metrics {sorted(dev_metrics or {})}")
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    batch_loss = _in_precision(batch_loss, config.precision, model_device(model))
    warmup = max(1, int(config.warmup_ratio * config.max_steps))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1 - 0.9 * (step - warmup) / max(1, config.max_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(config.seed)
    if config.balance_labels:
        batches = _balanced_batches(labels, config.batch_size, rng)
    elif lengths is not None and config.length_bucketing:
        batches = _bucketed_batches(lengths, config.batch_size, rng)
    else:
        batches = _batches(n_train, config.batch_size, rng)
    parallel = _DataParallel(params, loss_weight) if _world_size() > 1 else None
    dev = eval_loss is not None

    def measure_dev() -> float:
        """The dev loss; in a distributed launch measured on the main process alone and sent to the others, so
        that all of them take the same early-stopping decisions and keep the same best state."""
        return parallel.from_main(eval_loss) if parallel is not None else eval_loss()

    def measure_extras() -> dict[str, float]:
        if not dev_metrics:
            return {}
        if parallel is not None:
            return {k: parallel.from_main(fn) for k, fn in dev_metrics.items()}
        return {k: float(fn()) for k, fn in dev_metrics.items()}

    def better(entry: dict, best: dict) -> bool:
        """Whether the state measured in ``entry`` beats the kept one (see ``select_on``)."""
        if select_on is not None:
            if entry[select_on] > best[select_on] + 1e-9:
                return True
            if entry[select_on] < best[select_on] - 1e-9:
                return False
        return entry["dev_loss"] < best["dev_loss"] - 1e-6

    best_step, best_state = 0, {k: v.detach().clone() for k, v in module.state_dict().items()}
    history: list[dict] = [{"step": 0, "dev_loss": measure_dev() if dev else None, **(measure_extras() if dev else {})}]
    best_entry = history[0]
    bad_evals, stopped_early, step = 0, False, 0
    t0 = time.perf_counter()
    bar = _progress(config.max_steps, desc, config.progress and (parallel is None or parallel.rank == 0))
    checked_grads = False
    module.train()
    try:
        for step in range(1, config.max_steps + 1):
            if parallel is None:
                loss = batch_loss(next(batches))
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"{desc}: loss became {loss.item()} at step {step}; nothing was stored")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                loss_value = loss.item()
            else:
                opt.zero_grad(set_to_none=True)
                loss_value = parallel.backward(batch_loss, next(batches))
                if not math.isfinite(loss_value):
                    raise TrainingDivergedError(f"{desc}: loss became {loss_value} at step {step}; nothing was stored")
            if not checked_grads:  # the backbone must never receive gradients
                leaked = [n for n, p in model.named_parameters() if p.grad is not None]
                if leaked:
                    raise RuntimeError(f"backbone parameters received gradients: {leaked[:5]}")
                checked_grads = True
            if config.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                if not math.isfinite(float(norm)):
                    raise TrainingDivergedError(
                        f"{desc}: gradient norm {float(norm)} at step {step}; nothing was stored"
                    )
            opt.step()
            sched.step()
            entry = {"step": step, "loss": loss_value}
            if on_step:
                on_step(step, entry["loss"])
            if dev and (step % config.eval_every == 0 or step == config.max_steps):
                module.eval()
                dl = measure_dev()
                entry.update(measure_extras())
                module.train()
                if not math.isfinite(dl):
                    raise TrainingDivergedError(f"{desc}: dev loss became {dl} at step {step}; nothing was stored")
                entry["dev_loss"] = dl
                if (best_step == 0 and not initial_is_candidate) or better(entry, best_entry):
                    best_entry, best_step, bad_evals = entry, step, 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    bad_evals += 1
            history.append(entry)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k != "step"}, refresh=False)
                bar.update(1)
            if dev and bad_evals >= config.patience:
                stopped_early = True
                logger.info(
                    "%s: early stop at step %d (kept step %d: dev loss %.4f)",
                    desc,
                    step,
                    best_step,
                    best_entry["dev_loss"],
                )
                break
    finally:
        if bar is not None:
            bar.close()
    if not dev:  # nothing to select on: keep the last state
        best_step, best_state = step, {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best_state)
    module.eval()
    return TrainResult(
        prompt=fold(),
        train_state={k: v.float().contiguous() for k, v in best_state.items()},
        steps=step,
        best_step=best_step,
        best_dev_loss=best_entry["dev_loss"],
        stopped_early=stopped_early,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True)
