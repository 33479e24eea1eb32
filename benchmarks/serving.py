"""Serving and training speed of promptbank vs PEFT, side by side in one run, on the real default backbone.

    python benchmarks/serving.py            # full run, ~15-20 min on 2 CPU cores
    python benchmarks/serving.py --quick    # smoke run at toy sizes, < 2 min (numbers meaningless)

Sections (each compares variants on the same model, inputs and process, with A/B repeats interleaved and the
order rotated every round, so machine noise hits all variants alike; medians and ratios are reported):

- train: ms/step (forward + backward + AdamW) at batch 8 x 64 input tokens (+ a 2-4 token label), 20 virtual
  tokens. Ours: ``promptbank.train._batch_loss`` (prompt prefix once per batch, LM head on target tokens only)
  for prompt tuning, P-Tuning (MLP) and deep prompts. PEFT: PromptTuning, P-Tuning (PromptEncoder MLP) and
  PrefixTuning with a plain loop (``labels`` = -100 except on the label tokens).
- precision: the training step in fp32 vs bf16 (autocast, and bf16 backbone weights), interleaved; with
  ``--compile`` also ``torch.compile`` of the decoder body (its compile time reported).
- tta: time to accuracy on one CLINC150 domain (15 intents, 8 train / 4 dev rows per intent): ours prompt tuning
  vs PEFT PromptTuning + a plain loop, same init, optimizer and batches, steps interleaved; cumulative training
  seconds until dev accuracy reaches 90 % of PEFT's best (both scored the same way). CLINC queries differ in
  length, so ours runs its batches packed, without padding (``inject.forward_packed``); PEFT pads.
- packing: packed (unpadded) vs padded forwards on batches of real rows of different lengths (CLINC150 banking,
  SST-2, AG News, TREC): a prompt-tuning training step (forward + backward) and label ranking (``rank_labels``,
  no gradients), interleaved per batch; the padded fraction of each batch and whether the library's cost model
  packs it.
- labels: label ranking (``rank_labels``, what ``predict`` does for a classification task) with each row's label
  continuations side by side behind its one key/value cache (the default) vs a copy of the row's cache per
  (row, label) pair (the fallback), interleaved per batch: long CFPB complaint narratives (5 labels) and short
  inputs with many labels (DBpedia 14, CLINC150 banking 15) or few (AG News 4).
- generate: batch 8, 32 new tokens, greedy, EOS ignored so every variant decodes exactly 32 tokens. Ours with
  no soft prompt, one task's soft prompt on all rows, and 8 rows from 8 tasks; PEFT with 8 PromptTuning
  adapters holding the same soft prompts, serving the same 8 requests one by one with ``set_adapter``, and (for
  reference) one adapter on the whole batch of 8.
- classify: queries/s of ``bank.predict(texts)`` (routing included) vs PEFT with the task given, scoring each
  label by the likelihood of the full sequence (input + label) per label, (query, label) sequences batched 16
  at a time per adapter.
- route: latency of one query (MiniLM embedding + search) at 10, 1,000, 16,000 (1,000 tasks x 16
  prototypes) and 100,000 keys, exact flat index (cosine scorer) and the learned router (LDA, the default);
  HNSW and IVF at 100,000 keys with recall@1 vs exact search.
- memory: peak RSS (``ru_maxrss``) of a fresh process serving 8 requests with the bare backbone vs a bank
  holding 100 tasks (prefix caches of all 100 computed), task given and routed: with the prefix cache unlimited,
  and (``_budget``) under the default byte budget (``bank.kv_cache_bytes``, 5 % of the backbone's parameter
  bytes), routed also with the embedder's weights in bf16 (``_bf16``).

Soft prompts are untrained (vocabulary-initialised): speed does not depend on their values. Writes
benchmarks/results/serving.json (config, versions, raw timings, ratios) and serving.png, and prints a markdown
table with the targets of issue 5.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"

# (dataset folder, file the routing keys come from, file the queries come from); disjoint rows when the same
TASKS = [
    ("sst2", "train.jsonl", "test.jsonl"),
    ("ag_news", "train.jsonl", "test.jsonl"),
    ("trec", "train.jsonl", "test.jsonl"),
    ("subj", "all.jsonl", "all.jsonl"),
    ("cfpb_complaints", "train.jsonl", "test.jsonl"),
    ("amazon_reviews", "train.jsonl", "test.jsonl"),
    ("yahoo_answers", "train.jsonl", "test.jsonl"),
    ("medical_abstracts", "test.jsonl", "test.jsonl"),
]
KEY_ROWS = 64  # training inputs per task the routing prototypes are made from
QUERY_OFFSET = 1000  # queries from this row on when keys and queries share a file
P = 20  # virtual tokens
SPARSE_TARGETS = {
    "train_pt": ("ours prompt tuning / PEFT PromptTuning, time per step", "<=", 0.6),
    "train_ptuning": ("ours P-Tuning (MLP) / PEFT P-Tuning, time per step", "<=", 0.6),
    "train_deep": ("ours deep prompts / PEFT PrefixTuning, time per step", "<=", 0.8),
    "train_pt_pruned_vs_full_last_layer": (
        "ours prompt tuning, last layer only at the targets / in full, time per step",
        "<=",
        None,
    ),
    "tta": ("time to accuracy, ours / PEFT PromptTuning + plain loop (CLINC domain)", "<=", 0.5),
    "gen_overhead": ("generation with vs without soft prompt, tokens/s overhead", "<=", 0.03),
    "mixed_vs_single": ("mixed 8-task batch / single-task batch, tokens/s", ">=", 0.95),
    "mixed_vs_peft": ("mixed 8-task batch vs PEFT set_adapter per request, speed-up", ">=", 3.0),
    "classify_vs_peft": ("classification q/s, ours routed vs PEFT task given, speed-up", ">=", None),
    "route_p50_1000_tasks": ("routing p50, 1 query, 1,000 tasks x 16 keys, embedding incl. (ms), cosine", "<=", 5.0),
    "route_p50_1000_tasks_lda": ("routing p50, same, learned router (the default)", "<=", 5.0),
    "route_p50_1000_tasks_bf16": ("routing p50, same, cosine, embedder weights in bf16", "<=", 5.0),
    "route_p50_1000_tasks_bf16_lda": ("routing p50, same, learned router, embedder weights in bf16", "<=", 5.0),
    "route_p50_1000_tasks_fast_lda": (
        "routing p50, same, learned router, fast embedder (all-MiniLM-L6-v2+layers=3,2)",
        "<=",
        5.0,
    ),
    "route_p50_1000_tasks_bf16c_lda": (
        "routing p50, same, learned router, default embedder in bf16, compiled (compile=True)",
        "<=",
        5.0,
    ),
    "route_p50_1000_tasks_fast_bf16c_lda": (
        "routing p50, same, learned router, fast embedder in bf16, compiled (compile=True)",
        "<=",
        5.0,
    ),
    "route_p50_1000_tasks_2layers_bf16c_lda": (
        "routing p50, same, learned router, 2-layer embedder (+layers=2) in bf16, compiled",
        "<=",
        5.0,
    ),
    "route_p50_1000_tasks_fast_bf16_lda": (
        "routing p50, same, learned router, fast embedder in bf16, eager",
        "<=",
        5.0,
    ),
    "route_p50_1000_tasks_2layers_bf16_lda": (
        "routing p50, same, learned router, 2-layer embedder in bf16, eager",
        "<=",
        5.0,
    ),
    "memory_given": ("peak RSS, bank with 100 tasks (task given) vs bare backbone", "<=", 1.10),
    "memory_routed": ("peak RSS, bank with 100 tasks + router/embedder vs bare backbone", "<=", 1.10),
    "memory_given_budget": ("peak RSS, same, task given, default prefix-cache budget", "<=", 1.10),
    "memory_routed_budget": ("peak RSS, same, routed, default prefix-cache budget", "<=", 1.10),
    "memory_routed_budget_bf16": ("peak RSS, same, routed, budget + bf16 embedder weights", "<=", 1.10),
    "memory_routed_budget_fast": ("peak RSS, same, routed, budget + fast embedder (+layers=3,2)", "<=", 1.10),
    "memory_routed_budget_fast_bf16": (
        "peak RSS, same, routed, budget + fast embedder (+layers=3,2) in bf16",
        "<=",
        1.10,
    ),
    "memory_routed_budget_2layers": ("peak RSS, same, routed, budget + 2-layer embedder (+layers=2)", "<=", 1.10),
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _interleaved(variants: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run each variant ``warmup + rounds`` times, round-robin with the order rotated each round; seconds."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            variants[n]()
            dt = time.perf_counter() - t
            if r >= warmup:
                times[n].append(dt)
    return times


def _summary(seconds: list[float], scale: float = 1000.0) -> dict:
    return {
        "median": scale * statistics.median(seconds),
        "min": scale * min(seconds),
        "max": scale * max(seconds),
        "n": len(seconds),
        "raw": [round(scale * s, 3) for s in seconds],
    }


def _percentiles(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "n": a.size,
    }


class _NoEos:
    """Tokenizer stand-in for ``causal.generate`` that never stops at EOS (so every run decodes the same count)."""

    def __init__(self, tok):
        self.pad_token_id = tok.pad_token_id
        self.eos_token_id = None


def _load_rows(data_dir: Path, folder: str, name: str) -> list[dict]:
    with open(data_dir / folder / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate(tok, text: str, n_tokens: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens]).strip()


def _task_data(data_dir: Path, tok, n_queries: int, query_tokens: int) -> list[dict]:
    """Per task: name, labels, texts for routing keys, (query, gold label) pairs. Real public data when
    ``data_dir`` exists, else the package's example tasks (repeated to 8)."""
    out = []
    if data_dir.is_dir():
        for folder, key_file, query_file in TASKS:
            labels = json.loads((data_dir / folder / "labels.json").read_text())["labels"]
            keys = _load_rows(data_dir, folder, key_file)
            queries = _load_rows(data_dir, folder, query_file)
            offset = QUERY_OFFSET if key_file == query_file else 0
            step = max(1, (len(queries) - offset) // max(n_queries, 1))
            picked = queries[offset::step][:n_queries]
            out.append(
                {
                    "name": folder,
                    "labels": labels,
                    "key_texts": [_truncate(tok, r["text"], 128) for r in keys[:KEY_ROWS]],
                    "key_labels": [r["label"] for r in keys[:KEY_ROWS]],
                    "queries": [(_truncate(tok, r["text"], query_tokens), r["label"]) for r in picked],
                }
            )
        return out
    from promptbank.examples import example_path
    from promptbank.tasks import load_task_data

    names = ["ticket_routing", "urgency", "question_topic", "review_sentiment"]
    for i in range(8):
        base = names[i % 4]
        train = load_task_data(example_path(f"{base}_train"))
        test = load_task_data(example_path(f"{base}_test"))
        out.append(
            {
                "name": f"{base}_{i}",
                "labels": list(train.labels),
                "key_texts": [ex.input for ex in train.examples[:KEY_ROWS]],
                "key_labels": [ex.target for ex in train.examples[:KEY_ROWS]],
                "queries": [(_truncate(tok, ex.input, query_tokens), ex.target) for ex in test.examples[:n_queries]],
            }
        )
    return out


def _random_prompt(model, layers: list[int], seed: int) -> dict:
    import torch

    from promptbank.prompts import token_init, vocab_init_ids

    gen = torch.Generator().manual_seed(seed)
    return token_init(model, vocab_init_ids(model, P, generator=gen), layers)


def _insert_task(
    bank, name: str, labels: list[str] | None, prompt: dict, keys, method: str = "prompt_tuning", groups=None
):
    """Put a task with the given soft prompt and routing keys into ``bank`` through its internals (no training)."""
    from promptbank.bank import TaskRecord, _Task
    from promptbank.causal import DEFAULT_TEMPLATE
    from promptbank.config import PromptConfig, TrainConfig

    layers = sorted(prompt)
    pconf = PromptConfig(method=method, num_virtual_tokens=P, layers=layers if method == "deep" else None)
    record = TaskRecord(
        name=name,
        kind="classification" if labels else "generation",
        labels=list(labels) if labels else None,
        prompt_config=pconf.to_dict(),
        train_config=TrainConfig().to_dict(),
        template=DEFAULT_TEMPLATE,
        num_train=0,
        num_dev=0,
        steps=0,
        best_step=0,
        dev_loss=None,
        dev_accuracy=None,
        train_seconds=0.0,
        threshold=-1.0,  # the cosine scorer accepts every routed query; the learned router calibrates its own
    )
    bank._insert(_Task(record, {k: v.float().contiguous() for k, v in prompt.items()}, keys, {}, key_groups=groups))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def _train_pairs(bank, cfg) -> list[tuple[list[int], list[int]]]:
    """``train_batch`` (input ids, label ids) pairs of exactly ``train_tokens`` input tokens, cut from the example
    ticket-routing texts: the batch of the training-speed sections."""
    from promptbank.causal import encode_target
    from promptbank.examples import example_path
    from promptbank.tasks import load_task_data

    tok = bank.backbone.tokenizer
    data = load_task_data(example_path("ticket_routing_train"))
    text_ids = tok(" ".join(ex.input for ex in data.examples), add_special_tokens=False)["input_ids"]
    n = cfg.train_tokens
    return [
        (text_ids[i * n : (i + 1) * n], encode_target(tok, data.examples[i].target)) for i in range(cfg.train_batch)
    ]


def _peft_batch(tok, pairs):
    """PEFT inputs for (input ids, label ids) pairs: the same tokens right-padded, loss only on the label tokens ->
    (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(a) + len(b) for a, b in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for r, (a, b) in enumerate(pairs):
        ids[r, : len(a) + len(b)] = torch.tensor(a + b)
        mask[r, : len(a) + len(b)] = 1
        labels[r, len(a) : len(a) + len(b)] = torch.tensor(b)
    return ids, mask, labels


def bench_train(bank, cfg) -> dict:
    import torch
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    from promptbank import inject
    from promptbank.config import PromptConfig
    from promptbank.prompts import build_prompt_module, text_init_ids, token_init
    from promptbank.train import _batch_loss

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    pairs = _train_pairs(bank, cfg)
    ids, mask, labels = _peft_batch(tok, pairs)

    variants, params = {}, {}
    for method in ("prompt_tuning", "ptuning_mlp", "deep"):
        conf = PromptConfig(method=method, num_virtual_tokens=P)
        init = token_init(
            model, text_init_ids(tok, "Classify the text. ", P), conf.resolved_layers(bank.backbone.num_layers)
        )
        module = build_prompt_module(conf, init)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        params[f"ours_{method}"] = sum(p.numel() for p in module.parameters() if p.requires_grad)

        def step(module=module, opt=opt):
            loss = _batch_loss(model, tok, module, pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        variants[f"ours_{method}"] = step
        if method == "prompt_tuning":  # A/B in the same run: the last layer in full at every position

            def full_step(step=step):
                saved, inject.PRUNING = inject.PRUNING, False
                try:
                    step()
                finally:
                    inject.PRUNING = saved

            variants["ours_prompt_tuning_full_last_layer"] = full_step

    d = model.config.hidden_size
    peft_cfgs = {
        "peft_prompt_tuning": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P),
        "peft_ptuning_mlp": PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=P,
            encoder_reparameterization_type="MLP",
            encoder_hidden_size=d,
        ),
        "peft_prefix_tuning": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P),
    }
    peft_models = {}
    for name, pc in peft_cfgs.items():
        pm = get_peft_model(model, pc)
        peft_models[name] = pm
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        params[name] = sum(p.numel() for p in pm.parameters() if p.requires_grad)

        def step(pm=pm, opt=opt):
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        variants[name] = step

    leaked = [n for n, p in model.named_parameters() if p.requires_grad]
    if leaked:
        raise RuntimeError(f"PEFT unfroze backbone parameters: {leaked[:3]}")
    _log(f"train: {len(variants)} variants x ({cfg.train_warmup} warm-up + {cfg.train_steps}) steps")
    times = _interleaved(variants, cfg.train_steps, cfg.train_warmup)
    del peft_models, variants
    gc.collect()
    res = {"ms_per_step": {k: _summary(v) for k, v in times.items()}, "trainable_params": params}
    med = {k: v["median"] for k, v in res["ms_per_step"].items()}
    res["compute_floor"] = _mac_floor(model, pairs)
    res["ratios"] = {
        "train_pt": med["ours_prompt_tuning"] / med["peft_prompt_tuning"],
        "train_ptuning": med["ours_ptuning_mlp"] / med["peft_ptuning_mlp"],
        "train_deep": med["ours_deep"] / med["peft_prefix_tuning"],
        # the last layer's per-position work only at the target positions (inject.reading) vs at every position
        "train_pt_pruned_vs_full_last_layer": med["ours_prompt_tuning"] / med["ours_prompt_tuning_full_last_layer"],
    }
    return res


def bench_precision(bank, cfg) -> dict:
    """bf16 on CPU, for training: ms/step of promptbank's prompt-tuning step (batch ``train_batch`` x
    ``train_tokens``) in fp32, under ``torch.autocast("cpu", bfloat16)`` (fp32 weights cast on the fly), and with
    the frozen backbone's weights stored in bf16 (``load_backbone(dtype=torch.bfloat16)``); steps interleaved,
    same batch and initial prompt, so the losses should track each other (reported per step)."""
    import copy

    import torch

    from promptbank.config import PromptConfig
    from promptbank.prompts import build_prompt_module, text_init_ids, token_init
    from promptbank.train import _batch_loss

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    pairs = _train_pairs(bank, cfg)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    conf = PromptConfig(method="prompt_tuning", num_virtual_tokens=P)
    init = token_init(model, text_init_ids(tok, "Classify the text. ", P), [0])
    kinds = ("fp32", "autocast_bf16", "bf16_weights") + (("compiled_fp32",) if cfg.compile else ())
    model_compiled = None
    if cfg.compile:  # torch.compile of the decoder body (the part our forward calls), dynamic shapes
        model_compiled = copy.deepcopy(model)
        model_compiled.model = torch.compile(model_compiled.model, dynamic=True)
    modules = {k: build_prompt_module(conf, init) for k in kinds}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in modules.items()}
    losses = {k: [] for k in kinds}

    def make_step(kind):
        def step():
            if kind == "autocast_bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = _batch_loss(model, tok, modules[kind], pairs)
            else:
                m = {"bf16_weights": model_bf16, "compiled_fp32": model_compiled}.get(kind, model)
                loss = _batch_loss(m, tok, modules[kind], pairs)
            opts[kind].zero_grad(set_to_none=True)
            loss.float().backward()
            opts[kind].step()
            losses[kind].append(float(loss))

        return step

    compile_s = None
    if cfg.compile:
        t = time.perf_counter()
        make_step("compiled_fp32")()  # the first call compiles
        compile_s = time.perf_counter() - t
        losses["compiled_fp32"].clear()
    _log(f"precision: {len(kinds)} variants x ({cfg.train_warmup} warm-up + {cfg.train_steps}) steps")
    times = _interleaved({k: make_step(k) for k in kinds}, cfg.train_steps, cfg.train_warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "autocast_bf16_vs_fp32": med["autocast_bf16"] / med["fp32"],
        "bf16_weights_vs_fp32": med["bf16_weights"] / med["fp32"],
    }
    if cfg.compile:
        ratios["compiled_vs_fp32"] = med["compiled_fp32"] / med["fp32"]
    return {
        "compile_seconds": compile_s,
        "ms_per_step": {k: _summary(v) for k, v in times.items()},
        "loss_per_step": losses,
        "ratios": ratios,
    }


def _clinc_domain(data_dir: Path, domain: str, train_per_intent: int, dev_per_intent: int, seed: int = 0):
    """One CLINC150 domain as a classification task: ``train_per_intent`` rows per intent from train.jsonl and
    ``dev_per_intent`` from val.jsonl (random, seeded) -> (train rows, dev rows, intents)."""
    import random

    folder = data_dir / "clinc150"
    intents = sorted(json.loads((folder / "labels.json").read_text())["domains"][domain])
    rng = random.Random(seed)
    out = []
    for name, per in (("train", train_per_intent), ("val", dev_per_intent)):
        rows = _load_rows(data_dir, "clinc150", f"{name}.jsonl")
        picked = [r for it in intents for r in rng.sample([r for r in rows if r["label"] == it], per)]
        rng.shuffle(picked)
        out.append(picked)
    return out[0], out[1], intents


def bench_time_to_accuracy(bank, cfg) -> dict:
    """Wall time of training until dev accuracy reaches a fixed level: promptbank's prompt tuning step (prompt
    prefix once per batch, LM head on label tokens only, rows packed without padding where that saves compute)
    vs PEFT PromptTuning with a plain loop (full sequence,
    ``labels`` -100 except on the label tokens). Same task (one CLINC150 domain, 15 intents), same initial soft
    prompt (the label-naming instruction), same optimizer (AdamW, the library's default prompt-tuning lr), same
    batches in the same order: the two compute the same loss, so their accuracy curves per step nearly coincide
    and the difference is time. Steps are interleaved (ours, PEFT, rotating), only training steps are timed; every
    ``tta_eval_every`` steps both current prompts are scored the same way (promptbank's label ranking on the dev
    rows). Level: ``tta_level`` x PEFT's best dev accuracy; time to it = cumulative training seconds."""
    import random

    import numpy as np
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from promptbank.causal import DEFAULT_TEMPLATE, encode_input, encode_target
    from promptbank.config import DEFAULT_LR, Method, PromptConfig
    from promptbank.prompts import build_prompt_module, describe_task, text_init_ids, token_init
    from promptbank.train import _batch_loss, _batches

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    train, dev, intents = _clinc_domain(cfg.data, cfg.tta_domain, cfg.tta_train_per_intent, cfg.tta_dev_per_intent)
    pairs = [(encode_input(tok, r["text"], DEFAULT_TEMPLATE), encode_target(tok, r["label"])) for r in train]
    init = token_init(model, text_init_ids(tok, describe_task("classification", intents), P), [0])
    lr = DEFAULT_LR[Method.PROMPT_TUNING]

    module = build_prompt_module(PromptConfig(method="prompt_tuning", num_virtual_tokens=P), init)
    ours_opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    pm = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    peft_emb = pm.prompt_encoder["default"].embedding
    with torch.no_grad():
        peft_emb.weight.copy_(init[0])
    peft_opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)

    batches = _batches(len(pairs), cfg.tta_batch, random.Random(0))
    plan = [next(batches) for _ in range(cfg.tta_steps)]
    peft_inputs = [_peft_batch(tok, [pairs[j] for j in idx]) for idx in plan]  # up front: in neither step

    def ours_step(i):
        loss = _batch_loss(model, tok, module, [pairs[j] for j in plan[i]])
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()
        return loss.item()

    def peft_step(i):
        ids, mask, labels = peft_inputs[i]
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        peft_opt.zero_grad(set_to_none=True)
        loss.backward()
        peft_opt.step()
        return loss.item()

    @torch.no_grad()
    def accuracy(prompt: torch.Tensor) -> float:
        name = "_tta_eval"
        key = np.eye(1, bank.embedder.dim, dtype=np.float32)  # a placeholder key: the task is given, never routed
        _insert_task(bank, name, intents, {0: prompt.detach().clone()}, key)
        try:
            return float(bank.evaluate(dev, task=name, batch_size=16)["accuracy"])
        finally:
            bank.remove_task(name)

    steps = {"ours": ours_step, "peft": peft_step}
    seconds = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    curve = {k: [(0, accuracy(init[0]))] for k in steps}
    _log(f"time-to-accuracy: {cfg.tta_steps} steps of {cfg.tta_batch}, CLINC domain {cfg.tta_domain}")
    for i in range(cfg.tta_steps):
        names = list(steps)[i % 2 :] + list(steps)[: i % 2]
        for k in names:
            t = time.perf_counter()
            losses[k].append(steps[k](i))
            seconds[k].append(time.perf_counter() - t)
        if (i + 1) % cfg.tta_eval_every == 0 or i + 1 == cfg.tta_steps:
            module.eval()
            curve["ours"].append((i + 1, accuracy(module()[0])))
            module.train()
            curve["peft"].append((i + 1, accuracy(peft_emb.weight)))
    level = cfg.tta_level * max(a for _, a in curve["peft"])
    out = {
        "task": {"domain": cfg.tta_domain, "intents": len(intents), "train": len(train), "dev": len(dev)},
        "lr": lr,
        "batch": cfg.tta_batch,
        "level": level,
        "accuracy_curve": curve,
        "loss": losses,
        "ms_per_step": {k: _summary(v) for k, v in seconds.items()},
    }
    reached = {}
    for k in steps:
        step = next((s for s, a in curve[k] if a >= level), None)
        reached[k] = None if step is None else {"step": step, "seconds": float(sum(seconds[k][:step]))}
    out["reached"] = reached
    if reached["ours"] and reached["peft"] and reached["peft"]["seconds"] > 0:
        out["ratios"] = {"tta": reached["ours"]["seconds"] / reached["peft"]["seconds"]}
    return out


PACK_SETS = [("clinc:banking", "clinc150"), ("sst2", "sst2"), ("ag_news", "ag_news"), ("trec", "trec")]


def _labelled_rows(data_dir: Path, name: str, folder: str, rows_file: str) -> tuple[list[dict], list[str]]:
    """The rows of ``folder/rows_file`` and the label set: a dataset's labels.json, or one CLINC150 domain's
    intents (``name`` ``clinc:<domain>``, rows of that domain only)."""
    rows = _load_rows(data_dir, folder, rows_file)
    labels = json.loads((data_dir / folder / "labels.json").read_text())
    if name.startswith("clinc:"):
        intents = sorted(labels["domains"][name.split(":", 1)[1]])
        return [r for r in rows if r["label"] in intents], intents
    return rows, labels["labels"]


def bench_packing(bank, cfg) -> dict:
    """Packed vs padded forwards (``inject.forward_packed`` vs ``forward_hidden``), same batches: per dataset,
    ``pack_batches`` batches of ``pack_batch`` random train rows (600 characters at most), a prompt-tuning
    training step and label ranking over the dataset's labels, each forced packed and padded, interleaved
    (order alternating per batch). Medians per dataset and their ratios packed / padded."""
    import random

    import torch

    from promptbank.causal import encode_input, encode_target, rank_labels, should_pack, target_logprobs
    from promptbank.inject import prompt_kv

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    prompt = _random_prompt(model, [0], seed=0)[0].clone().requires_grad_()
    out = {}
    for name, folder in PACK_SETS:
        rows, labels = _labelled_rows(cfg.data, name, folder, "train.jsonl")
        rng = random.Random(0)
        label_ids = [encode_target(tok, lab) for lab in labels]
        batches = []
        for _ in range(cfg.pack_batches):
            picked = rng.sample(rows, cfg.pack_batch)
            inputs = [encode_input(tok, r["text"][:600]) for r in picked]
            batches.append((inputs, [encode_target(tok, r["label"]) for r in picked]))
        times = {k: [] for k in ("train_padded", "train_packed", "rank_padded", "rank_packed")}
        auto = []
        for i, (inputs, targets) in enumerate(batches):
            kv0 = prompt_kv(model, {0: prompt.detach()})
            auto.append(should_pack(model, [a + b for a, b in zip(inputs, targets)], [kv0]))
            for pack in (False, True)[:: 1 if i % 2 else -1]:
                key = "packed" if pack else "padded"
                t = time.perf_counter()
                kv = prompt_kv(model, {0: prompt})
                loss = -torch.cat(target_logprobs(model, tok, [kv] * len(inputs), inputs, targets, pack=pack)).mean()
                loss.backward()
                prompt.grad = None
                times[f"train_{key}"].append(time.perf_counter() - t)
                t = time.perf_counter()
                rank_labels(model, tok, [kv0] * len(inputs), inputs, [label_ids] * len(inputs), pack=pack)
                times[f"rank_{key}"].append(time.perf_counter() - t)
        lengths = [[len(a) + len(b) for a, b in zip(*batch)] for batch in batches]
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        out[name] = {
            "labels": len(labels),
            "padded_fraction": 1 - sum(map(sum, lengths)) / sum(len(x) * max(x) for x in lengths),
            "auto_packs": sum(auto) / len(auto),
            "ms_median": med,
            "ratios": {
                "train": med["train_packed"] / med["train_padded"],
                "rank": med["rank_packed"] / med["rank_padded"],
            },
        }
        _log(f"packing {name}: {out[name]['ratios']}")
    return {"batch": cfg.pack_batch, "batches": cfg.pack_batches, "datasets": out}


# label-ranking sets: (name, folder, rows file); long complaint narratives, then short queries with many labels
LABEL_SETS = [
    ("cfpb", "cfpb_complaints", "train.jsonl"),
    ("dbpedia", "dbpedia", "train.jsonl"),
    ("clinc:banking", "clinc150", "train.jsonl"),
    ("ag_news", "ag_news", "train.jsonl"),
]


def bench_labels(bank, cfg) -> dict:
    """Label ranking (``rank_labels``, as ``predict`` ranks a classification task's labels) with each row's label
    continuations side by side behind its one key/value cache (``inject.forward_segments``, the default) vs a
    copy of the row's cache per (row, label) pair (what the library does with ``inject.PACKING`` off), same
    batches: per dataset ``label_batches`` batches of ``label_batch`` random train rows cut to 256 tokens (the
    library's default input limit) behind a 20-token prompt, inputs padded both ways (only the continuations
    differ), variants interleaved with the order alternating per batch. Medians, ratio side by side / copies, and
    the largest score difference between the two."""
    import random

    from promptbank import inject
    from promptbank.causal import encode_input, encode_target, rank_labels
    from promptbank.inject import prompt_kv

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    kv = prompt_kv(model, {0: _random_prompt(model, [0], seed=0)[0]})
    out, saved = {}, inject.PACKING
    try:
        for name, folder, rows_file in LABEL_SETS:
            rows, labels = _labelled_rows(cfg.data, name, folder, rows_file)
            label_ids = [encode_target(tok, lab) for lab in labels]
            rng = random.Random(0)
            times = {"side_by_side": [], "copies": []}
            diff, lengths = 0.0, []
            for i in range(cfg.label_batches):
                inputs = [encode_input(tok, r["text"])[-256:] for r in rng.sample(rows, cfg.label_batch)]
                lengths += [len(x) for x in inputs]
                scores = {}
                for shared in (True, False)[:: 1 if i % 2 else -1]:
                    inject.PACKING = shared  # off: cache copies (inputs are padded either way: pack=False)
                    t = time.perf_counter()
                    scores[shared] = rank_labels(
                        model, tok, [kv] * len(inputs), inputs, [label_ids] * len(inputs), pack=False
                    )
                    times["side_by_side" if shared else "copies"].append(time.perf_counter() - t)
                diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(scores[True], scores[False])))
            med = {k: 1000 * statistics.median(v) for k, v in times.items()}
            out[name] = {
                "labels": len(labels),
                "label_tokens_fed_per_row": sum(len(x) - 1 for x in label_ids),
                "input_tokens_median": statistics.median(lengths),
                "ms_median": med,
                "ratio": med["side_by_side"] / med["copies"],
                "max_abs_score_difference": diff,
            }
            _log(f"labels {name}: ratio {out[name]['ratio']:.2f}")
    finally:
        inject.PACKING = saved
    return {"batch": cfg.label_batch, "batches": cfg.label_batches, "prompt_tokens": P, "datasets": out}


def _mac_floor(model, pairs) -> dict:
    """Multiply-accumulates per training forward, ours vs PEFT, from the model's shapes: the ratio our forward's
    arithmetic sets, which its measured time cannot beat by much (backward costs about the same multiple). Body =
    every non-embedding weight, once per position; LM head = vocab x d per position that gets logits. Ours skips
    the last layer's query / output projections and feed-forward block wherever no target is read
    (``inject.reading``; the prompt positions included)."""
    from promptbank import inject

    d, vocab = model.config.hidden_size, model.config.vocab_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    head = vocab * d
    b = len(pairs)
    seq = sum(len(i) + len(t) for i, t in pairs)  # input + label positions over the batch
    tgt = sum(len(t) for _, t in pairs)
    # real tokens behind the prefix cache, the last label token not fed; logits only where labels are predicted
    skipped = sum(p.numel() for m in inject._per_position_modules(model) for p in m.parameters())
    ours_input = (seq - len(pairs)) * body + tgt * head - (seq - len(pairs) - tgt) * skipped
    ours_prefix = P * (body - skipped)  # the prompt positions once per batch (batch size 1), none of them read
    peft_pt = (seq + b * P) * (body + head)  # prompt tokens in every row; logits at every position
    peft_prefix = seq * (body + head)  # PEFT prefix tuning feeds key/values: no prompt positions, full logits
    return {
        "body_macs_per_position": body,
        "head_macs_per_position": head,
        "last_layer_macs_skipped_per_unread_position": skipped,
        "ours_prompt_tuning_vs_peft_prompt_tuning": (ours_input + ours_prefix) / peft_pt,
        "ours_deep_vs_peft_prefix_tuning": (ours_input + ours_prefix) / peft_prefix,
    }


# --------------------------------------------------------------------------------------------------
# generation: soft prompt vs none, mixed vs single task, vs PEFT adapter switching
# --------------------------------------------------------------------------------------------------


def _peft_adapters(bank, names: list[str]):
    """One PeftModel with a PromptTuning adapter per task, holding the bank's soft prompts (layer 0)."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = bank.backbone.model
    pc = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    pm = get_peft_model(model, pc, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, pc)
    with torch.no_grad():
        for n in names:
            pm.prompt_encoder[n].embedding.weight.copy_(bank._tasks[n].prompt[0])
    pm.eval()
    return pm


def bench_generate(bank, pm, names: list[str], texts: list[str], cfg) -> dict:
    import torch

    from promptbank import causal

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    no_eos = _NoEos(tok)
    b, new = cfg.gen_batch, cfg.gen_tokens
    inputs = [causal.encode_input(tok, t) for t in texts[:b]]
    single = [bank._prompt_kv(names[0])] * b
    mixed = [bank._prompt_kv(names[i % len(names)]) for i in range(b)]
    outs: dict[str, list] = {}

    def ours(row_kv, key):
        def run():
            outs[key] = causal.generate(model, no_eos, row_kv, inputs, max_new_tokens=new)

        return run

    gen_kwargs = dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, top_p=None, top_k=None
    )

    def peft_switch():
        res = []
        for i in range(b):
            pm.set_adapter(names[i % len(names)])
            ids = torch.tensor([inputs[i]])
            with torch.no_grad():
                out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
            res.append(out[0, -new:].tolist())
        outs["peft_switch"] = res

    def peft_batch():
        pm.set_adapter(names[0])
        ids, mask = causal.left_pad(inputs, tok.pad_token_id)
        with torch.no_grad():
            out = pm.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        outs["peft_single_task_batch"] = out[:, -new:].tolist()

    variants = {
        "ours_no_prompt": ours([None] * b, "ours_no_prompt"),
        "ours_single_task": ours(single, "ours_single_task"),
        "ours_mixed_8_tasks": ours(mixed, "ours_mixed_8_tasks"),
        "peft_switch_per_request": peft_switch,
        "peft_single_task_batch": peft_batch,
    }
    with warnings.catch_warnings():  # warm every code path once on 2 tokens
        warnings.simplefilter("ignore")
        causal.generate(model, no_eos, mixed, inputs, max_new_tokens=2)
        causal.generate(model, no_eos, [None] * b, inputs, max_new_tokens=2)
        ids = torch.tensor([inputs[0]])
        pm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **dict(gen_kwargs, max_new_tokens=2, min_new_tokens=2)
        )
    _log(
        f"generate: {len(variants)} variants x ({cfg.gen_warmup} warm-up + {cfg.gen_rounds}) rounds, "
        f"then {cfg.gen_extra_rounds} more of promptbank's"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = _interleaved(variants, cfg.gen_rounds, cfg.gen_warmup)
        # the soft-prompt overhead is a few %: more rounds of the (cheaper) promptbank variants alone
        ours_only = {k: v for k, v in variants.items() if k.startswith("ours_")}
        for k, v in _interleaved(ours_only, cfg.gen_extra_rounds, 0).items():
            times[k] += v

    # correctness: greedy tokens of ours (mixed batch) and of PEFT generate vs a no-cache reference (PEFT forward
    # over the growing sequence, one row at a time) for the first `check` tokens of each row
    check = min(new, cfg.gen_check_tokens)
    ref = []
    with torch.no_grad():
        for i in range(b):
            pm.set_adapter(names[i % len(names)])
            seq = list(inputs[i])
            for _ in range(check):
                ids = torch.tensor([seq])
                seq.append(int(pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
            ref.append(seq[len(inputs[i]) :])

    def agreement(rows):  # fraction of rows equal to the reference up to its first EOS (PEFT suppresses EOS)
        hits = 0
        for got, want in zip(rows, ref):
            cut = want.index(tok.eos_token_id) if tok.eos_token_id in want else check
            hits += got[:cut] == want[:cut]
        return hits / len(ref)

    n_tok = b * new
    res = {
        "batch": b,
        "new_tokens": new,
        "ms_per_run": {k: _summary(v) for k, v in times.items()},
        "tokens_per_s": {k: n_tok / statistics.median(v) for k, v in times.items()},
        "rows_equal_to_no_cache_reference": {
            "tokens_checked": check,
            "ours_mixed_8_tasks": agreement(outs["ours_mixed_8_tasks"]),
            "peft_switch_per_request": agreement(outs["peft_switch"]),
        },
    }
    tps = res["tokens_per_s"]
    res["ratios"] = {
        "gen_overhead": tps["ours_no_prompt"] / tps["ours_single_task"] - 1.0,
        "mixed_vs_single": tps["ours_mixed_8_tasks"] / tps["ours_single_task"],
        "mixed_vs_peft": tps["ours_mixed_8_tasks"] / tps["peft_switch_per_request"],
        "mixed_vs_peft_single_task_batch": tps["ours_mixed_8_tasks"] / tps["peft_single_task_batch"],
    }
    # cost of computing one task's prefix cache (paid once per task, then reused)
    kv_ms = []
    for n in names:
        bank._kv.pop(n, None)
        t = time.perf_counter()
        bank._prompt_kv(n)
        kv_ms.append(1000 * (time.perf_counter() - t))
    res["prefix_cache_build_ms"] = _percentiles(kv_ms)
    return res


# --------------------------------------------------------------------------------------------------
# classification throughput
# --------------------------------------------------------------------------------------------------


def bench_classify(bank, pm, tasks: list[dict], cfg) -> dict:
    import torch
    import torch.nn.functional as F

    from promptbank import causal

    tok = bank.backbone.tokenizer
    queries = [(q, gold, t["name"]) for t in tasks for q, gold in t["queries"][: cfg.cls_per_task]]
    texts = [q for q, _, _ in queries]
    label_ids = {t["name"]: [causal.encode_target(tok, lab) for lab in t["labels"]] for t in tasks}
    labels = {t["name"]: t["labels"] for t in tasks}
    outs: dict[str, list] = {}

    def ours():
        outs["ours"] = bank.predict(texts, batch_size=16)

    def peft_given():
        preds = [None] * len(queries)
        by_task: dict[str, list[int]] = {}
        for i, (_, _, name) in enumerate(queries):
            by_task.setdefault(name, []).append(i)
        for name, rows in by_task.items():
            pm.set_adapter(name)
            seqs, owners, lab_idx, lab_len = [], [], [], []
            for i in rows:
                inp = causal.encode_input(tok, texts[i])
                for j, lab in enumerate(label_ids[name]):
                    seqs.append(inp + lab)
                    owners.append(i)
                    lab_idx.append(j)
                    lab_len.append(len(lab))
            scores = torch.empty(len(seqs))
            for s in range(0, len(seqs), 16):
                chunk = seqs[s : s + 16]
                width = max(len(x) for x in chunk)
                ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, x in enumerate(chunk):  # right-padded: PEFT prepends the virtual tokens itself
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                with torch.no_grad():
                    logits = pm(input_ids=ids, attention_mask=mask).logits[:, -width:]  # (n, width, V)
                logp = F.log_softmax(logits.float(), dim=-1)
                for r, x in enumerate(chunk):
                    n_lab = lab_len[s + r]
                    pos = torch.arange(len(x) - n_lab - 1, len(x) - 1)
                    scores[s + r] = logp[r, pos, torch.tensor(x[-n_lab:])].sum()
            for i in rows:
                sel = [k for k, o in enumerate(owners) if o == i]
                best = max(sel, key=lambda k: float(scores[k]))
                preds[i] = labels[name][lab_idx[best]]
        outs["peft"] = preds

    _log(f"classify: {len(queries)} queries x ({cfg.cls_warmup} warm-up + {cfg.cls_rounds}) rounds")
    times = _interleaved({"ours_routed": ours, "peft_task_given": peft_given}, cfg.cls_rounds, cfg.cls_warmup)
    routed_right = [p.task == name for p, (_, _, name) in zip(outs["ours"], queries)]
    same = [p.output == q for p, q, ok in zip(outs["ours"], outs["peft"], routed_right) if ok]
    n = len(queries)
    res = {
        "n_queries": n,
        "n_labels_per_task": {k: len(v) for k, v in labels.items()},
        "ms_per_run": {k: _summary(v) for k, v in times.items()},
        "queries_per_s": {k: n / statistics.median(v) for k, v in times.items()},
        "routing_hit_at_1": sum(routed_right) / n,
        "label_agreement_ours_vs_peft_where_routed_right": sum(same) / max(len(same), 1),
    }
    q = res["queries_per_s"]
    res["ratios"] = {"classify_vs_peft": q["ours_routed"] / q["peft_task_given"]}
    return res


# --------------------------------------------------------------------------------------------------
# routing latency
# --------------------------------------------------------------------------------------------------


def _synthetic_keys(pool, n_tasks: int, keys_per_task: int, seed: int) -> dict:
    """Routing keys of ``n_tasks`` synthetic tasks shaped like real ones: each task's centre mixes two real
    MiniLM embeddings, its keys scatter around the centre (cosine ~0.8), all L2-normalised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = pool.shape[1]
    a = pool[rng.integers(0, len(pool), n_tasks)]
    b = pool[rng.integers(0, len(pool), n_tasks)]
    w = rng.uniform(0.5, 1.0, (n_tasks, 1)).astype(np.float32)
    centres = w * a + (1 - w) * b + 0.3 * rng.standard_normal((n_tasks, d)).astype(np.float32) / np.sqrt(d)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n_tasks, keys_per_task, d)).astype(np.float32) / np.sqrt(d)
    keys = centres[:, None, :] + 0.6 * noise
    keys /= np.linalg.norm(keys, axis=2, keepdims=True)
    return {f"t{i}": keys[i] for i in range(n_tasks)}


def bench_route(bank, tasks: list[dict], cfg) -> dict:
    """Routing latency with numpy's and FAISS's BLAS / OpenMP pools at ``--threads`` like torch's (threadpoolctl,
    when installed): with 2 OpenBLAS threads on a loaded 2-core machine, every matrix product of the learned
    router waits for a descheduled thread (measured: a 10-task fit 30 s instead of 0.5 s, a search 8 ms instead
    of 0.13 ms)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _bench_route(bank, tasks, cfg)
    with threadpool_limits(limits=cfg.threads):
        return _bench_route(bank, tasks, cfg)


def _bench_route(bank, tasks: list[dict], cfg) -> dict:
    import numpy as np

    from promptbank.bank import ROUTER_TOP_KEYS
    from promptbank.lda import GaussianRouter
    from promptbank.router import Router, recall_at_1

    emb = bank.embedder
    pool_texts = [x for t in tasks for x in t["key_texts"]]
    pool = emb.encode(pool_texts)
    per_task = [[q for q, _ in t["queries"]] for t in tasks]
    query_texts = [qs[i] for i in range(max(map(len, per_task))) for qs in per_task if i < len(qs)]  # round-robin
    queries = query_texts[: cfg.route_queries]
    q_emb = emb.encode(query_texts)
    # recall queries: the real query embeddings plus points near stored keys (in-distribution for the bank)
    configs = [(f"flat_{n_tasks * k}", n_tasks, k, "flat") for n_tasks, k in cfg.route_sizes]
    configs += [
        (f"{kind}_{n_tasks * k}", n_tasks, k, kind) for n_tasks, k in cfg.route_sizes[-1:] for kind in ("hnsw", "ivf")
    ]
    configs += [(f"lda_{n_tasks * k}", n_tasks, k, "lda") for n_tasks, k in cfg.route_sizes]
    routers, build_s, keysets = {}, {}, {}
    for name, n_tasks, k, kind in configs:
        if (n_tasks, k) not in keysets:
            keysets[(n_tasks, k)] = _synthetic_keys(pool, n_tasks, k, seed=n_tasks * 31 + k)
        keys = keysets[(n_tasks, k)]
        t = time.perf_counter()
        if kind == "lda":  # the learned router (the default scorer): fitted from the keys, one Gaussian per task
            r = GaussianRouter({n: (v, None, 0.05) for n, v in keys.items()}, pool.shape[1])
        else:
            r = Router.from_keys(keys, {n: 0.0 for n in keys}, top_keys=ROUTER_TOP_KEYS, index=kind)
            r._index_cols()  # build the index now, not on the first query
        build_s[name] = time.perf_counter() - t
        routers[name] = r
        _log(f"route: built {name} ({n_tasks * k} keys) in {build_s[name]:.1f} s")

    # the same embedder with its weights in bf16 (SentenceEmbedder(dtype="bfloat16"); same name, same keys): its
    # own rows at 1,000 tasks x 16 keys, the query embedded in bf16, searched among the fp32 keys
    from promptbank.embed import DEFAULT_EMBEDDER, FAST_ROUTING_EMBEDDER, ROUTING_EMBEDDER, SentenceEmbedder

    emb16 = SentenceEmbedder(emb.name, device=emb.device, dtype="bfloat16") if type(emb) is SentenceEmbedder else None
    embedders = {"": emb} | ({"_bf16": emb16} if emb16 is not None else {})
    variants = {name: (name, emb) for name in routers}  # end-to-end row -> (router, embedder)
    if emb16 is not None:
        variants |= {f"{n}_bf16": (n, emb16) for n in routers if n in ("flat_16000", "lda_16000")}
    # the opt-in fast routing embedder (MiniLM's first 3 layers): its own embedding space, so its own keys (the same
    # synthetic construction from its embeddings of the same key texts) and its own learned router
    all_routers = dict(routers)
    if emb.name == ROUTING_EMBEDDER and type(emb) is SentenceEmbedder and "lda_16000" in routers:
        fast = SentenceEmbedder(FAST_ROUTING_EMBEDDER, device=emb.device)
        fast_keys = _synthetic_keys(fast.encode(pool_texts), 1000, 16, seed=1000 * 31 + 16)
        all_routers["lda_16000_fast"] = GaussianRouter({n: (v, None, 0.05) for n, v in fast_keys.items()}, fast.dim)
        embedders["_fast"] = fast
        variants["lda_16000_fast"] = ("lda_16000_fast", fast)
        # MiniLM's first 2 layers only (`+layers=2`): a third less forward again, less accurate routing on the long
        # stream (benchmarks/routing_layers.py); timed compiled in bf16 only, its fp32 eager twin builds the keys
        two = SentenceEmbedder(DEFAULT_EMBEDDER + "+layers=2", device=emb.device)
        two_keys = _synthetic_keys(two.encode(pool_texts), 1000, 16, seed=1000 * 31 + 16)
        all_routers["lda_16000_2layers"] = GaussianRouter({n: (v, None, 0.05) for n, v in two_keys.items()}, two.dim)
        # both in bf16, eager: the settings whose serving memory meets the target (memory section), so that one row
        # says whether a setting meets the latency and the memory targets at once (compiling costs ~110 MiB)
        for suffix, spec, router in (
            ("_fast_bf16", FAST_ROUTING_EMBEDDER, "lda_16000_fast"),
            ("_2layers_bf16", DEFAULT_EMBEDDER + "+layers=2", "lda_16000_2layers"),
        ):
            embedders[suffix] = SentenceEmbedder(spec, device=emb.device, dtype="bfloat16")
            variants[f"lda_16000{suffix}"] = (router, embedders[suffix])
    # SentenceEmbedder(compile=True): the one-query forward torch.compile'd (compiled while loading, in the warm-up
    # below), with bf16 weights; the default embedder (same name: its keys and router) and the fast one
    compiled = {}
    if emb.name == ROUTING_EMBEDDER and type(emb) is SentenceEmbedder and "lda_16000" in routers:
        compiled["_bf16c"] = (
            "lda_16000",
            SentenceEmbedder(emb.name, device=emb.device, dtype="bfloat16", compile=True),
        )
        if "_fast" in embedders:
            fastc = SentenceEmbedder(FAST_ROUTING_EMBEDDER, device=emb.device, dtype="bfloat16", compile=True)
            compiled["_fast_bf16c"] = ("lda_16000_fast", fastc)
            twoc = SentenceEmbedder(DEFAULT_EMBEDDER + "+layers=2", device=emb.device, dtype="bfloat16", compile=True)
            compiled["_2layers_bf16c"] = ("lda_16000_2layers", twoc)
    for suffix, (router, e_) in compiled.items():
        embedders[suffix] = e_
        variants[f"lda_16000{suffix}"] = (router, e_)

    # one query at a time; embedding included; routers (and embedders) interleaved per query
    e2e = {name: [] for name in variants}
    search = {name: [] for name in routers}
    embed_ms = {suffix: [] for suffix in embedders}
    for suffix, e_ in embedders.items():
        t = time.perf_counter()
        e_.encode(queries[:2])  # warm-up (loads the model; compiles the compiled ones)
        _log(f"route: embedder{suffix or ' (default)'} loaded and warmed up in {time.perf_counter() - t:.1f} s")
    for i, text in enumerate(queries):
        for suffix in list(embedders)[i % len(embedders) :] + list(embedders)[: i % len(embedders)]:
            t = time.perf_counter()
            got = embedders[suffix].encode([text])
            embed_ms[suffix].append(1000 * (time.perf_counter() - t))
            if suffix == "":
                e = got
        names = list(variants)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            router, embedder = variants[name]
            t = time.perf_counter()
            all_routers[router].route(embedder.encode([text]), top_k=1)
            e2e[name].append(1000 * (time.perf_counter() - t))
            if router == name and name in search:
                t = time.perf_counter()
                routers[name].route(e, top_k=1)
                search[name].append(1000 * (time.perf_counter() - t))
    recall = {}
    for name, r in routers.items():
        if name.startswith(("flat", "lda")):  # exact search / a different rule, not an approximation of flat
            continue
        keys = keysets[(cfg.route_sizes[-1])]
        all_keys = np.concatenate(list(keys.values()))
        rng = np.random.default_rng(7)
        near = all_keys[rng.integers(0, len(all_keys), 500)] + 0.05 * rng.standard_normal(
            (500, all_keys.shape[1])
        ).astype(np.float32)
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        recall[name] = {
            "real_queries_task": recall_at_1(r, q_emb),
            "real_queries_key": recall_at_1(r, q_emb, level="key"),
            "near_key_queries_task": recall_at_1(r, near),
            "near_key_queries_key": recall_at_1(r, near, level="key"),
            "n_real": int(q_emb.shape[0]),
            "n_near": 500,
        }
    res = {
        "top_keys": ROUTER_TOP_KEYS,
        "sizes": {name: {"tasks": n, "keys_per_task": k, "keys": n * k, "index": kind} for name, n, k, kind in configs},
        "build_s": build_s,
        "embed_ms": _percentiles(embed_ms[""]),
        "end_to_end_ms": {k: _percentiles(v) for k, v in e2e.items()},
        "search_only_ms": {k: _percentiles(v) for k, v in search.items()},
        "recall_at_1": recall,
    }
    if "_fast" in embed_ms:
        res["embed_ms_fast"] = _percentiles(embed_ms["_fast"])
    if compiled:  # what the compiled bf16 forward changes: latency, routing decisions (its queries one at a time, its
        # path; against the fp32 eager embeddings, q_emb for the default embedder)
        fp32 = {
            "_bf16c": (emb, "lda_16000"),
            "_fast_bf16c": (embedders.get("_fast"), "lda_16000_fast"),
            "_2layers_bf16c": (two, "lda_16000_2layers"),
        }
        res["compiled_vs_fp32"] = {}
        for suffix, (router, e_) in compiled.items():
            ref_e, ref_router = fp32[suffix]
            a = q_emb if ref_e is emb else np.concatenate([ref_e.encode([t]) for t in query_texts])
            b = np.concatenate([e_.encode([t]) for t in query_texts])
            ra = [r[0][0] if r else None for r in all_routers[ref_router].route(a, top_k=1)]
            rb = [r[0][0] if r else None for r in all_routers[router].route(b, top_k=1)]
            res["compiled_vs_fp32"][suffix] = {
                "n": len(query_texts),
                "cosine_min": float((a * b).sum(1).min()),
                "same_task": sum(x == y for x, y in zip(ra, rb)) / len(ra),
                "embed_ms": _percentiles(embed_ms[suffix]),
            }
    if emb16 is not None:  # what bf16 weights change: latency, and the embeddings / routing decisions
        q16 = emb16.encode(query_texts)
        res["embed_ms_bf16"] = _percentiles(embed_ms["_bf16"])
        agree = {"n": int(q_emb.shape[0]), "cosine_min": float((q_emb * q16).sum(1).min())}
        for name in ("flat_16000", "lda_16000"):
            if name in routers:
                a = [r[0][0] if r else None for r in routers[name].route(q_emb, top_k=1)]
                b = [r[0][0] if r else None for r in routers[name].route(q16, top_k=1)]
                agree[f"{name}_same_task"] = sum(x == y for x, y in zip(a, b)) / len(a)
        res["bf16_vs_fp32"] = agree
    thousand = {c[3]: c[0] for c in configs if c[1] == 1000 and c[2] == 16}
    if thousand:
        res["ratios"] = {"route_p50_1000_tasks": res["end_to_end_ms"][thousand["flat"]]["p50"]}
        if "lda" in thousand:
            res["ratios"]["route_p50_1000_tasks_lda"] = res["end_to_end_ms"][thousand["lda"]]["p50"]
        if "lda_16000_fast" in res["end_to_end_ms"]:
            res["ratios"]["route_p50_1000_tasks_fast_lda"] = res["end_to_end_ms"]["lda_16000_fast"]["p50"]
        for suffix in [*compiled, "_fast_bf16", "_2layers_bf16"]:
            if f"lda_16000{suffix}" in res["end_to_end_ms"]:
                res["ratios"][f"route_p50_1000_tasks{suffix}_lda"] = res["end_to_end_ms"][f"lda_16000{suffix}"]["p50"]
        for kind in ("flat", "lda"):
            if f"{thousand.get(kind)}_bf16" in res["end_to_end_ms"]:
                key = "route_p50_1000_tasks_bf16" + ("_lda" if kind == "lda" else "")
                res["ratios"][key] = res["end_to_end_ms"][f"{thousand[kind]}_bf16"]["p50"]
    return res


# --------------------------------------------------------------------------------------------------
# memory (fresh subprocesses)
# --------------------------------------------------------------------------------------------------


def memory_child(mode: str, n_tasks: int, new_tokens: int) -> None:
    """Run in a fresh process: load, serve 8 requests, print peak RSS as JSON (last stdout line)."""
    import numpy as np
    import torch

    from promptbank import causal

    texts = [
        "my card was charged twice for the same order",
        "what is the capital of australia",
        "the movie was a complete waste of time",
        "how do i reset my online banking password",
        "patient presents with chest pain and shortness of breath",
        "stocks rallied after the central bank cut rates",
        "who wrote the novel war and peace",
        "the battery of this phone lasts two days",
    ]
    t0 = time.perf_counter()
    if mode == "bare":
        from promptbank.backbone import load_backbone

        bb = load_backbone()
        model, tok = bb.model, bb.tokenizer
        after_load = _reset_peak()
        inputs = [causal.encode_input(tok, t) for t in texts]
        causal.generate(model, _NoEos(tok), [None] * len(texts), inputs, max_new_tokens=new_tokens)
    else:
        from promptbank import PromptBank
        from promptbank.embed import DEFAULT_EMBEDDER, FAST_ROUTING_EMBEDDER, ROUTING_EMBEDDER, SentenceEmbedder

        embedders = {  # mode suffix -> routing embedder (spec, dtype); the longest matching suffix wins
            "_bf16": (ROUTING_EMBEDDER, "bfloat16"),
            "_fast": (FAST_ROUTING_EMBEDDER, None),
            "_fast_bf16": (FAST_ROUTING_EMBEDDER, "bfloat16"),
            "_2layers": (DEFAULT_EMBEDDER + "+layers=2", None),
        }
        suffix = max((k for k in embedders if mode.endswith(k)), key=len, default=None)
        embedder = None if suffix is None else SentenceEmbedder(embedders[suffix][0], dtype=embedders[suffix][1])
        bank = PromptBank.from_pretrained(embedder=embedder)  # the embedder loads lazily, when routing
        if "_budget" not in mode:
            bank.kv_cache_bytes = 1 << 40  # unlimited (the rows before the byte budget): all 100 prefixes kept
        model, tok = bank.backbone.model, bank.backbone.tokenizer
        after_load = _reset_peak()  # what follows (tasks, prefix caches, embedder, serving) is the bank's cost
        deep = "deep" in mode
        layers = list(range(bank.backbone.num_layers)) if deep else [0]
        rng = np.random.default_rng(0)
        d_emb = bank.router.dim
        base = _random_prompt(model, layers, seed=0)
        for i in range(n_tasks):
            prompt = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}  # distinct tensors per task
            keys = rng.standard_normal((16, d_emb)).astype(np.float32)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
            _insert_task(bank, f"task{i:03d}", None, prompt, keys, "deep" if deep else "prompt_tuning")
        names = list(bank.tasks)
        for n in names:  # a bank serving all its tasks holds every prefix cache
            bank._prompt_kv(n)
        if "routed" in mode:
            routed = [r.task for r in bank.route_many(texts)]
            kv = [bank._prompt_kv(n) for n in routed]
        else:
            kv = [bank._prompt_kv(names[i * (n_tasks // len(texts))]) for i in range(len(texts))]
        inputs = [causal.encode_input(tok, t) for t in texts]
        causal.generate(model, _NoEos(tok), kv, inputs, max_new_tokens=new_tokens)
    process_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; includes loading
    status = _proc_status()
    cache = {}
    if mode != "bare":
        cache = {
            "kv_cache_tasks": len(bank._kv),
            "kv_cache_mib": bank.kv_cache_nbytes / 2**20,
            "kv_cache_budget_mib": bank.kv_cache_bytes / 2**20,
        }
    print(
        json.dumps(
            {
                "mode": mode,
                **cache,
                "rss_after_load_mib": after_load,
                "serving_peak_rss_mib": status.get("VmHWM", 0) / 1024 if after_load is not None else None,
                "process_peak_rss_mib": process_peak_kib / 1024,
                "rss_end_mib": status.get("VmRSS", 0) / 1024,
                "s": time.perf_counter() - t0,
            }
        )
    )


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (KiB) from /proc/self/status; empty where there is no procfs."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _reset_peak() -> float | None:
    """Reset the kernel's peak-RSS counter (VmHWM, Linux >= 4.0) after loading; return the RSS then (MiB).

    Loading the weights briefly needs more memory than holding them (``ru_maxrss`` of a bare backbone process is
    dominated by that spike), so the serving peak is measured from here on, in the same way for every mode.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status().get("VmRSS", 0) / 1024


def bench_memory(cfg) -> dict:
    modes = ["bare", "bank_given", "bank_routed", "bank_given_deep"] if not cfg.quick else ["bare", "bank_given"]
    budget_modes = [
        "bank_given_budget",
        "bank_routed_budget",
        "bank_routed_budget_bf16",
        "bank_routed_budget_fast",
        "bank_routed_budget_fast_bf16",
        "bank_routed_budget_2layers",
    ]
    modes += budget_modes
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(cfg.mem_rounds):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            cmd = [sys.executable, __file__, "--memory-child", m, "--memory-tasks", str(cfg.mem_tasks)]
            cmd += ["--memory-new-tokens", str(cfg.gen_tokens), "--threads", str(cfg.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            _log(f"memory: {m} {runs[m][-1]}")
    key = "serving_peak_rss_mib" if runs["bare"][0]["serving_peak_rss_mib"] is not None else "process_peak_rss_mib"
    peak = {m: statistics.median(x[key] for x in v) for m, v in runs.items()}
    res = {"tasks": cfg.mem_tasks, "measure": key, "peak_rss_mib": peak, "runs": runs}
    c = cfg.model_config  # what a task costs to hold, fp32: its soft prompt and its per-layer prefix key/values
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * P * head_dim * 4
    res["mib_per_task"] = {
        "prefix_cache": kv / 2**20,
        "prompt_tuning_prompt": P * c.hidden_size * 4 / 2**20,
        "deep_prompt": c.num_hidden_layers * P * c.hidden_size * 4 / 2**20,
    }
    res["ratios"] = {"memory_given": peak["bank_given"] / peak["bare"]}
    if "bank_routed" in peak:
        res["ratios"]["memory_routed"] = peak["bank_routed"] / peak["bare"]
    if "bank_given_deep" in peak:
        res["ratios"]["memory_given_deep"] = peak["bank_given_deep"] / peak["bare"]
    for m in budget_modes:
        res["ratios"][m.replace("bank_", "memory_")] = peak[m] / peak["bare"]
    return res


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _verdict(value: float, op: str, target: float | None) -> str:
    if target is None:
        return "—"
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "missed"


def _fmt(key: str, v: float) -> str:
    if key == "gen_overhead":
        return f"{100 * v:+.1f} %"
    if key.startswith("memory"):
        return f"{v:.3f}x ({100 * (v - 1):+.1f} %)"
    if key.startswith("route_p50"):
        return f"{v:.1f} ms"
    return f"{v:.2f}x" if key in ("mixed_vs_peft", "classify_vs_peft", "mixed_vs_single") else f"{v:.2f}"


def table(result: dict) -> str:
    ratios = {}
    for section in ("train", "tta", "generate", "classify", "route", "memory"):
        ratios.update(result.get(section, {}).get("ratios", {}))
    lines = ["| measure | result | target | |", "|---|---:|---:|---|"]
    for key, (label, op, target) in SPARSE_TARGETS.items():
        if key not in ratios:
            continue
        tgt = (
            "faster"
            if target is None
            else (f"{op} {100 * target:.0f} %" if key == "gen_overhead" else f"{op} {target}")
        )
        if key.startswith("memory") and target is not None:
            tgt = f"{op} +{100 * (target - 1):.0f} %"
        lines.append(f"| {label} | {_fmt(key, ratios[key])} | {tgt} | {_verdict(ratios[key], op, target)} |")
    return "\n".join(lines)


def details(result: dict) -> str:
    out = []
    if "train" in result:
        ms = result["train"]["ms_per_step"]
        out.append("Training ms/step (median): " + ", ".join(f"{k} {v['median']:.0f}" for k, v in ms.items()))
        if "compute_floor" in result["train"]:
            f = result["train"]["compute_floor"]
            out.append(
                "Compute floor (forward multiply-accumulates, ours / PEFT): prompt tuning "
                f"{f['ours_prompt_tuning_vs_peft_prompt_tuning']:.2f}, deep vs prefix tuning "
                f"{f['ours_deep_vs_peft_prefix_tuning']:.2f}"
            )
    if "precision" in result:
        pr = result["precision"]
        out.append(
            "bf16 training step (prompt tuning, ms/step median): "
            + ", ".join(f"{k} {v['median']:.0f}" for k, v in pr["ms_per_step"].items())
            + "; time vs fp32: "
            + ", ".join(f"{k} {v:.2f}" for k, v in pr["ratios"].items())
            + "; loss at the last step: "
            + ", ".join(f"{k} {v[-1]:.3f}" for k, v in pr["loss_per_step"].items())
        )
    if "tta" in result:
        t = result["tta"]
        reach = ", ".join(
            f"{k} step {v['step']} after {v['seconds']:.0f} s" if v else f"{k} never" for k, v in t["reached"].items()
        )
        out.append(
            f"Time to accuracy (CLINC {t['task']['domain']}, {t['task']['train']} train / {t['task']['dev']} dev, batch "
            f"{t['batch']}, lr {t['lr']:g}): level {100 * t['level']:.1f} % dev accuracy reached by {reach}; ms/step "
            + ", ".join(f"{k} {v['median']:.0f}" for k, v in t["ms_per_step"].items())
            + "; final dev accuracy "
            + ", ".join(f"{k} {100 * c[-1][1]:.1f} %" for k, c in t["accuracy_curve"].items())
        )
    if "packing" in result:
        pk = result["packing"]
        out.append(
            f"Packed / padded forwards (batch {pk['batch']}, {pk['batches']} batches per dataset): "
            + "; ".join(
                f"{n} ({100 * d['padded_fraction']:.0f} % padding, packed by default on {100 * d['auto_packs']:.0f} % "
                f"of batches) training step {d['ratios']['train']:.2f}, label ranking {d['ratios']['rank']:.2f}"
                for n, d in pk["datasets"].items()
            )
        )
    if "labels" in result:
        lb = result["labels"]
        out.append(
            f"Label ranking, continuations side by side behind each row's cache / a cache copy per (row, label) "
            f"(batch {lb['batch']}, {lb['batches']} batches, inputs padded both ways): "
            + "; ".join(
                f"{n} ({d['labels']} labels, {d['label_tokens_fed_per_row']} label tokens fed per row, median input "
                f"{d['input_tokens_median']:.0f} tokens) {d['ratio']:.2f} (max score difference "
                f"{d['max_abs_score_difference']:.1e})"
                for n, d in lb["datasets"].items()
            )
        )
    if "generate" in result:
        g = result["generate"]
        out.append(
            f"Generation tokens/s (batch {g['batch']}, {g['new_tokens']} new): "
            + ", ".join(f"{k} {v:.1f}" for k, v in g["tokens_per_s"].items())
            + "; rows equal to a no-cache greedy reference (first {tokens_checked} tokens): ours mixed "
            "{ours_mixed_8_tasks:.0%}, PEFT generate {peft_switch_per_request:.0%}".format(
                **g["rows_equal_to_no_cache_reference"]
            )
            + f"; prefix cache build {g['prefix_cache_build_ms']['p50']:.0f} ms/task (once)"
        )
    if "classify" in result:
        c = result["classify"]
        out.append(
            f"Classification q/s ({c['n_queries']} queries): "
            + ", ".join(f"{k} {v:.2f}" for k, v in c["queries_per_s"].items())
            + f"; routing hit@1 {100 * c['routing_hit_at_1']:.0f} %, label agreement with PEFT where routed right "
            f"{100 * c['label_agreement_ours_vs_peft_where_routed_right']:.0f} %"
        )
    if "route" in result:
        r = result["route"]
        out.append(f"Routing: query embedding p50 {r['embed_ms']['p50']:.1f} ms / p99 {r['embed_ms']['p99']:.1f} ms")
        if "embed_ms_fast" in r:
            out[-1] += (
                f"; fast embedder (+layers=3,2) {r['embed_ms_fast']['p50']:.1f} / {r['embed_ms_fast']['p99']:.1f} ms"
            )
        if "embed_ms_bf16" in r:
            b, a = r["embed_ms_bf16"], r["bf16_vs_fp32"]
            out[-1] += (
                f"; bf16 weights {b['p50']:.1f} / {b['p99']:.1f} ms (cosine to fp32 >= {a['cosine_min']:.5f}; same task "
                + ", ".join(
                    f"{k.removesuffix('_same_task')} {100 * v:.1f} %" for k, v in a.items() if k.endswith("_same_task")
                )
                + ")"
            )
        for suffix, c in r.get("compiled_vs_fp32", {}).items():
            out[-1] += (
                f"; {suffix[1:]} (compile=True) {c['embed_ms']['p50']:.1f} / {c['embed_ms']['p99']:.1f} ms (cosine to "
                f"fp32 eager >= {c['cosine_min']:.5f}, same task {100 * c['same_task']:.1f} % of {c['n']} queries)"
            )
        rows = [
            "| index | keys | build s | end-to-end p50 / p99 ms | search only p50 / p99 ms | recall@1 task (real / near-key) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, size in r["sizes"].items():
            e, s = r["end_to_end_ms"][name], r["search_only_ms"][name]
            rec = r["recall_at_1"].get(name)
            rec_s = f"{rec['real_queries_task']:.3f} / {rec['near_key_queries_task']:.3f}" if rec else "exact"
            rows.append(
                f"| {size['index']} | {size['keys']:,} ({size['tasks']:,} x {size['keys_per_task']}) | "
                f"{r['build_s'][name]:.1f} | {e['p50']:.1f} / {e['p99']:.1f} | {s['p50']:.2f} / {s['p99']:.2f} | {rec_s} |"
            )
        out.append("\n".join(rows))
    if "memory" in result:
        m = result["memory"]
        out.append(
            f"Peak RSS while serving, after loading ({m['tasks']} tasks; {m['measure']}): "
            + ", ".join(f"{k} {v:.0f} MiB" for k, v in m["peak_rss_mib"].items())
            + "; RSS after loading the backbone "
            + ", ".join(f"{k} {v[0]['rss_after_load_mib']:.0f}" for k, v in m["runs"].items())
            + "; per task (fp32): prefix cache {prefix_cache:.2f} MiB, prompt-tuning prompt {prompt_tuning_prompt:.3f} "
            "MiB, deep prompt {deep_prompt:.2f} MiB".format(**m["mib_per_task"])
        )
    return "\n\n".join(out)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = {}
    for section in ("train", "generate", "classify", "memory"):
        ratios.update(result.get(section, {}).get("ratios", {}))
    rows = []
    for key, (label, op, target) in SPARSE_TARGETS.items():
        if key in ratios and key != "route_p50_1000_tasks":
            v = ratios[key] + (1.0 if key == "gen_overhead" else 0.0)  # overhead as a ratio of times
            t = None if target is None else target + (1.0 if key == "gen_overhead" else 0.0)
            ok = _verdict(ratios[key], op, target)
            rows.append((label.replace(", ", "\n", 1), v, t, ok))
    fig, ax = plt.subplots(figsize=(9, 0.65 * len(rows) + 1.2))
    y = range(len(rows))
    colours = {"met": "#3a7d44", "missed": "#c0392b", "—": "#555555"}
    ax.barh(list(y), [r[1] for r in rows], color=[colours[r[3]] for r in rows])
    for i, (_, v, t, _) in enumerate(rows):
        if t is not None:
            ax.plot([t, t], [i - 0.4, i + 0.4], "k--", lw=1.2)
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.25, 0.5, 0.8, 1, 2, 3, 5, 10])
    ax.set_xlabel("ratio (log scale); dashed = target; green met, red missed")
    ax.set_title("promptbank vs PEFT / baselines, SmolLM2-135M, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _config(args) -> argparse.Namespace:
    c = argparse.Namespace(quick=args.quick)
    if args.quick:
        c.train_batch, c.train_tokens, c.train_warmup, c.train_steps = 2, 16, 1, 1
        c.gen_batch, c.gen_tokens, c.gen_warmup, c.gen_rounds, c.gen_check_tokens = 8, 4, 0, 1, 4
        c.gen_extra_rounds = 1
        c.cls_per_task, c.cls_warmup, c.cls_rounds = 1, 0, 1
        c.route_sizes, c.route_queries = [(10, 1), (1000, 1), (1000, 16)], 10
        c.mem_tasks, c.mem_rounds = 10, 1
        c.query_tokens = 48
        c.tta_domain, c.tta_train_per_intent, c.tta_dev_per_intent = "banking", 1, 1
        c.tta_batch, c.tta_steps, c.tta_eval_every, c.tta_level = 4, 2, 1, 0.9
        c.pack_batch, c.pack_batches = 4, 2
        c.label_batch, c.label_batches = 2, 2
    else:
        c.train_batch, c.train_tokens, c.train_warmup, c.train_steps = 8, 64, 1, args.train_steps
        c.gen_batch, c.gen_tokens, c.gen_warmup, c.gen_rounds, c.gen_check_tokens = 8, 32, 0, args.gen_rounds, 8
        c.gen_extra_rounds = args.gen_extra_rounds
        c.cls_per_task, c.cls_warmup, c.cls_rounds = 4, 1, args.cls_rounds
        c.route_sizes = [(10, 1), (1000, 1), (1000, 16), (6250, 16)]
        c.route_queries = args.route_queries
        c.mem_tasks, c.mem_rounds = 100, 1
        c.query_tokens = 48
        c.tta_domain, c.tta_train_per_intent, c.tta_dev_per_intent = "banking", 8, 4
        c.tta_batch, c.tta_steps, c.tta_eval_every, c.tta_level = 8, args.tta_steps, 5, 0.9
        c.pack_batch, c.pack_batches = 8, 8
        c.label_batch, c.label_batches = 16, 6
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run at toy sizes (< 2 min)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the public datasets (../shared/data)")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="precision section: also torch.compile (minutes to compile)")
    ap.add_argument("--tta-steps", type=int, default=60, help="training steps of the time-to-accuracy section")
    ap.add_argument("--gen-rounds", type=int, default=3)
    ap.add_argument("--gen-extra-rounds", type=int, default=7, help="extra rounds of promptbank's variants")
    ap.add_argument("--cls-rounds", type=int, default=3)
    ap.add_argument("--route-queries", type=int, default=100)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, 2 threads make every op wait for a descheduled "
        "thread and steps 5-15x slower and erratic; use the core count on a quiet machine)",
    )
    ap.add_argument(
        "--only",
        default="train,precision,tta,packing,labels,generate,classify,route,memory",
        help="comma-separated sections",
    )
    ap.add_argument(
        "--no-pack",
        action="store_true",
        help="promptbank's training and ranking forwards padded, never packed, and label continuations on copies "
        "of the cache (inject.PACKING off; for an A/B of packing)",
    )
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default results/serving[_quick].json)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-tasks", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--memory-new-tokens", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        import torch

        torch.set_num_threads(args.threads)
        memory_child(args.memory_child, args.memory_tasks, args.memory_new_tokens)
        return

    import faiss
    import numpy as np
    import peft
    import torch
    import transformers

    from promptbank import PromptBank

    torch.set_num_threads(args.threads)
    if args.no_pack:
        from promptbank import inject

        inject.PACKING = False
    cfg = _config(args)
    cfg.no_pack = args.no_pack
    cfg.threads = args.threads
    cfg.compile = args.compile
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    t_start = time.perf_counter()
    result: dict = {
        "config": {k: v for k, v in vars(cfg).items()} | {"data": str(args.data), "sections": sections},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
            "platform": platform.platform(),
        },
    }
    torch.manual_seed(0)
    bank = PromptBank.from_pretrained()
    model, tok = bank.backbone.model, bank.backbone.tokenizer
    result["backbone"] = {"name": bank.backbone.name, "params": sum(p.numel() for p in model.parameters())}

    if "train" in sections:
        result["train"] = bench_train(bank, cfg)
        _log(f"train done: {result['train']['ratios']}")
    if "precision" in sections:
        result["precision"] = bench_precision(bank, cfg)
        _log(f"precision done: {result['precision']['ratios']}")
    if "tta" in sections:
        cfg.data = args.data
        result["tta"] = bench_time_to_accuracy(bank, cfg)
        _log(f"time-to-accuracy done: {result['tta'].get('ratios')} {result['tta']['reached']}")
    if "packing" in sections:
        cfg.data = args.data
        result["packing"] = bench_packing(bank, cfg)
    if "labels" in sections:
        cfg.data = args.data
        result["labels"] = bench_labels(bank, cfg)

    need_tasks = {"generate", "classify", "route"} & set(sections)
    if need_tasks:
        tasks = _task_data(args.data, tok, max(cfg.cls_per_task, cfg.route_queries // 8 + 1, 2), cfg.query_tokens)
        from promptbank.config import TrainConfig
        from promptbank.tasks import load_task_data

        for i, t in enumerate(tasks):  # routing keys, label groups and threshold exactly as learn_task files them
            rows = [{"text": x, "label": y} for x, y in zip(t["key_texts"], t["key_labels"])]
            keys, groups, threshold = bank._routing_keys(load_task_data(rows, labels=t["labels"]), None, TrainConfig())
            _insert_task(bank, t["name"], t["labels"], _random_prompt(model, [0], seed=i), keys, groups=groups)
        names = [t["name"] for t in tasks]
        pm = _peft_adapters(bank, names) if {"generate", "classify"} & set(sections) else None
        if "generate" in sections:
            texts = [t["queries"][0][0] for t in tasks]
            result["generate"] = bench_generate(bank, pm, names, texts, cfg)
            _log(f"generate done: {result['generate']['ratios']}")
        if "classify" in sections:
            result["classify"] = bench_classify(bank, pm, tasks, cfg)
            _log(f"classify done: {result['classify']['ratios']}")
        del pm
        gc.collect()
        if "route" in sections:
            result["route"] = bench_route(bank, tasks, cfg)
            _log("route done")
    if "memory" in sections:
        cfg.model_config = model.config
        result["memory"] = bench_memory(cfg)
        _log(f"memory done: {result['memory']['ratios']}")

    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "serving_quick" if cfg.quick else "serving"
    out = args.out or RESULTS / f"{stem}.json"
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    png = out.with_suffix(".png")
    drew = plot(result, png)
    print(f"\n## Serving and training speed ({'QUICK smoke run, toy sizes' if cfg.quick else 'full run'})\n")
    print(table(result))
    print()
    print(details(result))
    print(f"\nWrote {out}" + (f" and {png}" if drew else " (matplotlib not installed: no chart)"))
    print(f"Total {result['total_s'] / 60:.1f} min; load average {result['machine']['loadavg_end']}")


if __name__ == "__main__":
    main()
