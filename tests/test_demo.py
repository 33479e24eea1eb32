"""`promptbank demo` end to end on the tiny backbone and the hashing embedder (2 steps per task): the bundled
example tasks, and the real-data layout (a synthetic folder shaped like shared/data), whose TREC task is learned
with label words."""

from __future__ import annotations

import json

from promptbank.demo import TREC_WORDS, run_demo


def _check(res: dict, names: list[str]) -> None:
    assert list(res["tasks"]) == names
    assert all(t["steps"] >= 1 and 0.0 <= t["test_accuracy"] <= 1.0 for t in res["tasks"].values())
    assert res["first_task_prompt_identical"] is True
    first = res["tasks"][names[0]]["test_accuracy"]
    assert res["first_task_accuracy_after"] == first  # not forgotten
    assert 0.0 <= res["routing_hit_at_1"] <= 1.0 and 0.0 <= res["routed_accuracy"] <= 1.0


def test_demo_on_the_bundled_tasks(tiny_backbone, hashing_embedder, tmp_path):
    lines = []
    res = run_demo(
        steps=2,
        bank_dir=tmp_path / "bank",
        progress=False,
        backbone=tiny_backbone,
        embedder=hashing_embedder,
        print_fn=lines.append,
    )
    _check(res, ["ticket_routing", "review_sentiment", "question_topic", "urgency"])
    assert set(res["task_bytes"]) == set(res["tasks"]) and all(b > 0 for b in res["task_bytes"].values())
    assert any("soft prompt bit-identical: True" in line for line in lines)


def _write(folder, labels, rows_per_label):
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps({"labels": labels}))
    for split in ("train", "test"):
        rows = [
            {"text": f"{split} example {i} about {lab.lower()}", "label": lab}
            for lab in labels
            for i in range(rows_per_label)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_demo_on_real_data_layout_learns_trec_with_label_words(tiny_backbone, hashing_embedder, tmp_path):
    data = tmp_path / "data"
    _write(data / "sst2", ["negative", "positive"], 6)
    _write(data / "ag_news", ["World", "Sports", "Business", "Sci/Tech"], 5)
    _write(data / "trec", list(TREC_WORDS), 5)
    res = run_demo(
        data,
        steps=2,
        bank_dir=tmp_path / "bank",
        progress=False,
        backbone=tiny_backbone,
        embedder=hashing_embedder,
        print_fn=lambda *_: None,
    )
    _check(res, ["sst2", "ag_news", "trec"])
    manifest = json.loads((tmp_path / "bank" / "promptbank.json").read_text())
    tasks = manifest["tasks"]
    records = {r["name"]: r for r in (tasks if isinstance(tasks, list) else tasks.values())}
    assert records["trec"]["label_words"] == TREC_WORDS
    assert "label_words" not in records["sst2"]
