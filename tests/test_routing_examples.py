"""add_routing_examples / remove_routing_examples: texts that become a task's routing keys without training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fast_options
from test_bank import FRUIT, WEATHER

from promptbank import PromptBank
from promptbank.errors import TaskNotFoundError
from promptbank.storage import MANIFEST, manifest_digest

# a new format for the weather task: none of its training inputs looks like these. Its training rows repeat
# each text 4 times (what makes the hashing embedder's thresholds tight), and so do these.
NEW = [f"forecast: {w} skies" for w in ("clear", "grey")] * 3
QUERIES = ["forecast: clear skies", "forecast: grey skies"]
OUT_OF_SCOPE = ["quantum physics lecture notes", "how do i reset my password", "book a flight to tokyo", "zzzz"]


def _bank(backbone, embedder, routing="lda") -> PromptBank:
    bank = PromptBank(backbone, embedder, routing=routing)
    bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    bank.learn_task("fruit", FRUIT, num_virtual_tokens=2, **fast_options(max_steps=1))
    return bank


def _state(bank: PromptBank, name: str) -> dict:
    t = bank._tasks[name]
    return {
        "prompt": {k: v.clone() for k, v in t.prompt.items()},
        "head": None if t.head is None else {k: v.clone() for k, v in t.head.items()},
        "keys": np.array(t.keys),
        "groups": None if t.key_groups is None else np.array(t.key_groups),
    }


def _same_tensors(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_added_examples_route_queries_of_their_kind_and_change_nothing_else(tiny_backbone, hashing_embedder):
    bank = _bank(tiny_backbone, hashing_embedder)
    assert [r.task for r in bank.route_many(QUERIES)] == [None] * 2  # unlike any training input: no task
    before = {n: _state(bank, n) for n in bank.tasks}
    old_rows = [r.task for r in bank.route_many([ex["text"] for ex in WEATHER + FRUIT])]
    record = bank.add_routing_examples("weather", NEW)
    assert record.routing_examples == len(NEW) and bank.tasks["weather"].routing_examples == len(NEW)
    assert [r.task for r in bank.route_many(QUERIES)] == ["weather"] * 2
    # the training inputs still go where they went
    assert [r.task for r in bank.route_many([ex["text"] for ex in WEATHER + FRUIT])] == old_rows
    after = _state(bank, "weather")
    assert _same_tensors(after["prompt"], before["weather"]["prompt"])
    assert _same_tensors(after["head"], before["weather"]["head"])
    n_old = len(before["weather"]["keys"])
    np.testing.assert_array_equal(after["keys"][:n_old], before["weather"]["keys"])
    np.testing.assert_allclose(after["keys"][n_old:], hashing_embedder.encode(NEW))
    old_groups = before["weather"]["groups"]
    np.testing.assert_array_equal(after["groups"][:n_old], old_groups)
    assert after["groups"][n_old:].min() > old_groups.max()  # new groups, beside the label groups
    fruit = _state(bank, "fruit")
    np.testing.assert_array_equal(fruit["keys"], before["fruit"]["keys"])
    assert _same_tensors(fruit["prompt"], before["fruit"]["prompt"])
    np.testing.assert_array_equal(bank.router.keys("weather"), after["keys"])


def test_examples_are_grouped_by_kmeans_one_group_per_four(tiny_backbone, hashing_embedder):
    bank = _bank(tiny_backbone, hashing_embedder)
    n_old = len(bank._tasks["fruit"].keys)
    bank.add_routing_examples("fruit", ["a ripe mango please"])  # one text: one group
    groups = bank._tasks["fruit"].key_groups
    assert len(groups) == n_old + 1 and groups[-1] == groups[:n_old].max() + 1
    many = [f"some {f} from the {s} market" for f in ("plum", "kiwi", "lime", "pear") for s in ("north", "south")]
    bank.add_routing_examples("fruit", many)  # 8 texts: 2 groups, numbered after the existing ones
    new = bank._tasks["fruit"].key_groups[n_old + 1 :]
    assert len(new) == 8 and set(new.tolist()) == {groups[-1] + 1, groups[-1] + 2}
    assert bank.tasks["fruit"].routing_examples == 9


def test_examples_do_not_loosen_the_tasks_threshold(tiny_backbone, hashing_embedder):
    """The task's "no task" threshold is calibrated on its training keys alone: two examples unlike each other and
    everything else (their held-out distances are huge) must not make the task accept unrelated queries."""
    bank = _bank(tiny_backbone, hashing_embedder)
    assert [r.task for r in bank.route_many(OUT_OF_SCOPE)] == [None] * 4
    before = bank.routing_thresholds()["weather"]
    bank.add_routing_examples("weather", ["what's the outlook for tomorrow in berlin?", "will it snow this weekend"])
    assert [r.task for r in bank.route_many(OUT_OF_SCOPE)] == [None] * 4
    assert bank.routing_thresholds()["weather"] > 2 * before  # moved with the shared covariance only (was -100)


def test_examples_need_the_learned_router(tiny_backbone, hashing_embedder):
    bank = _bank(tiny_backbone, hashing_embedder, "knn")
    with pytest.raises(ValueError, match="routing='lda'"):
        bank.add_routing_examples("weather", NEW)
    assert bank.tasks["weather"].routing_examples == 0
    bank.routing = "lda"  # the switch the message names
    bank.add_routing_examples("weather", NEW)
    assert [r.task for r in bank.route_many(QUERIES)] == ["weather"] * 2


def test_remove_routing_examples_restores_the_trained_routing(tiny_backbone, hashing_embedder):
    bank = _bank(tiny_backbone, hashing_embedder)
    probe = QUERIES + NEW + ["the weather is sunny today", "i would like to eat a banana", "quantum physics"]
    want = bank.route_many(probe)
    keys, groups = np.array(bank._tasks["weather"].keys), np.array(bank._tasks["weather"].key_groups)
    thresholds = bank.routing_thresholds()
    bank.add_routing_examples("weather", NEW)
    record = bank.remove_routing_examples("weather")
    assert record.routing_examples == 0 and bank.tasks["weather"].routing_examples == 0
    np.testing.assert_array_equal(bank._tasks["weather"].keys, keys)
    np.testing.assert_array_equal(bank._tasks["weather"].key_groups, groups)
    assert bank.routing_thresholds() == pytest.approx(thresholds)
    got = bank.route_many(probe)
    assert [r.task for r in got] == [r.task for r in want]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5, atol=1e-6)
    assert bank.remove_routing_examples("weather").routing_examples == 0  # nothing added: a no-op


def test_routing_examples_survive_save_load_and_promote(tiny_backbone, hashing_embedder, tmp_path):
    bank = _bank(tiny_backbone, hashing_embedder)
    bank.add_routing_examples("weather", NEW)
    want = bank.route_many(QUERIES)
    bank.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    entries = manifest["tasks"]
    assert entries["weather"]["routing_examples"] == len(NEW)
    assert "routing_examples" not in entries["fruit"]  # left out at 0: readable by older versions
    loaded = PromptBank.load(tmp_path / "b", backbone=bank.backbone, embedder=hashing_embedder)
    assert loaded.tasks["weather"].routing_examples == len(NEW)
    np.testing.assert_array_equal(loaded._tasks["weather"].keys, bank._tasks["weather"].keys)
    np.testing.assert_array_equal(loaded._tasks["weather"].key_groups, bank._tasks["weather"].key_groups)
    got = loaded.route_many(QUERIES)
    assert [r.task for r in got] == [r.task for r in want] == ["weather"] * 2
    assert [r.score for r in got] == pytest.approx([r.score for r in want])
    # a new prompt variant promoted to serve keeps the task's routing keys and their count
    loaded.learn_variant("weather", "v2", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=1))
    assert loaded.promote("weather", "v2").routing_examples == len(NEW)
    assert {n: r.routing_examples for n, r in loaded.variants("weather").items()} == {"v2": len(NEW), "main": 0}
    assert loaded.remove_routing_examples("weather").routing_examples == 0
    assert len(loaded._tasks["weather"].keys) == len(bank._tasks["weather"].keys) - len(NEW)


def test_a_manifest_counting_more_examples_than_keys_is_refused(tiny_backbone, hashing_embedder, tmp_path):
    from promptbank.errors import BankFormatError

    bank = _bank(tiny_backbone, hashing_embedder)
    bank.save(tmp_path / "b")
    path = tmp_path / "b" / MANIFEST
    manifest = json.loads(path.read_text())
    for bad in (len(bank._tasks["weather"].keys), -1, "3", True):
        manifest["tasks"]["weather"]["routing_examples"] = bad
        manifest["manifest_sha256"] = manifest_digest(manifest)  # sealed: the record check must catch it
        path.write_text(json.dumps(manifest))
        with pytest.raises(BankFormatError, match="routing"):
            PromptBank.load(tmp_path / "b", backbone=bank.backbone, embedder=hashing_embedder)


def test_bad_calls_leave_the_bank_as_it_was(tiny_backbone, hashing_embedder):
    bank = _bank(tiny_backbone, hashing_embedder)
    keys = np.array(bank._tasks["weather"].keys)
    router = bank.router
    with pytest.raises(TaskNotFoundError):
        bank.add_routing_examples("nope", NEW)
    with pytest.raises(TaskNotFoundError):
        bank.remove_routing_examples("nope")
    with pytest.raises(ValueError, match="empty"):
        bank.add_routing_examples("weather", [])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        bank.add_routing_examples("weather", ["fine", 3])
    with pytest.raises(ValueError, match=r"texts\[1\] is empty or blank"):
        bank.add_routing_examples("weather", ["fine", "  "])
    with pytest.raises(TypeError, match="seed"):
        bank.add_routing_examples("weather", ["fine"], seed=True)
    assert bank.router is router and bank.tasks["weather"].routing_examples == 0
    np.testing.assert_array_equal(bank._tasks["weather"].keys, keys)
    bank.add_routing_examples("weather", "one text alone")  # a str is one text
    assert bank.tasks["weather"].routing_examples == 1


def test_a_reader_holding_the_previous_router_fits_a_consistent_snapshot(tiny_backbone, hashing_embedder):
    """A router snapshot taken before examples were added, met with the new task table (whose key groups are for
    the new keys): the learned router is fitted on the newest consistent pair, never on the mixed one."""
    bank = _bank(tiny_backbone, hashing_embedder)
    old_router = bank.router
    bank.add_routing_examples("weather", NEW)
    bank._lda = None  # nothing cached: the reader fits
    scorer = bank._learned_router(old_router)
    assert bank._lda is not None and bank._lda[0] is bank.router and bank._lda[1] is scorer
    assert scorer.thresholds == bank._learned_router(bank.router).thresholds
    assert scorer.route(hashing_embedder.encode(QUERIES), top_k=1)[0][0][0] == "weather"
