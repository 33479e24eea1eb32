"""`promptbank demo`: learn several tasks one after another on the frozen default backbone, then route
mixed queries with no task id, and show that the first task was not forgotten.

With no arguments it uses the small example tasks bundled in :mod:`promptbank.examples` (written for this
project). ``--data DIR`` uses real public datasets from a folder laid out like ``shared/data``
(SST-2, AG News, TREC).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .tasks import TaskData, load_task_data


@dataclass
class DemoTask:
    name: str
    method: str
    train: TaskData
    test: TaskData
    about: str
    label_words: dict[str, str] | None = None


def _bundled_tasks() -> list[DemoTask]:
    from .examples import example_path

    spec = [
        ("ticket_routing", "prompt_tuning", "support tickets -> billing / technical / account / shipping"),
        ("review_sentiment", "ptuning_mlp", "reviews -> positive / negative"),
        ("question_topic", "deep", "trivia questions -> science / sports / history / food"),
        ("urgency", "ptuning_lstm", "workplace messages -> urgent / routine"),
    ]
    return [
        DemoTask(
            name,
            method,
            load_task_data(example_path(f"{name}_train")),
            load_task_data(example_path(f"{name}_test")),
            about,
        )
        for name, method, about in spec
    ]


def _sample(data: TaskData, per_label: int, seed: int) -> TaskData:
    """A label-balanced sample of ``per_label`` rows per label (deterministic)."""
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for ex in data.examples:
        by_label.setdefault(ex.target, []).append(ex)
    rows = []
    for lab in data.labels or []:
        items = by_label.get(lab, [])
        rows += rng.sample(items, min(per_label, len(items)))
    rng.shuffle(rows)
    return TaskData(kind=data.kind, examples=rows, labels=data.labels, source=data.source)


# TREC-6's labels are codes; the model reads and writes the coarse classes' names (Li & Roth, 2002) instead
TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def _real_tasks(data_dir: Path, seed: int) -> list[DemoTask]:
    spec = [
        ("sst2", "prompt_tuning", "movie-review sentiment (SST-2)", "train", "test", None),
        ("ag_news", "ptuning_mlp", "news topic (AG News)", "train", "test", None),
        ("trec", "deep", "question type (TREC-6), label words", "train", "test", TREC_WORDS),
    ]
    tasks = []
    for name, method, about, tr, te, words in spec:
        folder = data_dir / name
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {data_dir}: no {name}/ folder (expected the layout of shared/data)")
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["labels"]
        train = load_task_data(folder / f"{tr}.jsonl", labels=labels)
        test = load_task_data(folder / f"{te}.jsonl", labels=labels)
        per_label = max(4, 48 // len(labels))
        tasks.append(
            DemoTask(
                name,
                method,
                _sample(train, per_label, seed),
                _sample(test, max(5, 60 // len(labels)), seed),
                about,
                words,
            )
        )
    return tasks


def _prompt_digest(bank, name: str) -> str:
    h = hashlib.sha256()
    for layer, t in sorted(bank.soft_prompt(name).items()):
        h.update(str(layer).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_demo(
    data_dir: str | Path | None = None,
    *,
    steps: int = 80,
    bank_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    backbone=None,
    embedder=None,
    print_fn=print,
) -> dict:
    """Run the demo; returns the measured numbers (also printed)."""
    from .bank import PromptBank

    say = print_fn
    t0 = time.perf_counter()
    tasks = _real_tasks(Path(data_dir), seed) if data_dir else _bundled_tasks()
    say("promptbank demo: one frozen backbone, one soft prompt per task, learned one after another\n")
    t = time.perf_counter()
    bank = PromptBank.from_pretrained(backbone, embedder=embedder)
    bank.embedder.encode(["warm up"])
    say(
        f"backbone {bank.backbone.name} ({sum(p.numel() for p in bank.backbone.model.parameters()) / 1e6:.1f}M "
        f"params, frozen) + embedder {bank.embedder.name}: loaded in {time.perf_counter() - t:.1f}s\n"
    )

    results: dict = {"tasks": {}, "steps": steps}
    first = tasks[0].name
    for i, task in enumerate(tasks, 1):
        say(
            f"[{i}/{len(tasks)}] learning {task.name!r} ({task.about}) with {task.method}: "
            f"{len(task.train)} examples, up to {steps} steps"
        )
        rec = bank.learn_task(
            task.name,
            task.train,
            method=task.method,
            label_words=task.label_words,
            max_steps=steps,
            eval_every=10,
            patience=3,
            seed=seed,
            progress=progress,
            max_input_tokens=96,
        )
        t = time.perf_counter()
        acc = bank.evaluate(task.test, task=task.name)["accuracy"]
        warm = (
            ", ".join(f"{w['task']} ({w['weight']:.2f})" for w in rec.warm_start_from)
            or "none (no similar stored prompt of the same shape; label-text init)"
        )
        say(
            f"    trained {rec.steps} steps in {rec.train_seconds:.0f}s ({rec.train_seconds / rec.steps:.2f} s/step), "
            f"warm start: {warm}; dev loss {rec.history[0]['dev_loss']:.3f} -> {rec.dev_loss:.3f}; "
            f"test accuracy {acc:.1%} on {len(task.test)} examples ({time.perf_counter() - t:.0f}s)\n"
        )
        results["tasks"][task.name] = {
            "method": task.method,
            "steps": rec.steps,
            "train_seconds": rec.train_seconds,
            "test_accuracy": acc,
            "n_test": len(task.test),
        }
        if i == 1:
            first_digest = _prompt_digest(bank, first)

    # No forgetting: the first task's soft prompt is bit-identical and its accuracy unchanged.
    acc_after = bank.evaluate(tasks[0].test, task=first)["accuracy"]
    same = _prompt_digest(bank, first) == first_digest
    say(
        f"after learning {len(tasks) - 1} more task(s), {first!r}: accuracy {results['tasks'][first]['test_accuracy']:.1%} "
        f"-> {acc_after:.1%}; soft prompt bit-identical: {same}"
    )
    results["first_task_accuracy_after"] = acc_after
    results["first_task_prompt_identical"] = same

    # Routing with no task id: test sets of all tasks, one query at a time (batch size 1 semantics).
    texts, truth, labels = [], [], []
    for task in tasks:
        for ex in task.test.examples:
            texts.append(ex.input)
            truth.append(task.name)
            labels.append(ex.target)
    routes = bank.route_many(texts)
    hit = sum(r.task == g for r, g in zip(routes, truth)) / len(texts)
    preds = bank.predict(texts)
    routed_acc = sum(p.output == y for p, y in zip(preds, labels)) / len(texts)
    oracle = sum(results["tasks"][t.name]["test_accuracy"] * len(t.test) for t in tasks) / len(texts)
    say(
        f"routing hit@1 on all {len(texts)} test queries: {hit:.1%}; accuracy with routing {routed_acc:.1%} "
        f"vs {oracle:.1%} with the task given\n"
    )
    results.update(routing_hit_at_1=hit, routed_accuracy=routed_acc, oracle_accuracy=oracle)

    say("mixed queries, routed automatically:")
    queries = _mixed_queries(tasks, data_dir)
    q_routes = bank.route_many(queries)
    q_preds = bank.predict(queries)
    plain_rows = [i for i, r in enumerate(q_routes) if r.task is None]
    plain = (
        dict(
            zip(
                plain_rows, bank.generate([queries[i] for i in plain_rows], [None] * len(plain_rows), max_new_tokens=24)
            )
        )
        if plain_rows
        else {}
    )
    for i, (q, r, p) in enumerate(zip(queries, q_routes, q_preds)):
        if r.task is None:
            answer = f"(no task, score {r.score:.2f}; plain backbone) {plain[i][:70]!r}"
        else:
            answer = f"-> {r.task} (score {r.score:.2f}): {p.output}"
        say(f"  {q[:60]!r:64} {answer}")

    if bank_dir:
        bank.save(bank_dir)
        sizes = {n: _folder_size(Path(bank_dir) / "tasks" / n) for n in bank.tasks}
        say(f"\nsaved the bank to {bank_dir}: " + ", ".join(f"{n} {s / 1024:.0f} KiB" for n, s in sizes.items()))
        results["task_bytes"] = sizes
    results["seconds"] = time.perf_counter() - t0
    say(f"\ndemo finished in {results['seconds'] / 60:.1f} min")
    return results


def _mixed_queries(tasks: list[DemoTask], data_dir) -> list[str]:
    if data_dir is None:
        from .examples import example_path

        rows = [
            json.loads(line)
            for line in example_path("mixed_queries").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        known = {t.name for t in tasks}
        return [r["text"] for r in rows if r["task"] is None or r["task"] in known]
    rng = random.Random(1)
    out = [rng.choice(t.test.examples).input for t in tasks for _ in range(2)]
    out += ["Write a short poem about the sea.", "Give me a recipe for pancakes."]
    return out
