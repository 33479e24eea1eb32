"""benchmarks/forgetting.py end to end on a tiny config-built BERT, a hashing embedder and tiny fake CL-4 / long
stream folders (the CI slice of the benchmark), plus its metrics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forgetting  # noqa: E402

WORDS = {
    "ag": ["world", "sports", "business", "science"],
    "amazon": ["1", "2", "3", "4", "5"],
    "dbpedia": ["company", "artist", "plant"],
    "yahoo": ["health", "music"],
}


def _write(folder: Path, labels: list[str], files: dict[str, int], prefix: str) -> None:
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps({"labels": labels}))
    for fname, n in files.items():
        rows = [{"text": f"{prefix} {lab} example {k}", "label": lab} for lab in labels for k in range(n)]
        (folder / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def cl4_dir(tmp_path):
    for short, labels in WORDS.items():
        folder = forgetting.DATASETS[short][0]
        _write(tmp_path / folder, labels, {"train.jsonl": 6, "test.jsonl": 4}, short)
    return tmp_path


def _args(data: Path, out: Path, **kw) -> argparse.Namespace:
    base = dict(
        data=data, stream="cl4", quick=False, seeds=1, orders="O1,O3", steps=2, train_per_class=3, test_per_class=2,
        systems=",".join(forgetting.SYSTEMS), ft_orders="first", out=out, embedder="hashing", routing="lda",
        routing_only=False, threads=None, first_seed=0, precision="fp32",
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_metrics_on_a_known_matrix():
    R = np.array([[0.8, np.nan, np.nan], [0.6, 0.9, np.nan], [0.5, 0.7, 0.4]])
    m = forgetting.metrics(R, single=[0.8, 0.8, 0.5])
    assert m["ACC"] == pytest.approx((0.5 + 0.7 + 0.4) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    assert m["FWT"] == pytest.approx(((0.9 - 0.8) + (0.4 - 0.5)) / 2)
    assert m["ACC_after_each_task"] == pytest.approx([0.8, 0.75, 1.6 / 3])
    assert "FWT" not in forgetting.metrics(R)


def test_load_stream_samples_per_class_and_is_deterministic(cl4_dir):
    a = forgetting.load_stream(cl4_dir, 3, 2, seed=0)
    assert list(a) == list(forgetting.TASKS)
    assert len(a["amazon"]["train"]) == 15 and len(a["amazon"]["test"]) == 10
    assert {ex.target for ex in a["ag"]["train"].examples} == set(WORDS["ag"])
    b = forgetting.load_stream(cl4_dir, 3, 2, seed=0)
    assert [ex.input for ex in a["yahoo"]["train"].examples] == [ex.input for ex in b["yahoo"]["train"].examples]
    c = forgetting.load_stream(cl4_dir, 3, 2, seed=1)
    assert [ex.input for ex in a["dbpedia"]["train"].examples] != [ex.input for ex in c["dbpedia"]["train"].examples]


def test_long_stream_loader_handles_every_file_layout(tmp_path):
    _write(tmp_path / "mr", ["negative", "positive"], {"all.jsonl": 10}, "mr")  # no split: fixed 80/20
    _write(tmp_path / "yelp_reviews", ["1", "2"], {"train.jsonl": 5, "dev.jsonl": 3}, "yelp")  # dev is the test
    clinc = tmp_path / "clinc150"
    clinc.mkdir()
    domains = {"banking": ["balance", "transfer"], "travel": ["book_flight"]}
    (clinc / "labels.json").write_text(
        json.dumps({"labels": ["balance", "transfer", "book_flight"], "domains": domains})
    )
    for split, n in (("train", 5), ("test", 3)):
        rows = [{"text": f"{split} {it} {k}", "label": it} for v in domains.values() for it in v for k in range(n)]
        (clinc / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = forgetting.load_stream(tmp_path, 100, 100, seed=0, names=["mr", "yelp", "clinc_banking"])
    mr_train = {ex.input for ex in s["mr"]["train"].examples}
    mr_test = {ex.input for ex in s["mr"]["test"].examples}
    assert len(mr_train) == 16 and len(mr_test) == 4 and not mr_train & mr_test
    assert len(s["yelp"]["test"]) == 6 and all("yelp" in ex.input for ex in s["yelp"]["test"].examples)
    assert s["clinc_banking"]["train"].labels == ["balance", "transfer"]
    assert len(s["clinc_banking"]["train"]) == 10 and len(s["clinc_banking"]["test"]) == 6


def test_run_every_system_on_a_tiny_stream(cl4_dir, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("peft")
    from promptbank.embed import HashingEmbedder

    out = tmp_path / "out" / "f.json"
    result = forgetting.run(_args(cl4_dir, out), make_tiny_bert(), HashingEmbedder(64))
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    first, second = result["runs"]
    assert [r["order"] for r in result["runs"]] == ["O1", "O3"]
    for key in ("promptbank", "sequential_shared_prompt", "sequential_full_ft", "sequential_lora"):
        R = np.array(first[key]["R"], dtype=float)
        assert R.shape == (4, 4) and np.isnan(R[np.triu_indices(4, 1)]).all()
        assert ((R[np.tril_indices(4)] >= 0) & (R[np.tril_indices(4)] <= 1)).all()
    assert "sequential_full_ft" not in second and "sequential_lora" not in second  # first order only by default
    pb = first["promptbank"]
    R = np.array(pb["R"], dtype=float)
    for j in range(4):  # the prompts never change: every column is constant below the diagonal
        assert (R[j:, j] == R[j, j]).all()
    assert pb["BWT"] == 0.0 and pb["forgetting"] == 0.0 and pb["FWT"] == 0.0
    C = np.array(pb["routing_confusion"])
    assert C.shape == (4, 5) and C.sum() == sum(len(WORDS[t]) * 2 for t in WORDS)
    assert pb["routing_hit@1"] == pytest.approx(np.trace(C[:, :4]) / C.sum())
    assert pb["routing_hit@1_label_aware"] >= pb["routing_hit@1"]
    assert pb["routing_discriminant"] in ("group", "task")
    # the ablation without the embedding probes: accuracies of its own, in the summary too
    assert 0 <= pb["ACC_head_only"] <= 1 and 0 <= pb["routed_ACC_head_only"] <= 1
    no_probe = result["summary"]["promptbank, prompted head alone (no embedding probe; task given)"]["ACC"]
    assert no_probe[0] == pytest.approx(np.mean([r["promptbank"]["ACC_head_only"] for r in result["runs"]]))
    # the same task's prompt in the other order: trained once per seed, so the same tensors and accuracy
    assert second["promptbank"]["task_digests"] == first["promptbank"]["task_digests"]
    assert second["promptbank"]["R"][-1][second["tasks"].index("ag")] == first["promptbank"]["R"][-1][3]
    # the same four tasks in another order route the same way (groups kept when a trained task is re-filed)
    perm = [second["tasks"].index(t) for t in first["tasks"]]
    assert np.array_equal(np.array(second["promptbank"]["routing_confusion"])[perm][:, [*perm, 4]], C)
    s = result["summary"]
    assert s["sequential full fine-tuning"]["runs"] == 1 and s["sequential shared prompt"]["runs"] == 2
    try:
        import matplotlib  # noqa: F401  (a bench extra, not a test one: no plot without it)
    except ImportError:
        assert not out.with_suffix(".png").exists()
    else:
        assert out.with_suffix(".png").exists()
    forgetting.print_table(result)


def test_resumed_prefixes_and_memoised_routing_equal_fresh_runs(cl4_dir, tmp_path, monkeypatch):
    """O2 run after O1 resumes the sequential baselines from O1's state after their shared prefix (dbpedia ->
    amazon) and reuses O1's routed evaluation of the same four tasks; O2 run alone trains and routes everything
    afresh. Every number must agree (full FT's dropout makes the random state part of what is resumed)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("peft")
    from promptbank.embed import HashingEmbedder

    assert forgetting.shared_prefixes(list(forgetting.ORDERS.values())) == {("dbpedia",), ("dbpedia", "amazon")}
    opts = dict(systems="promptbank,shared,full_ft,lora", ft_orders="all")
    calls, real = [], forgetting._routed_eval
    monkeypatch.setattr(forgetting, "_routed_eval", lambda *a: calls.append(a[2]) or real(*a))
    stages: list[str] = []  # one entry per trained stage of a sequential baseline: "shared" or the encoder kind
    import efficiency  # forgetting.py imports it where it trains the encoder baselines

    train_shared, train_encoder = forgetting._train_shared, efficiency.train_encoder_classifier
    monkeypatch.setattr(forgetting, "_train_shared", lambda *a, **k: stages.append("shared") or train_shared(*a, **k))
    monkeypatch.setattr(
        efficiency,
        "train_encoder_classifier",
        lambda *a, **k: stages.append(k["desc"]) or train_encoder(*a, **k),
    )
    both = forgetting.run(
        _args(cl4_dir, tmp_path / "a.json", orders="O1,O2", **opts), make_tiny_bert(), HashingEmbedder(64)
    )
    # O1 trains its four stages, O2 only the two after the prefix it shares with O1 (not wall-clock: deterministic)
    assert sorted(stages) == sorted(["shared", "full_ft", "lora"] * 6), stages
    alone = forgetting.run(
        _args(cl4_dir, tmp_path / "b.json", orders="O2", **opts), make_tiny_bert(), HashingEmbedder(64)
    )
    assert len(calls) == 2  # routed once per run of the same seed's tasks: O1 (O2 reuses it), then O2 alone
    resumed, fresh = both["runs"][1], alone["runs"][0]
    for key in ("sequential_shared_prompt", "sequential_full_ft", "sequential_lora"):
        assert np.array_equal(np.array(resumed[key]["R"], float), np.array(fresh[key]["R"], float), equal_nan=True), key
    pb, pb_fresh = resumed["promptbank"], fresh["promptbank"]
    assert np.array_equal(np.array(pb["R"], float), np.array(pb_fresh["R"], float), equal_nan=True)
    for k in (
        "routing_hit@1",
        "routing_top1_ignoring_threshold",
        "routed_ACC",
        "routing_confusion",
        "ACC_head_only",
    ):
        assert pb[k] == pb_fresh[k], k


def test_runs_of_separate_processes_merge_into_one_result(cl4_dir, tmp_path):
    """Seeds run in parallel processes (``--first-seed``) and combined with ``--merge``."""
    pytest.importorskip("sklearn")
    from promptbank.embed import HashingEmbedder

    backbone, emb = make_tiny_bert(), HashingEmbedder(64)
    a, b = tmp_path / "s0.json", tmp_path / "s1.json"
    ra = forgetting.run(_args(cl4_dir, a, orders="O1", systems="promptbank,logistic"), backbone, emb)
    rb = forgetting.run(_args(cl4_dir, b, orders="O1", systems="promptbank,logistic", first_seed=1), backbone, emb)
    assert [r["seed"] for r in rb["runs"]] == [1]
    merged = forgetting.main(["--data", str(cl4_dir), "--merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert [r["seed"] for r in merged["runs"]] == [0, 1] and merged["config"]["seeds"] == 2
    accs = [r["promptbank"]["ACC"] for r in (*ra["runs"], *rb["runs"])]
    assert merged["summary"]["promptbank (task given)"]["ACC"][0] == pytest.approx(np.mean(accs))
    assert merged["wall_seconds"] == pytest.approx(ra["wall_seconds"] + rb["wall_seconds"])
    with pytest.raises(SystemExit, match="repeat"):
        forgetting.main(["--data", str(cl4_dir), "--merge", str(a), str(a), "--out", str(tmp_path / "x.json")])


def test_a_run_of_some_orders_draws_the_samples_of_a_run_of_all(cl4_dir, tmp_path, monkeypatch):
    """The samples come from one generator per seed running through the tasks: through all of the stream's tasks
    in one fixed order, whatever --orders asks for (O3 alone starts with yahoo; it must not draw yahoo first)."""
    from promptbank.embed import HashingEmbedder

    assert forgetting.sample_names("cl4") == ["dbpedia", "amazon", "yahoo", "ag"]
    drawn, load = [], forgetting.load_stream

    class Drawn(Exception):
        pass

    def capture(data, train_per_class, test_per_class, seed, names=None):
        drawn.append(load(data, train_per_class, test_per_class, seed, names))
        raise Drawn

    monkeypatch.setattr(forgetting, "load_stream", capture)
    for orders in ("O1,O2,O3", "O3"):
        with pytest.raises(Drawn):
            forgetting.run(_args(cl4_dir, tmp_path / "f.json", orders=orders), make_tiny_bert(), HashingEmbedder(64))
    texts = [{t: [ex.input for ex in s[t]["train"].examples] for t in s} for s in drawn]
    assert texts[0] == texts[1] and set(texts[0]) == {"dbpedia", "amazon", "yahoo", "ag"}
