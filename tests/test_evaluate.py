"""evaluate(): on classification data accuracy and macro F1 (the same as scikit-learn's, rows routed elsewhere
counting against their label); on generation data exact match and F1 of the greedy answers (SQuAD normalisation)
and the targets' teacher-forced loss, the same numbers predict() and compare() give; routed rows that land on no
generation task score 0; kinds that do not match are refused. (The CLI's eval: tests/test_cli.py.)"""

from __future__ import annotations

import pytest
from conftest import fast_options

from promptbank import DataError
from promptbank.metrics import exact_match, f1_score, macro_f1
from promptbank.tasks import load_task_data

QA = [{"input": f"capital of country {i}?", "target": f"city {i % 3}"} for i in range(12)]
LABELLED = [{"text": f"weather report number {i}", "label": "rain" if i % 2 else "sun"} for i in range(12)]


@pytest.fixture
def qa_bank(tiny_bank):
    tiny_bank.learn_task("qa", QA, num_virtual_tokens=3, max_target_tokens=6, **fast_options())
    tiny_bank.learn_task("weather", LABELLED, num_virtual_tokens=3, **fast_options())
    return tiny_bank


def test_generation_scores_equal_predictions_scored_by_hand(qa_bank):
    res = qa_bank.evaluate(QA, task="qa")
    assert set(res) == {"exact_match", "f1", "loss", "n"} and res["n"] == len(QA)
    preds = qa_bank.predict([r["input"] for r in QA], task="qa")
    # evaluate and predict answer up to the task's max_target_tokens (6); generate's default is 64
    answers = qa_bank.generate([r["input"] for r in QA], task="qa", max_new_tokens=6)
    assert [p.output for p in preds] == answers
    longer = qa_bank.generate([r["input"] for r in QA], task="qa", max_new_tokens=64)
    assert any(len(b) > len(a) for a, b in zip(answers, longer))  # the cap is what cut them
    assert res["exact_match"] == pytest.approx(sum(exact_match(a, [r["target"]]) for a, r in zip(answers, QA)) / 12)
    assert res["f1"] == pytest.approx(sum(f1_score(a, [r["target"]]) for a, r in zip(answers, QA)) / 12)
    assert res["loss"] == pytest.approx(qa_bank.compare("qa", QA)["main"]["loss"])
    assert res["loss"] > 0


def test_generation_answer_length_is_capped(qa_bank):
    """max_new_tokens=1: one token per answer, so none of the two-word targets can match exactly."""
    res = qa_bank.evaluate(QA, task="qa", max_new_tokens=1)
    assert res["exact_match"] == 0.0
    answers = qa_bank.generate([r["input"] for r in QA], task="qa", max_new_tokens=1)
    assert res["f1"] == pytest.approx(sum(f1_score(a, [r["target"]]) for a, r in zip(answers, QA)) / 12)


def test_routed_generation_scores_rows_routed_elsewhere_as_zero(qa_bank):
    routed = qa_bank.evaluate(QA, task=None)
    assert "loss" not in routed and routed["n"] == len(QA)
    tasks = [r.task for r in qa_bank.route_many([r["input"] for r in QA])]
    answers = qa_bank.generate([r["input"] for r in QA], task=tasks, max_new_tokens=6)
    want = [f1_score(a, [r["target"]]) if t == "qa" else 0.0 for a, t, r in zip(answers, tasks, QA)]
    assert routed["f1"] == pytest.approx(sum(want) / 12)


def test_kinds_must_match(qa_bank):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        qa_bank.evaluate(QA, task="qa", max_new_tokens=0)
    with pytest.raises(ValueError, match="generation task; this is classification data"):
        qa_bank.evaluate(LABELLED, task="qa")
    with pytest.raises(ValueError, match="classification task; this is generation data"):
        qa_bank.evaluate(QA, task="weather")


def test_classification_reports_macro_f1_of_the_predictions(qa_bank):
    sk = pytest.importorskip("sklearn.metrics")
    res = qa_bank.evaluate(LABELLED, task="weather")
    assert set(res) == {"accuracy", "macro_f1", "n"}
    preds = [p.output for p in qa_bank.predict([r["text"] for r in LABELLED], task="weather")]
    golds = [r["label"] for r in LABELLED]
    assert res["macro_f1"] == pytest.approx(sk.f1_score(golds, preds, average="macro", labels=["sun", "rain"]))
    routed = qa_bank.evaluate(LABELLED)  # a row routed to "qa" predicts text, never a label: it counts against its own
    routed_preds = [str(p.output) for p in qa_bank.predict([r["text"] for r in LABELLED])]
    want = sk.f1_score(golds, routed_preds, average="macro", labels=["sun", "rain"])
    assert routed["macro_f1"] == pytest.approx(want)


def test_a_test_set_of_one_label_is_scored_and_labels_the_task_lacks_are_refused(qa_bank):
    rain = [r for r in LABELLED if r["label"] == "rain"]
    res = qa_bank.evaluate(rain, task="weather")
    preds = [p.output for p in qa_bank.predict([r["text"] for r in rain], task="weather")]
    assert res["n"] == len(rain) and res["accuracy"] == pytest.approx(preds.count("rain") / len(rain))
    assert res["macro_f1"] == pytest.approx(macro_f1(preds, ["rain"] * len(rain), ["rain"]))
    routed = qa_bank.evaluate(rain)  # routed: each row through the router first
    routed_preds = [p.output for p in qa_bank.predict([r["text"] for r in rain])]
    assert routed["n"] == len(rain) and routed["accuracy"] == pytest.approx(routed_preds.count("rain") / len(rain))
    with pytest.raises(DataError, match=r"<list>:2: unknown label 'snow'; allowed labels: 'sun', 'rain'"):
        qa_bank.evaluate([LABELLED[0], {"text": "cold and white", "label": "snow"}], task="weather")
    # training still needs two labels
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        qa_bank.learn_task("rain_only", rain, **fast_options())
    with pytest.raises(DataError, match=r"at least 2 labels, got \['rain'\]"):
        qa_bank.learn_task("rain_only", load_task_data(rain, min_labels=1), **fast_options())


def test_macro_f1_matches_scikit_learn_with_missing_and_foreign_predictions():
    sk = pytest.importorskip("sklearn.metrics")
    golds = ["a", "a", "a", "b", "b", "c", "a", "c"]
    preds = ["a", "b", None, "b", "x", "c", "a", "a"]
    want = sk.f1_score(golds, [p or "none" for p in preds], average="macro", labels=["a", "b", "c"])
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx(want)
    assert macro_f1(["a", "a"], ["a", "a"], ["a", "b"]) == pytest.approx(0.5)  # b: never predicted nor gold
    with pytest.raises(ValueError, match="2 predictions for 1"):
        macro_f1(["a", "b"], ["a"], ["a"])


@pytest.mark.parametrize("task", ["qa", "weather", None])
def test_progress_bar_evaluates_in_chunks_with_the_same_scores(qa_bank, monkeypatch, capsys, task):
    """progress=True predicts classification rows a few whole batches at a time under a progress bar, and
    generates in one call whose bar moves batch by batch: the same scores as without it."""
    import promptbank.bank as bank_module

    data = QA if task == "qa" else LABELLED
    want = qa_bank.evaluate(data, task=task, batch_size=2)
    monkeypatch.setattr(bank_module, "EVAL_CHUNK", 2)  # 4 rows per chunk: 3 chunks of 12 rows
    calls = []
    predict, generate = qa_bank.predict, qa_bank._generate
    monkeypatch.setattr(qa_bank, "predict", lambda texts, *a, **k: calls.append(len(texts)) or predict(texts, *a, **k))
    monkeypatch.setattr(
        qa_bank, "_generate", lambda texts, *a, **k: calls.append(len(texts)) or generate(texts, *a, **k)
    )
    got = qa_bank.evaluate(data, task=task, batch_size=2, progress=True)
    assert got == pytest.approx(want)
    assert calls == ([12] if task == "qa" else [4, 4, 4])
    assert "evaluate" in capsys.readouterr().err  # tqdm writes to stderr


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_a_progress_bar_gives_the_same_outputs(qa_bank, capsys, temperature):
    """generate(progress=True) draws a bar over the rows (past one batch; for one batch over its decoding steps)
    and changes no output, greedy or sampled (one seeded generator runs through the batches either way)."""
    texts = [r["input"] for r in QA] + ["say something"] * 3
    tasks = ["qa"] * len(QA) + [None] * 3
    kw = dict(max_new_tokens=4, temperature=temperature, seed=3, batch_size=4)
    want = qa_bank.generate(texts, tasks, **kw)
    assert "generate" not in capsys.readouterr().err
    assert qa_bank.generate(texts, tasks, progress=True, **kw) == want
    err = capsys.readouterr().err
    assert "generate" in err and "row" in err and "token" not in err
    assert qa_bank.generate(texts[:4], tasks[:4], progress=True, **kw) == want[:4]  # the first batch draws first
    err = capsys.readouterr().err
    assert "generate" in err and "token" in err  # one batch: a bar over its decoding steps


def test_predict_with_a_progress_bar_gives_the_same_predictions(qa_bank, monkeypatch, capsys):
    """predict(progress=True) over more than one chunk: per-row tasks follow their rows; outputs and scores as one
    call; a task list of the wrong length is refused before any chunk runs."""
    import promptbank.bank as bank_module

    texts = [r["text"] for r in LABELLED] + [r["input"] for r in QA]
    tasks = ["weather"] * len(LABELLED) + ["qa"] * len(QA)
    want = [(p.output, p.task, p.label_scores) for p in qa_bank.predict(texts, tasks, batch_size=2)]
    routed = [(p.output, p.task) for p in qa_bank.predict(texts, batch_size=2)]
    monkeypatch.setattr(bank_module, "EVAL_CHUNK", 3)  # 6 rows per chunk
    got = [(p.output, p.task, p.label_scores) for p in qa_bank.predict(texts, tasks, batch_size=2, progress=True)]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for (_, _, scores), (_, _, ref) in zip(got, want):
        assert (scores is None) == (ref is None) and (scores is None or scores == pytest.approx(ref))
    assert [(p.output, p.task) for p in qa_bank.predict(texts, batch_size=2, progress=True)] == routed
    assert "predict" in capsys.readouterr().err
    with pytest.raises(ValueError, match="got 2 task names for 24 texts"):
        qa_bank.predict(texts, ["qa", "qa"], batch_size=2, progress=True)


def test_learning_warns_of_cut_targets_and_evaluate_of_inputs_cut_for_the_loss_only(tiny_bank):
    """Targets longer than max_target_tokens are cut in training: one warning says so and names the option (none
    when they fit). evaluate() on generation data cuts inputs as training did for the target loss only; its warning
    says the answers came from the whole inputs."""
    import warnings

    with pytest.warns(UserWarning, match=r"cut 12 of 12 targets .*raise max_target_tokens"):
        tiny_bank.learn_task("qa", QA, num_virtual_tokens=3, max_target_tokens=2, **fast_options())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_bank.learn_task("qa_whole", QA, num_virtual_tokens=3, max_target_tokens=64, **fast_options())
    tiny_bank.learn_task("qa_short", QA, num_virtual_tokens=3, max_input_tokens=4, **fast_options())
    with pytest.warns(UserWarning, match=r"for the target loss, as training cut them \(the answers were generated"):
        tiny_bank.evaluate(QA, task="qa_short", max_new_tokens=1)
