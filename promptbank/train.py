"""The training loop: only soft-prompt parameters learn; the backbone stays frozen and bit-identical.

One explicit loop, top to bottom: AdamW with linear warm-up and decay, gradient clipping, dev loss every
``eval_every`` steps with early stopping (the best soft prompt is kept), NaN/inf detection, a progress bar.
The prompt's prefix keys/values are computed once per batch (at batch size 1) and shared by all rows.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .causal import lm_loss
from .config import TrainConfig
from .errors import TrainingDivergedError
from .inject import prompt_kv
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
) -> TrainResult:
    """Train a causal-LM soft prompt on ``train`` (lists of (input ids, target ids)); select on ``dev`` loss.

    Raises :class:`TrainingDivergedError` on a NaN/inf loss or gradient. ``model`` must be frozen.
    """
    return train_loop(
        model,
        module,
        len(train),
        lambda idx: _batch_loss(model, tokenizer, module, [train[i] for i in idx]),
        (lambda: dev_loss(model, tokenizer, module, dev, config.batch_size)) if dev else None,
        config,
        param_groups=[{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}],
        desc=desc,
        on_step=on_step,
        fold=module.fold,
    )


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
) -> TrainResult:
    """The loop itself, for any frozen backbone: ``batch_loss(indices)`` is the loss of a batch of training
    examples, ``eval_loss()`` the dev loss (``None``: no dev set, keep the last state). ``module`` holds every
    trainable tensor (its state at the best dev loss is restored at the end); ``fold()`` gives the soft prompt.
    """
    _check_frozen(model)
    if not n_train:
        raise ValueError("no training examples")
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_ratio * config.max_steps))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1 - 0.9 * (step - warmup) / max(1, config.max_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(config.seed)
    batches = _batches(n_train, config.batch_size, rng)
    dev = eval_loss is not None

    best_loss = eval_loss() if dev else None
    best_step, best_state = 0, {k: v.detach().clone() for k, v in module.state_dict().items()}
    history: list[dict] = [{"step": 0, "dev_loss": best_loss}]
    bad_evals, stopped_early, step = 0, False, 0
    t0 = time.perf_counter()
    bar = _progress(config.max_steps, desc, config.progress)
    checked_grads = False
    module.train()
    try:
        for step in range(1, config.max_steps + 1):
            loss = batch_loss(next(batches))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{desc}: loss became {loss.item()} at step {step}; nothing was stored")
            opt.zero_grad(set_to_none=True)
            loss.backward()
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
            entry = {"step": step, "loss": loss.item()}
            if on_step:
                on_step(step, entry["loss"])
            if dev and (step % config.eval_every == 0 or step == config.max_steps):
                module.eval()
                dl = eval_loss()
                module.train()
                if not math.isfinite(dl):
                    raise TrainingDivergedError(f"{desc}: dev loss became {dl} at step {step}; nothing was stored")
                entry["dev_loss"] = dl
                if dl < best_loss - 1e-6:
                    best_loss, best_step, bad_evals = dl, step, 0
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
                    "%s: early stop at step %d (best dev loss %.4f at step %d)", desc, step, best_loss, best_step
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
        best_dev_loss=best_loss,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True)
