"""Fast tests of the pieces behind benchmarks/efficiency.py and benchmarks/transfer.py, on a tiny config-built BERT
with the byte tokenizer and the hashing embedder (seconds, no files, no network)."""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bert

from promptbank import PromptBank
from promptbank.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_common  # noqa: E402
import efficiency  # noqa: E402
import index_growth  # noqa: E402
import input_cut  # noqa: E402
import label_words  # noqa: E402
import lr_study  # noqa: E402
import objective  # noqa: E402
import precision  # noqa: E402
import probe_gate  # noqa: E402
import routing_threshold  # noqa: E402
import transfer  # noqa: E402

LABELS = ["left", "right"]


def _separable(n: int, seed: int) -> list[dict]:
    """Rows whose label is given by the letters used: a-e -> "left", v-z -> "right" (trivially separable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = LABELS[i % 2]
        letters = "abcde" if lab == "left" else "vwxyz"
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 5))]
        rows.append({"text": " ".join(words), "label": lab})
    return rows


@pytest.fixture(scope="module")
def _bert_proto():
    return make_tiny_bert()


@pytest.fixture
def bert(_bert_proto):
    return copy.deepcopy(_bert_proto)


def _tconf(**kw) -> TrainConfig:
    opts = {"max_steps": 30, "batch_size": 8, "eval_every": 5, "patience": 100, "head_lr": 0.1, "progress": False}
    return TrainConfig(**{**opts, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- baselines
def test_full_ft_fits_a_separable_set_and_leaves_the_backbone_alone(bert):
    torch.manual_seed(0)
    before = _state(bert.model)
    enc = efficiency.full_ft_encoder(bert.model)
    assert bench_common.count_params(enc, trainable_only=True) == bench_common.count_params(bert.model)
    train, dev = _separable(48, 0), _separable(16, 1)
    head, res = efficiency.train_encoder_classifier(enc, bert.tokenizer, train, dev, LABELS, _tconf(), lr=1e-3)
    assert res.history[0]["dev_loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: uniform predictions
    assert res.best_dev_loss < 0.2
    assert efficiency.encoder_accuracy(enc, bert.tokenizer, head, dev, LABELS, 64) == 1.0
    after = bert.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bank's frozen backbone is untouched
    assert not all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # the copy did learn
    assert not any(p.requires_grad for p in bert.model.parameters())


def test_lora_trains_only_the_adapters(bert):
    torch.manual_seed(0)
    enc = efficiency.lora_encoder(bert.model, r=4)
    # A (r x 32) and B (32 x r) for query and value in each of the 3 layers
    assert bench_common.count_params(enc, trainable_only=True) == 3 * 2 * (4 * 32 + 32 * 4)
    before = _state(enc)
    train, dev = _separable(48, 0), _separable(16, 1)
    head, res = efficiency.train_encoder_classifier(enc, bert.tokenizer, train, dev, LABELS, _tconf(), lr=1e-2)
    assert res.best_dev_loss < 0.5 * res.history[0]["dev_loss"]
    after = enc.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert efficiency.encoder_accuracy(enc, bert.tokenizer, head, dev, LABELS, 64) >= 0.9


def test_baselines_save_safetensors_only(bert, tmp_path):
    from safetensors.torch import load_file

    from promptbank.encoder import Head

    lora = efficiency.lora_encoder(bert.model, r=4)
    head = Head(32, 2)
    torch.nn.init.normal_(head.linear.weight)
    files = efficiency.save_baseline(lora, head, tmp_path / "lora")
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"}
    assert files["adapter_model.safetensors"] >= 4 * 3 * 2 * (4 * 32 + 32 * 4)  # fp32 adapter weights
    loaded = load_file(str(tmp_path / "lora" / "head.safetensors"))
    assert torch.equal(loaded["weight"], head.tensors()["weight"])
    full = efficiency.save_baseline(efficiency.full_ft_encoder(bert.model), head, tmp_path / "full")
    assert "model.safetensors" in full and not any(f.endswith((".bin", ".pt", ".pkl")) for f in full)
    assert full["model.safetensors"] >= 4 * bench_common.count_params(bert.model)


# ----------------------------------------------------------------------------------------------- parameters, bytes
def test_prompt_params_counts():
    head = 32 * 2 + 2
    assert efficiency.prompt_params("prompt_tuning", 3, 32, 2, tokens=4) == {
        "trainable": 4 * 32 + head,
        "stored": 4 * 32 + head,
    }
    assert efficiency.prompt_params("deep", 3, 32, 2, tokens=4) == {
        "trainable": 3 * 4 * 32 + head,
        "stored": 3 * 4 * 32 + head,
    }
    mlp = efficiency.prompt_params("ptuning_mlp", 3, 32, 2, tokens=4)
    # input embedding (4 x 32) + MLP 32 -> 32 -> 32 with biases; folded into one (4, 32) prompt when stored
    assert mlp == {"trainable": 4 * 32 + 2 * (32 * 32 + 32) + head, "stored": 4 * 32 + head}
    lstm = efficiency.prompt_params("ptuning_lstm", 3, 32, 2, tokens=4)
    assert lstm["trainable"] > mlp["trainable"] and lstm["stored"] == mlp["stored"]


def test_count_params_counts_shared_tensors_once():
    lin = torch.nn.Linear(3, 2)
    both = torch.nn.ModuleDict({"a": lin, "b": lin})
    assert bench_common.count_params(both) == 8
    lin.bias.requires_grad_(False)
    assert bench_common.count_params(both, trainable_only=True) == 6


def test_bank_task_bytes_with_and_without_train_state(bert, hashing_embedder):
    bank = PromptBank(bert, hashing_embedder)
    bank.learn_task("t", _separable(16, 0), method="ptuning_mlp", num_virtual_tokens=4, max_steps=2, progress=False)
    sizes = efficiency.bank_task_bytes(bank, "t")
    with_ts, without = sizes["with_train_state"], sizes["without_train_state"]
    assert "train_state.safetensors" in with_ts and "train_state.safetensors" not in without
    assert {k: v for k, v in with_ts.items() if k != "train_state.safetensors"} == without
    assert set(without) == {"prompt.safetensors", "keys.safetensors", "head.safetensors"}
    assert with_ts["train_state.safetensors"] > without["prompt.safetensors"]  # the MLP encoder outweighs its prompt


# ----------------------------------------------------------------------------------------------- curves, splits
def test_steps_to_fraction_on_known_curves():
    loss = [(0, 1.0), (10, 0.5), (20, 0.2), (30, 0.1), (40, 0.12)]
    # drop 1.0 -> 0.1 (the best); 95 % of it is reached at loss <= 0.145, first at step 30
    assert bench_common.steps_to_fraction(loss, 0.95) == 30
    assert bench_common.steps_to_fraction(loss, 0.5) == 10  # exactly half-way counts
    acc = [(0, 0.5), (5, 0.7), (10, 0.88), (15, 0.9)]
    assert bench_common.steps_to_fraction(acc, 0.95, lower_is_better=False) == 10  # 0.5 + 0.95 * 0.4 = 0.88
    assert bench_common.steps_to_fraction([(0, 0.7), (5, 0.8), (10, 0.9)], 0.95) is None  # never improves
    assert bench_common.steps_to_fraction([], 0.95) is None
    assert bench_common.first_step_at(loss, 0.15) == 30 and bench_common.first_step_at(loss, 0.05) is None
    assert bench_common.first_step_at(acc, 0.7, lower_is_better=False) == 5


def test_dev_loss_curve_reads_the_history():
    hist = [{"step": 0, "dev_loss": 0.69}, {"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "dev_loss": 0.5}]
    assert transfer.dev_loss_curve(hist) == [(0, 0.69), (2, 0.5)]


def test_splits_are_deterministic_and_disjoint():
    rows = [{"text": f"row {i}", "label": LABELS[i % 2]} for i in range(100)]
    train, dev = bench_common.sample_disjoint(rows, [60, 20], seed=3)
    assert (train, dev) == tuple(bench_common.sample_disjoint(rows, [60, 20], seed=3))
    assert len(train) == 60 and len(dev) == 20
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    assert bench_common.sample_disjoint(rows, [60, 20], seed=4)[0] != train
    with pytest.raises(ValueError, match="pool of 100"):
        bench_common.sample_disjoint(rows, [90, 20], seed=0)
    tr, te = bench_common.fixed_split(rows, 0.2)
    assert (tr, te) == bench_common.fixed_split(rows, 0.2) and len(te) == 20 and len(tr) == 80
    assert sorted(r["text"] for r in tr + te) == sorted(r["text"] for r in rows)
    assert bench_common.subsample(rows, 10, 0) == bench_common.subsample(rows, 10, 0)
    assert bench_common.subsample(rows, None) == rows and bench_common.subsample(rows, 500) == rows


def _mr_folder(tmp_path, n: int = 50) -> None:
    """An MR-style dataset (``all.jsonl`` only, two labels) of ``n`` rows under ``tmp_path / "mr"``."""
    folder = tmp_path / "mr"
    folder.mkdir()
    (folder / "labels.json").write_text('{"labels": ["negative", "positive"]}')
    rows = [{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(n)]
    (folder / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_task_splits_mr_style_data(tmp_path):
    _mr_folder(tmp_path)
    a = transfer.load_task(tmp_path, "mr", 20, 5, 8, seed=0)
    b = transfer.load_task(tmp_path, "mr", 20, 5, 8, seed=1)
    assert a["test"] == b["test"]  # the fixed test split does not move with the seed
    for t in (a, b):
        train, dev, test = ({r["text"] for r in t[k]} for k in ("train", "dev", "test"))
        assert len(train) == 20 and len(dev) == 5 and len(test) == 8
        assert not (train & dev) and not (train & test) and not (dev & test)
    assert a["train"] != b["train"]


def test_load_task_caps_a_source_at_its_pool(tmp_path):
    _mr_folder(tmp_path)
    capped = transfer.load_task(tmp_path, "mr", 1000, 5, 8, seed=0, cap=True)
    assert len(capped["train"]) == 40 - 5 and len(capped["dev"]) == 5  # pool: 80 % of 50 rows
    with pytest.raises(ValueError, match="pool of 40"):
        transfer.load_task(tmp_path, "mr", 1000, 5, 8, seed=0)


def test_probe_gate_summary_counts_the_gate_against_held_out_accuracy():
    def row(size, keep, with_probe, head):
        return {
            "per_class": size,
            "gate_keeps_probe": keep,
            "heldout_with_probe": with_probe,
            "heldout_head_only": head,
            "heldout_gated": with_probe if keep else head,
        }

    rows = [row(16, True, 0.8, 0.7), row(16, False, 0.8, 0.7), row(16, False, 0.5, 0.6), row(64, True, 0.5, 0.5)]
    s = probe_gate.summarize(rows)
    assert s["16"]["runs"] == 3 and s["64"]["runs"] == 1
    assert s["16"]["gate_keeps_probe"] == 1 and s["16"]["gate_right"] == 2  # the middle run dropped a helpful probe
    assert (s["16"]["probe_helps_heldout"], s["16"]["probe_hurts_heldout"]) == (2, 1)
    assert math.isclose(s["16"]["heldout_gated"], 100 * (0.8 + 0.7 + 0.6) / 3)
    assert s["64"]["gate_right"] == 1 and s["64"]["probe_helps_heldout"] == 0
    assert "heldout_probe_only" not in s["16"]  # rows from before the probe-alone column
    for r, alone in zip(rows, (0.6, 0.7, 0.2, 0.4)):
        r["heldout_probe_only"] = alone
    assert math.isclose(probe_gate.summarize(rows)["16"]["heldout_probe_only"], 100 * 1.5 / 3)


def test_steps_to_cold_text_accuracy_is_a_common_bar():
    runs = {
        "cold_text": {"dev_accuracy": 0.8, "dev_accuracy_curve": [(0, 0.5), (5, 0.7), (10, 0.8)]},
        "warm": {"dev_accuracy": 0.9, "dev_accuracy_curve": [(0, 0.78), (5, 0.9), (10, 0.85)]},
        "cold_vocab": {"dev_accuracy": 0.6, "dev_accuracy_curve": [(0, 0.5), (5, 0.6), (10, 0.6)]},
    }
    transfer._add_cold_text_accuracy_steps(runs)  # bar: 0.95 * 0.8 = 0.76
    assert runs["warm"]["steps_to_cold_text_acc"] == 0 and runs["cold_text"]["steps_to_cold_text_acc"] == 10
    assert runs["cold_vocab"]["steps_to_cold_text_acc"] == 10 and not runs["cold_vocab"]["reached_cold_text_acc"]


# ----------------------------------------------------------------------------------------------- warm start
_OPTS = {"max_steps": 4, "batch_size": 4, "eval_every": 2, "patience": 10, "max_input_tokens": 32, "progress": False}
_WORDS = [("great", "pos"), ("awful", "neg"), ("superb", "pos"), ("bad", "neg"), ("fine", "pos"), ("dull", "neg")]
SOURCE = [{"text": f"the movie was {w} in scene {i}", "label": lab} for i, (w, lab) in enumerate(_WORDS * 2)]
NEAR = [{"text": f"the movie was {w} indeed in scene {i}", "label": lab} for i, (w, lab) in enumerate(_WORDS * 2)]
FAR = [{"text": f"{w} quarterly revenue", "label": lab} for w, lab in [("rising", "up"), ("falling", "down")] * 6]


def _task(rows):
    labels = sorted({r["label"] for r in rows})
    return {"labels": labels, "train": rows[:8], "dev": rows[8:], "test": rows}


def test_warm_start_without_candidates_is_the_cold_text_run(bert, hashing_embedder):
    """transfer.py reports a warm-start run that found no stored prompt above the threshold as the cold text run."""
    a = PromptBank(bert, hashing_embedder)
    b = PromptBank(bert, hashing_embedder)
    ra = a.learn_task("t", NEAR, method="deep", num_virtual_tokens=3, warm_start=True, **_OPTS)
    rb = b.learn_task("t", NEAR, method="deep", num_virtual_tokens=3, warm_start=False, init="text", **_OPTS)
    assert ra.warm_start_from == []
    pa, pb = a.soft_prompt("t"), b.soft_prompt("t")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [h.get("dev_loss") for h in ra.history] == [h.get("dev_loss") for h in rb.history]


def test_run_target_records_whether_warm_start_fired(bert, hashing_embedder):
    bank = PromptBank(bert, hashing_embedder)
    opts = {**_OPTS, "seed": 0}
    transfer.learn(bank, "src", _task(SOURCE), opts, warm_start=False, init="text")

    near = transfer.run_target(bank, "near", _task(NEAR), opts, low_threshold=0.0)
    assert near["warm_start_fired_at_default"] and near["similarity_to_sources"]["src"] >= 0.5
    src = near["runs"]["warm"]["warm_start_from"]
    assert [s["task"] for s in src] == ["src"]
    assert src[0]["similarity"] == pytest.approx(near["similarity_to_sources"]["src"], abs=1e-5)
    assert set(near["runs"]) == {"warm", "cold_text", "cold_vocab"}
    assert sorted(bank.tasks) == ["near-text", "src"]  # the cold text run stays as a source, the rest is removed

    far = transfer.run_target(bank, "far", _task(FAR), opts, low_threshold=0.0)
    assert not far["warm_start_fired_at_default"]
    assert max(far["similarity_to_sources"].values()) < 0.25
    assert far["runs"]["cold_text"]["same_run_as"] == "warm"
    low = far["runs"]["warm_lowered"]["warm_start_from"]
    # threshold 0: every stored prompt of the same shape, and none of this target's own earlier runs
    assert {s["task"] for s in low} == {"src", "near-text"}
    assert sorted(bank.tasks) == ["far-warm", "near-text", "src"]
    assert sum(s["weight"] for s in low) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= r["test_accuracy"] <= 1 for r in far["runs"].values())
    cold = far["runs"]["cold_text"]
    assert cold["reached_cold_text_level"] and cold["steps_to_cold_text_level"] == cold["steps_to_95"]


def _run(steps, acc):
    """One condition's measurements as transfer.learn + run_target record them (what summarize reads)."""
    return {
        "steps_to_95": steps,
        "improved": True,
        "steps_to_cold_text_level": steps,
        "reached_cold_text_level": True,
        "test_accuracy": acc,
        "dev_accuracy": acc,
    }


def test_summarize_counts_step_savings_and_harm():
    def seed(warm, cold):
        return {
            "chains": {
                "c": {
                    "targets": {
                        "t": {
                            "similarity_to_sources": {"s": 0.8},
                            "warm_start_fired_at_default": True,
                            "runs": {"warm": _run(*warm), "cold_text": _run(*cold), "cold_vocab": _run(40, 0.7)},
                        }
                    }
                }
            }
        }

    s = transfer.summarize([seed((10, 0.80), (20, 0.80)), seed((20, 0.70), (20, 0.75)), seed((12, 0.80), (20, 0.805))])
    w = s["t"]["conditions"]["warm"]
    assert w["fewer_steps_to_95_vs_cold_text_pct"] == pytest.approx(100 * (1 - 14 / 20))
    assert w["hurts_seeds"] == 1  # only seed 1 lost more than 1 point
    assert w["seeds"] == 3 and s["t"]["conditions"]["cold_vocab"]["steps_to_95"] == 40
    assert s["t"]["conditions"]["cold_vocab"]["fewer_steps_to_95_vs_cold_text_pct"] == pytest.approx(-100)


def test_summarize_uses_only_the_seeds_that_have_a_condition():
    def seed(fired):
        runs = {"warm": _run(10, 0.8), "cold_text": _run(20, 0.8), "cold_vocab": _run(20, 0.7)}
        if not fired:  # the default warm start found nothing: its run is the cold text run; a lowered run exists
            runs = {
                "warm": _run(20, 0.8),
                "cold_text": _run(20, 0.8),
                "warm_lowered": _run(5, 0.9),
                "cold_vocab": _run(20, 0.7),
            }
        t = {"similarity_to_sources": {"s": 0.5}, "warm_start_fired_at_default": fired, "runs": runs}
        return {"chains": {"c": {"targets": {"t": t}}}}

    c = transfer.summarize([seed(True), seed(False)])["t"]["conditions"]
    assert c["warm"]["seeds"] == 2 and c["warm"]["steps_to_95"] == 15
    assert c["warm_lowered"]["seeds"] == 1 and c["warm_lowered"]["fewer_steps_to_95_vs_cold_text_pct"] == 75
    assert c["warm_lowered"]["hurts_seeds"] == 0 and c["cold_vocab"]["hurts_seeds"] == 2


@pytest.mark.parametrize("system", ["lora", "prompt_tuning"])
def test_run_system_is_reproducible_and_reports_everything(bert, hashing_embedder, system):
    data = {"labels": LABELS, "train": _separable(24, 0), "dev": _separable(8, 1), "test": _separable(8, 2)}
    opts = {"max_steps": 4, "batch_size": 4, "eval_every": 2, "max_input_tokens": 32, "seed": 0, "progress": False}
    a = efficiency.run_system(system, bert, hashing_embedder, data, opts, lr=1e-2)
    torch.manual_seed(123)  # the global RNG state must not matter
    b = efficiency.run_system(system, bert, hashing_embedder, data, opts, lr=1e-2)
    assert a["dev_loss"] == b["dev_loss"] and a["test_accuracy"] == b["test_accuracy"]
    assert a["history"] == b["history"] and a["steps"] == 4
    assert 0 < a["trainable_params"] < bench_common.count_params(bert.model)
    assert a["bytes"] > 0 and a["bytes_with_train_state"] >= a["bytes"] and a["ms_per_step"] > 0


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_growth_measures_both_paths_on_the_same_router(kind):
    r = index_growth.measure(kind, 320, repeats=2)
    assert r["kind"] == kind and r["keys"] == 320 and r["tasks"] == 20
    assert len(r["seconds"]["extend"]) == len(r["seconds"]["rebuild"]) == 2
    assert r["ratio_extend_vs_rebuild"] == r["median_s"]["extend"] / r["median_s"]["rebuild"]
    assert r["task_recall_at_1_extended"] == 1.0  # a small index: the extended one finds every query's task


def test_transfer_merge_combines_seeds_and_refuses_mismatches():
    """``transfer.py --merge``: runs of the same settings with different seeds give the summary of all the seeds
    over the chains every run has; other settings or a repeated seed are refused."""
    saved = json.loads((bench_common.RESULTS / "transfer_sources_dev128.json").read_text())
    first, second = copy.deepcopy(saved), copy.deepcopy(saved)
    first["seeds"], second["seeds"] = saved["seeds"][:1], copy.deepcopy(saved["seeds"][1:])
    for s in second["seeds"]:
        del s["chains"]["topics"]  # the second run left a chain out
    merged = transfer.merge_results([first, second], ["a.json", "b.json"])
    assert [s["seed"] for s in merged["seeds"]] == [0, 1]
    assert merged["config"]["chains"] == "sentiment,stars" and merged["config"]["merged_from"] == ["a.json", "b.json"]
    full = transfer.summarize(saved["seeds"])
    assert set(merged["summary"]) == {"mr", "cr", "yelp"}
    assert all(merged["summary"][t] == full[t] for t in merged["summary"])
    with pytest.raises(ValueError, match="more than one run"):
        transfer.merge_results([saved, saved], ["a.json", "b.json"])
    other = copy.deepcopy(first)
    other["config"]["dev"] = 32
    with pytest.raises(ValueError, match="other settings.*dev"):
        transfer.merge_results([first, other], ["a.json", "b.json"])


def test_objective_split_is_disjoint_per_label_and_seeded():
    rows = [{"text": f"{lab} row {i} " + "x" * 700, "label": lab} for lab in "abc" for i in range(40)]
    train, held = objective.split(rows, ["a", "b", "c"], 8, seed=3)
    assert [sum(r["label"] == lab for r in train) for lab in "abc"] == [8, 8, 8]
    assert [sum(r["label"] == lab for r in held) for lab in "abc"] == [objective.HELD_OUT_PER_CLASS] * 3
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert all(len(r["text"]) == objective.MAX_CHARS for r in train + held)
    assert objective.split(rows, ["a", "b", "c"], 8, seed=3) == (train, held)
    assert objective.split(rows, ["a", "b", "c"], 8, seed=4) != (train, held)


def test_objective_summary_compares_objectives_on_common_seeds():
    def run(ds, obj, seed, acc):
        return {
            "dataset": ds,
            "method": "deep",
            "objective": obj,
            "seed": seed,
            "labels": 6,
            "held_out_accuracy": acc,
            "train_seconds": 1.0,
        }

    runs = [
        run("t", "lm", 0, 0.2),
        run("t", "labels", 0, 0.4),
        run("t", "lm", 1, 0.4),
        run("t", "labels", 1, 0.6),
        run("t", "labels", 2, 0.9),  # no "lm" run for seed 2: left out of the comparison
        run("u", "lm", 0, 0.5),
        run("u", "labels", 0, 0.4),
    ]
    rows = objective.summary(runs)
    t = next(r for r in rows if r["dataset"] == "t")
    assert t["seeds"] == [0, 1] and t["lm"] == pytest.approx(30.0) and t["labels"] == pytest.approx(50.0)
    text = objective.table(rows)
    assert "| t | 6 | deep | 0,1 | 30.0 | 50.0 | +20.0 |" in text
    assert "deep, labels - lm: mean +5.0 over 2 datasets (better on 1, worse on 1)" in text


def test_lr_study_summary_compares_learning_rates_on_common_seeds():
    def run(ds, lr, seed, acc, loss):
        return {
            "dataset": ds,
            "method": "deep",
            "lr": lr,
            "seed": seed,
            "labels": 2,
            "held_out_accuracy": acc,
            "dev_loss": loss,
            "best_step": 10 * (seed + 1),
        }

    runs = [
        run("t", 0.1, 0, 0.5, 1.0),
        run("t", 0.01, 0, 0.7, 0.6),
        run("t", 0.1, 1, 0.7, 0.8),
        run("t", 0.01, 1, 0.9, 0.4),
        run("t", 0.01, 2, 0.0, 9.0),  # no lr 0.1 run for seed 2: left out of the comparison
        run("u", 0.1, 0, 0.6, 0.5),
        run("u", 0.01, 0, 0.4, 0.7),
    ]
    rows = lr_study.summary(runs)
    t = next(r for r in rows if r["dataset"] == "t")
    assert t["seeds"] == [0, 1]
    assert t["lrs"]["0.01"] == {"accuracy": pytest.approx(80.0), "dev_loss": pytest.approx(0.5), "best_step": 15}
    assert t["lrs"]["0.1"]["accuracy"] == pytest.approx(60.0)
    text = lr_study.table(rows)
    assert "| t | 2 | 0,1 | 80.0 (0.50, 15) | 60.0 (0.90, 15) |" in text
    assert "| mean of 2 datasets | | | 60.0 | 60.0 |" in text
    assert "best lr per dataset (ties: the first): t 0.01, u 0.1" in text


def test_lr_study_compares_methods_on_paired_runs_only():
    """--compare pairs two methods by (dataset, lr, seed): a run without its partner is left out; per-seed
    differences are second minus first (methods sorted by name), counted better / same / worse."""

    def run(method, dataset, seed, acc):
        return {"dataset": dataset, "method": method, "lr": 0.03, "seed": seed, "held_out_accuracy": acc}

    runs = [
        run("deep", "a", 0, 0.8),
        run("prompt_tuning", "a", 0, 0.7),
        run("deep", "a", 1, 0.5),
        run("prompt_tuning", "a", 1, 0.5),
        run("deep", "b", 0, 0.6),
        run("prompt_tuning", "b", 0, 0.9),
        run("deep", "b", 1, 0.1),  # no prompt-tuning partner: not compared
    ]
    text = lr_study.compare_methods(runs)
    assert "deep vs prompt_tuning at lr 0.03" in text
    assert "| a | 0,1 | 65.0 | 60.0 | -10.0, +0.0 |" in text
    assert "| b | 0 | 60.0 | 90.0 | +30.0 |" in text
    assert "prompt_tuning better in 1 of 3 paired runs, the same in 1, worse in 1; mean difference +6.7 points" in text


def test_study_runs_learn_score_and_leave_the_bank_empty(tiny_bank, monkeypatch):
    """objective.run_one, lr_study.run_one and label_words.run_one on the tiny causal bank: one record each, the
    task removed after; the label-words study passes its words to learn_task only in the "words" setting."""
    rows = [{"text": f"{lab} sample {i}", "label": lab} for lab in ("yes", "no") for i in range(30)]
    pool = (rows, ["yes", "no"])
    a = objective.run_one(tiny_bank, pool, "toy", "prompt_tuning", "lm", 0, 4, 3)
    b = lr_study.run_one(tiny_bank, pool, "toy", "deep", 0.05, 0, 4, 3)
    assert a["objective"] == "lm" and b["lr"] == 0.05 and b["method"] == "deep"
    words = []
    real = tiny_bank.learn_task
    monkeypatch.setattr(tiny_bank, "learn_task", lambda *a, **kw: words.append(kw["label_words"]) or real(*a, **kw))
    monkeypatch.setitem(label_words.LABEL_WORDS, "toy", {"yes": "positive", "no": "negative"})
    c = label_words.run_one(tiny_bank, pool, "toy", "deep", "words", 0, 4, 3)
    d = label_words.run_one(tiny_bank, pool, "toy", "deep", "labels", 0, 4, 3)
    assert words == [{"yes": "positive", "no": "negative"}, None]
    assert c["words"] == "words" and d["words"] == "labels"
    for r in (a, b, c, d):
        assert r["labels"] == 2 and r["steps"] == 3 and 0.0 <= r["held_out_accuracy"] <= 1.0
        assert r["dev_loss"] is not None and math.isfinite(r["dev_loss"])
    assert list(tiny_bank.tasks) == []
    with pytest.raises(SystemExit, match="no label words for 'other'"):
        label_words.run_one(tiny_bank, pool, "other", "deep", "words", 0, 4, 3)


def test_label_words_summary_pairs_the_two_settings_by_seed():
    def run(ds, setting, seed, acc):
        return {"dataset": ds, "method": "deep", "words": setting, "seed": seed, "labels": 6, "held_out_accuracy": acc}

    runs = [
        run("trec", "labels", 0, 0.5),
        run("trec", "words", 0, 0.7),
        run("trec", "labels", 1, 0.6),
        run("trec", "words", 1, 0.5),
        run("trec", "words", 2, 0.9),  # no "labels" run for seed 2: left out
        run("yelp", "words", 0, 0.4),  # one setting only: no row
    ]
    rows = label_words.summary(runs)
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[0]["labels"] == pytest.approx(55.0) and rows[0]["words"] == pytest.approx(60.0)
    assert rows[0]["per_seed_difference"] == pytest.approx([20.0, -10.0])
    text = label_words.table(rows)
    assert "| trec | deep | 6 | 0,1 | 55.0 | 60.0 | +5.0 (+20.0, -10.0) |" in text
    assert "over 2 paired runs: mean difference +5.0 points, words better on 1, worse on 1" in text


def test_routing_threshold_sweep_trades_kept_queries_for_rejected_out_of_scope():
    """routing_threshold.sweep on three well-separated Gaussian tasks (2 labels each) and far-away out-of-scope
    points: top-1 does not depend on the quantile; a higher quantile rejects more in-task queries and more
    out-of-scope ones; hit@1 never exceeds top-1."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, centres = 16, np.eye(16)[:6] * 6.0
    keys, ktask, kgroup, queries, qtask = [], [], [], [], []
    for g, c in enumerate(centres):
        keys.append(c + rng.normal(size=(40, d)))
        ktask += [f"t{g // 2}"] * 40
        kgroup += [g % 2] * 40
        queries.append(c + rng.normal(size=(60, d)))
        qtask += [f"t{g // 2}"] * 60
    oos = rng.normal(size=(200, d)) + np.eye(16)[10] * 6.0
    rows = routing_threshold.sweep(np.concatenate(keys), ktask, kgroup, np.concatenate(queries), qtask, oos)
    assert list(rows) == [f"{q:g}" for q in routing_threshold.QUANTILES]
    high, low = rows["0.1"], rows["0.005"]
    assert all(r["top1"] == high["top1"] > 0.95 for r in rows.values())
    assert all(r["hit@1"] <= r["top1"] for r in rows.values())
    assert high["in_task_rejected"] > low["in_task_rejected"] and high["hit@1"] < low["hit@1"]
    assert high["oos_rejected"] >= low["oos_rejected"] and high["oos_rejected"] > 0.9
    assert 0.03 < high["in_task_rejected"] < 0.2  # about the quantile, on queries like the keys


def test_precision_summary_pairs_fp32_and_bf16_on_common_seeds():
    def run(ds, prec, seed, acc, seconds, steps=10):
        return {
            "dataset": ds,
            "method": "deep",
            "precision": prec,
            "seed": seed,
            "labels": 4,
            "held_out_accuracy": acc,
            "best_step": 10,
            "steps": steps,
            "train_seconds": seconds,
        }

    runs = [
        run("t", "fp32", 0, 0.5, 10.0),
        run("t", "bf16", 0, 0.6, 6.0),
        run("t", "fp32", 1, 0.7, 10.0, steps=20),  # per step: 0.5 s
        run("t", "bf16", 1, 0.7, 4.0),  # per step: 0.4 s -> 0.8x
        run("t", "bf16", 2, 0.0, 1.0),  # no fp32 run for seed 2: left out
    ]
    (row,) = precision.summary(runs)
    assert row["seeds"] == [0, 1]
    assert row["fp32"] == pytest.approx(60.0) and row["bf16"] == pytest.approx(65.0)
    assert row["step_time_ratio"] == pytest.approx(0.7)  # the median of 0.6 and 0.8
    text = precision.table([row])
    assert "| t | 4 | deep | 0,1 | 60.0 | 65.0 | +5.0 | 0.70 |" in text
    assert "mean +5.0 points over 1 (dataset, method) rows (better on 1, worse on 0)" in text


def test_bf16_benchmark_runs_refused_where_bf16_would_fall_back_to_fp32(monkeypatch):
    from promptbank import train

    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="would measure fp32"):
        bench_common.require_native_bf16("bf16")
    bench_common.require_native_bf16("fp32")  # fp32 runs anywhere
    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: True)
    bench_common.require_native_bf16("bf16")


# ----------------------------------------------------------------------------------------------- input_cut
def test_input_cut_split_is_per_label_disjoint_and_seeded():
    rows = [{"text": f"{lab} row {i}", "label": lab} for lab in ("b", "a") for i in range(10)]
    train, test = input_cut.split(rows, 3, 4, seed=1)
    assert [r["label"] for r in train] == ["a"] * 3 + ["b"] * 3 and [r["label"] for r in test] == ["a"] * 4 + ["b"] * 4
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert input_cut.split(rows, 3, 4, seed=1) == (train, test) != input_cut.split(rows, 3, 4, seed=2)
    with pytest.raises(SystemExit, match="a label has 10 rows"):
        input_cut.split(rows, 10, 4, seed=1)


def test_input_cut_whole_arm_feeds_the_uncut_input(tiny_bank, monkeypatch):
    """The study's "whole" arm is inference before the cut: the task's cap lifted for that call only."""
    from promptbank import causal
    from promptbank.tasks import cut_to_tokens

    tiny_bank.learn_task("t", _separable(12, 0), num_virtual_tokens=2, max_input_tokens=4, max_steps=2,
                         progress=False, warm_start=False)  # fmt: skip
    long_text = "abc " * 30
    fed, real = [], causal.rank_labels
    monkeypatch.setattr(
        causal, "rank_labels", lambda m, t, kvs, inputs, *a: fed.append(inputs) or real(m, t, kvs, inputs, *a)
    )
    input_cut._predict_uncut(tiny_bank, [long_text])
    tiny_bank.predict([long_text], task="t")
    tok, template = tiny_bank.backbone.tokenizer, tiny_bank.tasks["t"].template
    assert fed[0] == [causal.encode_input(tok, long_text, template)]
    assert fed[1] == [causal.encode_input(tok, cut_to_tokens(tok, long_text, 4), template)] != fed[0]


def test_truncation_side_study_keeps_only_rows_over_the_cap():
    """benchmarks/truncation_side.py trains on answer rows whose input is over the cap (where the side matters):
    passages, then the question, built by the RAG chain's own formatter."""
    import truncation_side
    from conftest import make_tiny_tokenizer

    rows = [
        {"question": "Who?", "context": "short passage.", "answers": ["Ann"]},
        {"question": "Where?", "context": "a long passage " * 20, "answers": ["Rome"]},
    ]
    tok = make_tiny_tokenizer()
    kept = truncation_side.long_rows(rows, tok, 64, all_lengths=False)
    assert [r["target"] for r in kept] == ["Rome"]
    assert kept[0]["input"].index("a long passage") < kept[0]["input"].index("Where?")  # the question comes last
    assert len(truncation_side.long_rows(rows, tok, 64, all_lengths=True)) == 2
    table = truncation_side.table(
        [
            {
                "side": "left",
                "seed": 0,
                "n_train": 64,
                "n_test": 40,
                "exact_match": 25.0,
                "f1": 40.5,
                "test_loss": 1.5,
                "best_step": 30,
                "train_seconds": 600,
            }
        ]
    )
    assert "| left | 0 | 64 | 40 | 25.0 | 40.5 | 1.500 | 30 | 10.0 |" in table
