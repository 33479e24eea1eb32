"""Data-parallel training of the tiny test models, run by tests/test_train_scaleout.py under ``torchrun``.

``train_tasks()`` is ordinary single-process user code: it builds the tiny config-built Llama and BERT of
conftest.py, a PromptBank on each with the hashing embedder, and learns one task on each. Launched as
``python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_script.py OUTDIR`` (or ``accelerate launch
--multi_gpu --num_processes 2 ...``, which runs the same launcher, even without a GPU), the same code trains
data-parallel; each process writes its learned soft prompts to ``OUTDIR/rank{r}.safetensors`` and its records
(history, steps, dev loss), ``PartialState().is_main_process`` and the outcome of :func:`diverge_on_rank_1` to
``OUTDIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import make_tiny_bert, make_tiny_model, make_tiny_tokenizer

from promptbank import PromptBank, TrainingDivergedError
from promptbank.backbone import from_model
from promptbank.embed import HashingEmbedder

WORDS = ["cat", "dog", "sun", "moon", "tree", "car", "red", "blue", "sea", "sky", "owl", "fox", "oak"]
# 13 rows in batches of 4: every epoch has a 1-row batch, where one of two processes gets an empty shard.
# Targets of 1-3 words (different token counts) check that shards are weighted by target tokens.
ECHO_TRAIN = [
    {"input": f"repeat {w}" + " again" * (i % 3), "target": " ".join([w] * (1 + i % 3))} for i, w in enumerate(WORDS)
]
ECHO_DEV = [{"input": f"repeat {w}", "target": w} for w in ["cat", "sun", "owl", "oak"]]
WEATHER_TRAIN = [
    {"text": f"the weather is {w} today" + " really" * (i % 4), "label": lab}
    for i, (w, lab) in enumerate(
        [("sunny", "good"), ("rainy", "bad"), ("lovely", "good"), ("awful", "bad")] * 3 + [("grim", "bad")]
    )
]
WEATHER_DEV = [{"text": f"the weather is {w} today", "label": lab} for w, lab in [("sunny", "good"), ("awful", "bad")]]
OPTIONS = {"max_steps": 10, "batch_size": 4, "eval_every": 2, "patience": 3, "progress": False, "warm_start": False}


def train_tasks() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Learn a deep prompt on the tiny Llama (generation) and a prompt-tuning prompt + head on the tiny BERT
    (classification). Returns ``({name: tensor}, {task: record summary})``."""
    tok = make_tiny_tokenizer()
    causal = PromptBank(from_model(make_tiny_model(len(tok)), tok, name="tiny-llama"), HashingEmbedder(dim=128))
    encoder = PromptBank(make_tiny_bert(), HashingEmbedder(dim=128))
    records = {
        "echo": causal.learn_task("echo", ECHO_TRAIN, method="deep", dev=ECHO_DEV, num_virtual_tokens=3, **OPTIONS),
        "weather": encoder.learn_task("weather", WEATHER_TRAIN, dev=WEATHER_DEV, num_virtual_tokens=3, **OPTIONS),
    }
    tensors = {f"echo/{layer}": t for layer, t in causal.soft_prompt("echo").items()}
    tensors |= {f"weather/{layer}": t for layer, t in encoder.soft_prompt("weather").items()}
    summary = {name: {"steps": r.steps, "dev_loss": r.dev_loss, "history": r.history} for name, r in records.items()}
    return {k: t.detach().float().contiguous() for k, t in tensors.items()}, summary


def diverge_on_rank_1(rank: int) -> str | None:
    """Learn a task whose loss is NaN on process 1 only: every process must raise TrainingDivergedError (none may
    wait forever in a collective). Returns the error message, or None if training went through."""
    import promptbank.train as train_mod

    original = train_mod._batch_loss

    def nan_on_rank_1(*args):
        loss = original(*args)
        return loss * float("nan") if rank == 1 else loss

    tok = make_tiny_tokenizer()
    bank = PromptBank(from_model(make_tiny_model(len(tok)), tok, name="tiny-llama"), HashingEmbedder(dim=128))
    train_mod._batch_loss = nan_on_rank_1
    try:
        bank.learn_task("echo", ECHO_TRAIN, dev=ECHO_DEV, num_virtual_tokens=3, **OPTIONS)
    except TrainingDivergedError as e:
        return str(e)
    finally:
        train_mod._batch_loss = original
    return None


if __name__ == "__main__":
    import torch.distributed as dist
    from accelerate import PartialState
    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    tensors, summary = train_tasks()
    rank = dist.get_rank()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    summary["world_size"] = dist.get_world_size()
    summary["is_main_process"] = PartialState().is_main_process
    summary["diverged"] = diverge_on_rank_1(rank)
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()
