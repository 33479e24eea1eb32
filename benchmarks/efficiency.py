"""Efficiency benchmark (issue 3): soft prompts vs LoRA vs full fine-tuning on the all-MiniLM-L6-v2 encoder.

    python benchmarks/efficiency.py                # 3 datasets x 6 systems, ~20 min of CPU on 1 thread
    python benchmarks/efficiency.py --quick        # SST-2 only, tiny sizes, 10 steps: a smoke run (~1.5 min CPU)
    python benchmarks/efficiency.py --lr-sweep     # the dev-only learning-rate choice behind LR below (~35 min CPU;
                                                   # resumes: runs already in its JSON with the same settings are kept)
    python benchmarks/efficiency.py --data /path/to/shared/data

Systems, all on the same frozen-or-not MiniLM weights, the same data and the same training loop
(``promptbank.train.train_loop``: AdamW, linear warm-up over 10 % then decay to 10 %, gradient clipping 1.0,
batch 16, dev loss every 10 steps, early stop after 5 evaluations without improvement, best dev state kept: dev accuracy, ties by dev loss):
- promptbank prompt tuning, P-Tuning (MLP), P-Tuning (LSTM), deep prompts: ``PromptBank.learn_task`` on an encoder
  bank, 20 virtual tokens, a zero-initialised linear head on the mean-pooled output (head lr 1e-2).
- LoRA (PEFT ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])``) on a copy of
  the same MiniLM + the same kind of head on the mean-pooled output (mean over real tokens).
- full fine-tuning: every encoder weight of a copy of MiniLM + the same head.
The baselines train with the encoder in train mode (its dropout 0.1 on), as in standard fine-tuning; the soft
prompt methods keep the frozen encoder in eval mode (the library's behaviour).

Data per dataset: a fixed random train subset and a disjoint dev subset, both from the official TRAIN split (dev:
model selection and the learning-rate choice), and the official test split subsampled to ``--test`` rows.
Learning rates (LR) were chosen on SST-2 dev accuracy only (64 rows; ties broken by dev loss), by ``--lr-sweep``
(results/efficiency_lr_sweep.json), from 3-4 values per system; the library's own defaults (1e-1 deep, 1e-2
P-Tuning, 3e-2 prompt tuning; chosen on SmolLM2) are not used: on MiniLM they are at or near the worst of the grid.

Reported per system: test accuracy, accuracy as % of full fine-tuning (per dataset, then averaged), trainable
parameters during training and parameters stored per task (count and % of the backbone's 22.7 M), bytes on disk
per task (promptbank: the task folder of a saved bank with and without ``train_state.safetensors``; LoRA: PEFT
adapter folder + head; full FT: ``save_pretrained`` folder + head; safetensors only), training time (CPU seconds
of the whole learning call, dev evaluations included, so that other jobs on a shared machine distort it less; the
wall time of the training loop is in the JSON) and ms per training step (median CPU time of one step of
``--batch-size`` train rows, all systems interleaved in the same rounds before training; per dataset, then
averaged).
Writes benchmarks/results/efficiency.json (config, versions, metrics), efficiency.png and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    RESULTS,
    count_params,
    default_data_dir,
    folder_bytes,
    mean,
    read_labels,
    read_rows,
    sample_disjoint,
    subsample,
    versions,
)

DATASETS = {  # name -> (folder, train file, test file)
    "sst2": ("sst2", "train.jsonl", "test.jsonl"),
    "ag_news": ("ag_news", "train.jsonl", "test.jsonl"),
    "trec": ("trec", "train.jsonl", "test.jsonl"),
}
PROMPT_METHODS = ["prompt_tuning", "ptuning_mlp", "ptuning_lstm", "deep"]
SYSTEMS = [*PROMPT_METHODS, "lora", "full_ft"]
LABEL = {
    "prompt_tuning": "promptbank prompt tuning",
    "ptuning_mlp": "promptbank P-Tuning (MLP)",
    "ptuning_lstm": "promptbank P-Tuning (LSTM)",
    "deep": "promptbank deep prompts",
    "lora": "LoRA r=8 (query, value)",
    "full_ft": "full fine-tuning",
}
# Chosen on SST-2 dev accuracy (ties: dev loss) by --lr-sweep; see results/efficiency_lr_sweep.json.
LR = {
    "prompt_tuning": 1e-2,
    "ptuning_mlp": 1e-3,
    "ptuning_lstm": 1e-3,
    "deep": 1e-2,
    "lora": 1e-3,
    "full_ft": 3e-5,
}
SWEEP = {  # extended beyond the first grid (3 values) where its best value sat at an edge
    "prompt_tuning": [3e-3, 1e-2, 3e-2, 1e-1],
    "ptuning_mlp": [1e-3, 3e-3, 1e-2, 3e-2],
    "ptuning_lstm": [1e-3, 3e-3, 1e-2, 3e-2],
    "deep": [1e-2, 3e-2, 1e-1, 3e-1],
    "lora": [5e-4, 1e-3, 2e-3],
    "full_ft": [3e-5, 5e-5, 1e-4, 2e-4],
}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}
NUM_VIRTUAL_TOKENS = 20
HEAD_LR = 1e-2


# ----------------------------------------------------------------------------------------------- data
def load_dataset(data_dir: Path, name: str, n_train: int, n_dev: int, n_test: int | None, seed: int) -> dict:
    """Train and dev: disjoint random subsets of the official train split; test: the official test split,
    subsampled to ``n_test`` rows (a fixed sample, seed 0)."""
    folder, train_file, test_file = DATASETS[name]
    labels = read_labels(data_dir / folder)
    train, dev = sample_disjoint(read_rows(data_dir / folder / train_file), [n_train, n_dev], seed)
    test = subsample(read_rows(data_dir / folder / test_file), n_test, seed=0)
    return {"labels": labels, "train": train, "dev": dev, "test": test}


# ----------------------------------------------------------------------------------------------- baselines
class _NoBackbone(nn.Module):
    """Stands in for ``train_loop``'s frozen-backbone argument: in the baselines the encoder itself learns, so
    there is no frozen backbone to check (the encoder is part of the trained module instead)."""


def lora_encoder(model: nn.Module, **lora_options) -> nn.Module:
    """A PEFT LoRA copy of ``model`` (the original is untouched): only the LoRA matrices are trainable."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(**{**LORA, **lora_options}))


def full_ft_encoder(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every weight trainable (the original is untouched)."""
    enc = copy.deepcopy(model)
    enc.requires_grad_(True)
    return enc


def _plain(encoder: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (LoRA layers injected in place), or the model itself."""
    return encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder


def encoder_features(encoder: nn.Module, tokenizer, seqs, batch_size: int | None = None) -> torch.Tensor:
    """Mean-pooled final hidden states over the real tokens (B, d): promptbank's pooling with no soft prompt."""
    from promptbank.encoder import pooled

    if batch_size is None:
        return pooled(_plain(encoder), tokenizer, seqs, [None] * len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: little padding
    feats = torch.cat(
        [
            encoder_features(encoder, tokenizer, [seqs[i] for i in order[s : s + batch_size]])
            for s in range(0, len(seqs), batch_size)
        ]
    )
    return feats[torch.argsort(torch.tensor(order))]


def train_encoder_classifier(encoder: nn.Module, tokenizer, train, dev, labels, tconf, *, lr: float, desc: str = ""):
    """Train ``encoder``'s trainable weights plus a new linear head (zero-initialised, as promptbank's) with
    cross-entropy on the mean-pooled output; the same loop, schedule and model selection (``tconf.select_on``:
    by default dev accuracy, ties broken by dev loss) as ``learn_task`` on an encoder.

    ``train``/``dev``: ``{"text", "label"}`` rows. Returns ``(head, TrainResult)`` with the best dev state
    loaded into ``encoder`` and ``head``.
    """
    from promptbank.encoder import Head, encode_texts
    from promptbank.train import train_loop

    index = {lab: i for i, lab in enumerate(labels)}
    seqs = encode_texts(tokenizer, [r["text"] for r in train], tconf.max_input_tokens)
    ys = torch.tensor([index[r["label"]] for r in train])
    dev_seqs = encode_texts(tokenizer, [r["text"] for r in dev], tconf.max_input_tokens)
    dev_ys = torch.tensor([index[r["label"]] for r in dev])
    head = Head(encoder.config.hidden_size, len(labels))
    both = nn.ModuleDict({"encoder": encoder, "head": head})

    def batch_loss(idx: list[int]) -> torch.Tensor:
        feats = encoder_features(encoder, tokenizer, [seqs[i] for i in idx])  # (B, d)
        return nn.functional.cross_entropy(head(feats), ys[idx])

    last_accuracy = [float("nan")]

    @torch.no_grad()
    def eval_loss() -> float:
        logits = head(encoder_features(encoder, tokenizer, dev_seqs, tconf.batch_size))
        last_accuracy[0] = float((logits.argmax(-1) == dev_ys).float().mean())
        return float(nn.functional.cross_entropy(logits, dev_ys))

    groups = [
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": lr},
        {"params": list(head.parameters()), "lr": tconf.head_lr},
    ]
    result = train_loop(
        _NoBackbone(),
        both,
        len(seqs),
        batch_loss,
        eval_loss,
        tconf,
        param_groups=groups,
        fold=dict,
        desc=desc,
        dev_metrics={"dev_accuracy": lambda: last_accuracy[0]},
        select_on=None if tconf.select_on == "loss" else "dev_accuracy",  # as learn_task on an encoder
        initial_is_candidate=False,  # as learn_task: a zero head is never the kept state
    )
    return head, result


@torch.no_grad()
def encoder_accuracy(encoder: nn.Module, tokenizer, head: nn.Module, rows, labels, max_tokens: int) -> float:
    """Accuracy of ``head`` on the encoder's mean-pooled output over ``{"text", "label"}`` rows."""
    from promptbank.encoder import encode_texts

    encoder.eval()
    seqs = encode_texts(tokenizer, [r["text"] for r in rows], max_tokens)
    pred = head(encoder_features(encoder, tokenizer, seqs, 64)).argmax(-1).tolist()
    return sum(labels[p] == r["label"] for p, r in zip(pred, rows)) / len(rows)


def save_baseline(encoder: nn.Module, head: nn.Module, folder: Path) -> dict[str, int]:
    """Write what a task needs on disk (safetensors only): LoRA -> the PEFT adapter folder, full FT -> the whole
    model (``save_pretrained``), plus ``head.safetensors``. Returns ``{file: bytes}``."""
    from safetensors.torch import save_file

    encoder.save_pretrained(folder)  # PEFT: adapter_config.json + adapter_model.safetensors; HF: safetensors
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's generated model card: not needed to load the task
    save_file({k: v.contiguous() for k, v in head.tensors().items()}, str(folder / "head.safetensors"))
    files = folder_bytes(folder)
    if any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files):
        raise RuntimeError(f"non-safetensors weights written: {sorted(files)}")
    return files


# ----------------------------------------------------------------------------------------------- parameters
def prompt_params(method: str, num_layers: int, dim: int, n_labels: int, tokens: int = NUM_VIRTUAL_TOKENS) -> dict:
    """Parameters of a promptbank task: trained (prompt module + head) and stored (folded soft prompt + head)."""
    from promptbank.config import PromptConfig
    from promptbank.prompts import build_prompt_module

    conf = PromptConfig(method=method, num_virtual_tokens=tokens)
    layers = conf.resolved_layers(num_layers)
    module = build_prompt_module(conf, {layer: torch.zeros(tokens, dim) for layer in layers})
    head = dim * n_labels + n_labels
    return {
        "trainable": count_params(module, trainable_only=True) + head,
        "stored": tokens * dim * len(layers) + head,
    }


def bank_task_bytes(bank, name: str) -> dict:
    """Bytes of task ``name``'s folder in a saved bank, as learned (``keep_train_state=True``) and without the
    training state (what ``keep_train_state=False`` writes)."""
    import dataclasses

    from promptbank import PromptBank

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        bank.save(Path(tmp) / "with")
        out["with_train_state"] = folder_bytes(Path(tmp) / "with" / "tasks" / name)
        t = bank._tasks[name]
        slim = PromptBank.from_pretrained(bank.backbone, embedder=bank.embedder)
        slim._insert(dataclasses.replace(t, train_state={}))  # the same task, minus its training state
        slim.save(Path(tmp) / "without")
        out["without_train_state"] = folder_bytes(Path(tmp) / "without" / "tasks" / name)
    return out


# ----------------------------------------------------------------------------------------------- step timing
def step_timings(
    backbone,
    data: dict,
    systems: list[str],
    lrs: dict,
    *,
    batch_size: int,
    max_tokens: int,
    rounds: int = 3,
    steps: int = 2,
) -> dict:
    """Median time of one training step (forward + backward + AdamW, batch of ``batch_size`` train rows) per
    system, systems interleaved round by round so that they share the machine's load equally. Returns
    ``{system: {"wall_ms": ..., "cpu_ms": ...}}``; CPU time (this process) is the figure least disturbed by other
    jobs on a shared machine."""
    import statistics

    from promptbank.config import PromptConfig
    from promptbank.encoder import Head, encode_texts, pooled
    from promptbank.prompts import build_prompt_module, describe_task, text_init_ids, token_init

    model, tok = backbone.model, backbone.tokenizer
    rows = data["train"][:batch_size]
    seqs = encode_texts(tok, [r["text"] for r in rows], max_tokens)
    ys = torch.tensor([data["labels"].index(r["label"]) for r in rows])
    step_fns = {}
    for s in systems:
        head = Head(backbone.hidden_size, len(data["labels"]))
        if s in PROMPT_METHODS:  # what PromptBank._train_encoder does per step
            conf = PromptConfig(method=s, num_virtual_tokens=NUM_VIRTUAL_TOKENS)
            ids = text_init_ids(tok, describe_task("classification", data["labels"]), NUM_VIRTUAL_TOKENS)
            module = build_prompt_module(
                conf, token_init(model, ids, conf.resolved_layers(backbone.num_layers), causal=False)
            )
            params = [p for p in module.parameters() if p.requires_grad]

            def feats(module=module):
                return pooled(model, tok, seqs, [module()] * len(seqs))
        else:
            enc = lora_encoder(model) if s == "lora" else full_ft_encoder(model)
            enc.train()
            params = [p for p in enc.parameters() if p.requires_grad]

            def feats(enc=enc):
                return encoder_features(enc, tok, seqs)

        opt = torch.optim.AdamW([{"params": params, "lr": lrs[s]}, {"params": list(head.parameters()), "lr": HEAD_LR}])

        def step(feats=feats, head=head, opt=opt):
            loss = nn.functional.cross_entropy(head(feats()), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step_fns[s] = step
    times = {s: {"wall": [], "cpu": []} for s in systems}
    for s in systems:
        step_fns[s]()  # warm-up
    for _ in range(rounds):
        for s in systems:
            for _ in range(steps):
                w, c = time.perf_counter(), time.process_time()
                step_fns[s]()
                times[s]["wall"].append(time.perf_counter() - w)
                times[s]["cpu"].append(time.process_time() - c)
    return {
        s: {"wall_ms": 1000 * statistics.median(t["wall"]), "cpu_ms": 1000 * statistics.median(t["cpu"])}
        for s, t in times.items()
    }


# ----------------------------------------------------------------------------------------------- one run
def run_system(system: str, backbone, embedder, data: dict, opts: dict, lr: float) -> dict:
    """Train one system on one dataset; returns accuracies, parameter counts, bytes and times."""
    from promptbank import PromptBank
    from promptbank.config import TrainConfig

    model, tok = backbone.model, backbone.tokenizer
    labels, n_labels = data["labels"], len(data["labels"])
    if system in PROMPT_METHODS:
        bank = PromptBank.from_pretrained(backbone, embedder=embedder)
        t0, c0 = time.perf_counter(), time.process_time()
        rec = bank.learn_task(
            "task",
            data["train"],
            method=system,
            dev=data["dev"],
            labels=labels,
            num_virtual_tokens=NUM_VIRTUAL_TOKENS,
            lr=lr,
            warm_start=False,
            probe=False,  # the soft-prompt method alone vs LoRA / full FT (an embedding probe would be ours only)
            **opts,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        test = bank.evaluate(data["test"], task="task", batch_size=64)["accuracy"]
        params = prompt_params(system, backbone.num_layers, backbone.hidden_size, n_labels)
        files = bank_task_bytes(bank, "task")
        out = {
            "dev_accuracy": rec.dev_accuracy,
            "dev_loss": rec.dev_loss,
            "steps": rec.steps,
            "best_step": rec.best_step,
            "train_seconds": rec.train_seconds,
            "learn_seconds": wall,
            "learn_cpu_seconds": cpu,
            "trainable_params": params["trainable"],
            "stored_params": params["stored"],
            "files": files,
            "bytes": sum(files["without_train_state"].values()),
            "bytes_with_train_state": sum(files["with_train_state"].values()),
            "history": rec.history,
        }
    else:
        tconf = TrainConfig(**opts)
        with torch.random.fork_rng(devices=[]):  # LoRA's init and the dropout masks: seeded, as learn_task is
            torch.manual_seed(tconf.seed)
            enc = lora_encoder(model) if system == "lora" else full_ft_encoder(model)
            t0, c0 = time.perf_counter(), time.process_time()
            head, res = train_encoder_classifier(
                enc, tok, data["train"], data["dev"], labels, tconf, lr=lr, desc=system
            )
        mt = tconf.max_input_tokens
        dev_acc = encoder_accuracy(enc, tok, head, data["dev"], labels, mt)  # learn_task measures this too
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        with tempfile.TemporaryDirectory() as tmp:
            files = save_baseline(enc, head, Path(tmp))
        out = {
            "dev_accuracy": dev_acc,
            "dev_loss": res.best_dev_loss,
            "steps": res.steps,
            "best_step": res.best_step,
            "train_seconds": res.seconds,
            "learn_seconds": wall,
            "learn_cpu_seconds": cpu,
            "trainable_params": count_params(enc, trainable_only=True) + count_params(head),
            "stored_params": count_params(enc, trainable_only=True) + count_params(head),
            "files": files,
            "bytes": sum(files.values()),
            "bytes_with_train_state": sum(files.values()),
            "history": res.history,
        }
        out["test_accuracy"] = encoder_accuracy(enc, tok, head, data["test"], labels, mt)
        del enc
    if system in PROMPT_METHODS:
        out["test_accuracy"] = test
    out["lr"] = lr
    out["ms_per_step"] = 1000 * out["train_seconds"] / max(1, out["steps"])
    return out


# ----------------------------------------------------------------------------------------------- main
def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--quick", action="store_true", help="SST-2 only, 48 train / 16 dev / 64 test, 10 steps")
    ap.add_argument("--lr-sweep", action="store_true", help="choose each system's learning rate on dev accuracy")
    ap.add_argument("--datasets", default=None, help="comma-separated (default: all; sweep: sst2)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--train", type=int, default=320, help="train examples per dataset")
    ap.add_argument("--dev", type=int, default=64, help="dev examples per dataset (carved from TRAIN)")
    ap.add_argument("--test", type=int, default=500, help="test examples per dataset (official test, subsampled)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64, help="input tokens (AG News p90 is 67)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--report", type=Path, default=None, help="re-summarise, plot and print a results JSON (no training)"
    )
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.quick:
        args.train, args.dev, args.test, args.steps, args.eval_every = 48, 16, 64, 10, 5
        args.datasets = args.datasets or "sst2"
    default_ds = "sst2" if args.lr_sweep else ",".join(DATASETS)
    datasets = (args.datasets or default_ds).split(",")
    systems = args.systems.split(",")
    name = "efficiency_lr_sweep" if args.lr_sweep else "efficiency"
    out_path = args.out or RESULTS / (f"{name}_quick.json" if args.quick else f"{name}.json")
    if not (args.data / "sst2").is_dir():
        sys.exit(f"no data under {args.data} (expected sst2/, ag_news/, trec/); pass --data or set PROMPTBANK_DATA")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"truncated \d+ of \d+ inputs")  # AG News: cut at 64, as intended
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    from promptbank import PromptBank
    from promptbank.backbone import load_backbone

    t_start, cpu_start = time.perf_counter(), time.process_time()
    backbone = load_backbone("all-minilm-l6-v2")
    embedder = PromptBank.from_pretrained(backbone).embedder  # the library's default routing embedder
    backbone_params = count_params(backbone.model)
    opts = {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "max_input_tokens": args.max_tokens,
        "head_lr": HEAD_LR,
        "seed": args.seed,
        "progress": False,
    }
    data = {d: load_dataset(args.data, d, args.train, args.dev, args.test, args.seed) for d in datasets}
    runs: dict = {}
    if args.lr_sweep and out_path.exists():  # resume: keep the runs of an earlier sweep with the same settings
        old = json.loads(out_path.read_text())
        same = ("train", "dev", "test", "steps", "batch_size", "eval_every", "patience", "max_tokens", "seed")
        if all(old["config"].get(k) == getattr(args, k) for k in same):
            runs = old["runs"]
    grid = [(s, lr) for s in systems for lr in SWEEP[s]] if args.lr_sweep else [(s, LR[s]) for s in systems]
    timings = {}
    if not args.lr_sweep:
        for d in datasets:
            timings[d] = step_timings(
                backbone,
                data[d],
                systems,
                LR,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                rounds=1 if args.quick else 3,
            )
            print(f"{d:8s} step times (CPU ms): " + ", ".join(f"{s} {t['cpu_ms']:.0f}" for s, t in timings[d].items()))
    for d in datasets:
        for system, lr in grid:
            if f"{lr:g}" in runs.get(d, {}).get(system, {}):
                continue
            r = run_system(system, backbone, embedder, data[d], opts, lr)
            runs.setdefault(d, {}).setdefault(system, {})[f"{lr:g}"] = r
            print(
                f"{d:8s} {system:14s} lr {lr:g}: dev {r['dev_accuracy']:.3f} test {r['test_accuracy']:.3f} "
                f"({r['steps']} steps, {r['train_seconds']:.0f} s, {r['ms_per_step']:.0f} ms/step)",
                flush=True,
            )
    result = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "datasets": datasets,
            "systems": systems,
            "lr": {s: LR[s] for s in systems} if not args.lr_sweep else SWEEP,
            "head_lr": HEAD_LR,
            "lora": LORA,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
            "backbone": "all-MiniLM-L6-v2",
            "backbone_params": backbone_params,
            "dataset_sizes": {d: {k: len(data[d][k]) for k in ("train", "dev", "test")} for d in datasets},
        },
        "versions": versions(),
        "wall_seconds": None,
        "cpu_seconds": None,
        "step_timings": timings,
        "runs": runs,
    }
    if args.lr_sweep:
        result["summary"] = _sweep_summary(runs, datasets, systems)
    else:
        result["summary"] = _summary(runs, datasets, systems, backbone_params, timings)
    result["wall_seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time() - cpu_start  # ~ the wall time on an unloaded core (1 thread)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.lr_sweep:
        _print_sweep(result)
    else:
        _plot(result, out_path.with_suffix(".png"))
        _print_tables(result)
    return result


def report(path: Path) -> dict:
    """Recompute the summary of a results JSON from its runs, rewrite it, plot and print the tables."""
    result = json.loads(path.read_text())
    cfg = result["config"]
    if cfg.get("lr_sweep"):
        result["summary"] = _sweep_summary(result["runs"], cfg["datasets"], cfg["systems"])
        _print_sweep(result)
    else:
        result["summary"] = _summary(
            result["runs"], cfg["datasets"], cfg["systems"], cfg["backbone_params"], result["step_timings"]
        )
        _plot(result, path.with_suffix(".png"))
        _print_tables(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _sweep_summary(runs, datasets, systems) -> dict:
    out = {}
    for s in systems:
        scores = {lr: mean([runs[d][s][f"{lr:g}"]["dev_accuracy"] for d in datasets]) for lr in SWEEP[s]}
        losses = {lr: mean([runs[d][s][f"{lr:g}"]["dev_loss"] for d in datasets]) for lr in SWEEP[s]}
        best = max(SWEEP[s], key=lambda lr: (scores[lr], -losses[lr]))  # dev accuracy, ties by dev loss
        out[s] = {"mean_dev_accuracy": {f"{k:g}": v for k, v in scores.items()}, "chosen_lr": best}
    return out


def _print_sweep(result) -> None:
    print(f"\nLearning-rate sweep, dev accuracy (mean over {', '.join(result['config']['datasets'])}):\n")
    print("| system | dev accuracy % at each lr | chosen lr |")
    print("|---|---|---:|")
    for s, m in result["summary"].items():
        cells = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in m["mean_dev_accuracy"].items())
        print(f"| {LABEL[s]} | {cells} | {m['chosen_lr']:g} |")


def weight_bytes(files: dict) -> int:
    """Bytes of the learned weights alone (soft prompt / adapter / model + head), without routing keys, training
    state or JSON configs."""
    files = files.get("without_train_state", files)
    return sum(n for f, n in files.items() if f.endswith(".safetensors") and f != "keys.safetensors")


def _summary(runs, datasets, systems, backbone_params, timings) -> dict:
    """Per system: accuracies per dataset and their mean, % of full FT, parameters, bytes, times."""
    one = {d: {s: next(iter(runs[d][s].values())) for s in systems} for d in datasets}
    out = {}
    for s in systems:
        per = {d: one[d][s] for d in datasets}
        m = {
            "test_accuracy": {d: per[d]["test_accuracy"] for d in datasets},
            "mean_test_accuracy": mean([per[d]["test_accuracy"] for d in datasets]),
            "mean_dev_accuracy": mean([per[d]["dev_accuracy"] for d in datasets]),
            "trainable_params": max(per[d]["trainable_params"] for d in datasets),
            "stored_params": max(per[d]["stored_params"] for d in datasets),
            "bytes": max(per[d]["bytes"] for d in datasets),
            "bytes_with_train_state": max(per[d]["bytes_with_train_state"] for d in datasets),
            "bytes_weights": max(weight_bytes(per[d]["files"]) for d in datasets),
            "bytes_routing_keys": max(
                per[d]["files"].get("without_train_state", {}).get("keys.safetensors", 0) for d in datasets
            ),
            "train_seconds": mean([per[d]["train_seconds"] for d in datasets]),
            "learn_cpu_seconds": mean([per[d]["learn_cpu_seconds"] for d in datasets]),
            "ms_per_step_in_training": mean([per[d]["ms_per_step"] for d in datasets]),
            "step_cpu_ms": mean([timings[d][s]["cpu_ms"] for d in datasets]),
            "step_wall_ms": mean([timings[d][s]["wall_ms"] for d in datasets]),
            "steps": {d: per[d]["steps"] for d in datasets},
        }
        m["trainable_pct_of_backbone"] = 100 * m["trainable_params"] / backbone_params
        m["stored_pct_of_backbone"] = 100 * m["stored_params"] / backbone_params
        if "full_ft" in systems:
            ratios = {d: 100 * per[d]["test_accuracy"] / one[d]["full_ft"]["test_accuracy"] for d in datasets}
            m["pct_of_full_ft"] = ratios
            m["mean_pct_of_full_ft"] = mean(list(ratios.values()))
        out[s] = m
    if "full_ft" in systems:
        claims = {}
        pt = [s for s in ("ptuning_mlp", "ptuning_lstm") if s in systems]
        if pt:
            claims["ptuning_90_95_pct_of_full_ft_0.01_0.1_pct_params_under_1MB"] = {
                s: {
                    "mean_pct_of_full_ft": out[s]["mean_pct_of_full_ft"],
                    "trainable_pct_of_backbone": out[s]["trainable_pct_of_backbone"],
                    "stored_pct_of_backbone": out[s]["stored_pct_of_backbone"],
                    "bytes": out[s]["bytes"],
                    "bytes_with_train_state": out[s]["bytes_with_train_state"],
                    "bytes_weights": out[s]["bytes_weights"],
                    "accuracy_in_range": out[s]["mean_pct_of_full_ft"] >= 90,
                    "trainable_params_in_range": out[s]["trainable_pct_of_backbone"] <= 0.1,
                    "stored_params_in_range": out[s]["stored_pct_of_backbone"] <= 0.1,
                    "under_1MB_without_train_state": out[s]["bytes"] < 2**20,
                    "under_1MB_with_train_state": out[s]["bytes_with_train_state"] < 2**20,
                    "weights_under_1MB": out[s]["bytes_weights"] < 2**20,
                }
                for s in pt
            }
        if "deep" in systems:
            claims["deep_ge_95_pct_of_full_ft"] = {
                "mean_pct_of_full_ft": out["deep"]["mean_pct_of_full_ft"],
                "per_dataset": out["deep"]["pct_of_full_ft"],
                "met": out["deep"]["mean_pct_of_full_ft"] >= 95,
            }
        out["_claims"] = claims
    return out


def _print_tables(result) -> None:
    cfg, summ = result["config"], result["summary"]
    datasets, systems = cfg["datasets"], cfg["systems"]
    sizes = ", ".join(f"{d} {v['train']}/{v['dev']}/{v['test']}" for d, v in cfg["dataset_sizes"].items())
    print(
        f"\nall-MiniLM-L6-v2, train/dev/test {sizes}; {cfg['steps']} steps max, batch {cfg['batch_size']}, "
        f"seed {cfg['seed']}; wall {result['wall_seconds'] / 60:.1f} min (CPU {result['cpu_seconds'] / 60:.1f} min)\n"
    )
    has_ft = "full_ft" in systems
    print("| system | lr | " + " | ".join(datasets) + " | mean | % of full FT |")
    print("|---|---:|" + "---:|" * (len(datasets) + 2))
    for s in systems:
        m = summ[s]
        cells = [f"{100 * m['test_accuracy'][d]:.1f}" for d in datasets]
        pct = f"{m['mean_pct_of_full_ft']:.1f}" if has_ft else ""
        print(
            f"| {LABEL[s]} | {cfg['lr'][s]:g} | "
            + " | ".join(cells)
            + f" | {100 * m['mean_test_accuracy']:.1f} | {pct} |"
        )
    print()
    print(
        "| system | trainable params (% of backbone) | stored per task (%) | bytes per task (with train state) "
        "| of which learned weights | training time, CPU s (wall s) | ms/step (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in systems:
        m = summ[s]
        with_ts = f" ({_fmt_bytes(m['bytes_with_train_state'])})" if m["bytes_with_train_state"] != m["bytes"] else ""
        print(
            f"| {LABEL[s]} | {_fmt_count(m['trainable_params'])} ({m['trainable_pct_of_backbone']:.3g} %) "
            f"| {_fmt_count(m['stored_params'])} ({m['stored_pct_of_backbone']:.3g} %) "
            f"| {_fmt_bytes(m['bytes'])}{with_ts} | {_fmt_bytes(m['bytes_weights'])} "
            f"| {m['learn_cpu_seconds']:.0f} ({m['train_seconds']:.0f}) "
            f"| {m['step_cpu_ms']:.0f} |"
        )


def _plot(result, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    summ, systems = result["summary"], result["config"]["systems"]
    key = "mean_pct_of_full_ft" if "full_ft" in systems else "mean_test_accuracy"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, xkey, xlabel in (
        (axes[0], "trainable_params", "trainable parameters (log)"),
        (axes[1], "bytes_weights", "bytes of learned weights per task: soft prompt / adapter / model + head (log)"),
    ):
        for s in systems:
            y = summ[s][key] if key == "mean_pct_of_full_ft" else 100 * summ[s][key]
            ax.scatter(summ[s][xkey], y, s=40)
            ax.annotate(
                LABEL[s].replace("promptbank ", ""),
                (summ[s][xkey], y),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy, % of full fine-tuning" if key == "mean_pct_of_full_ft" else "test accuracy %")
        if key == "mean_pct_of_full_ft":
            ax.axhline(95, ls="--", lw=0.8, c="gray")
            ax.axhline(90, ls=":", lw=0.8, c="gray")
    fig.suptitle(f"all-MiniLM-L6-v2, mean over {', '.join(result['config']['datasets'])}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
