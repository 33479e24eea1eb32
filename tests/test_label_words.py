"""Label words (a verbalizer): a classification task's labels can be written to the causal LM as other text
("ABBR" -> "abbreviation"). Training targets, label ranking, the text initialisation, the label objective,
variants, resuming, saving and the CLI all use the words; predictions and evaluation keep the labels."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_options

from promptbank import PromptBank
from promptbank.causal import encode_input, encode_target, rank_labels
from promptbank.errors import BankFormatError
from promptbank.storage import manifest_digest
from promptbank.tasks import check_label_words, label_texts

WEATHER = [
    {"text": f"the weather is {w} today", "label": lab}
    for w, lab in [("sunny", "G"), ("rainy", "B"), ("lovely", "G"), ("awful", "B")] * 4
]
WORDS = {"G": "good", "B": "bad"}


def test_check_label_words_normalises_and_refuses_bad_mappings():
    labels = ["ABBR", "DESC", "HUM"]
    assert check_label_words(None, "classification", labels) is None
    assert check_label_words({}, "classification", labels) is None
    # stripped, in label order; labels left out are their own text
    got = check_label_words({"HUM": " person ", "ABBR": "abbreviation"}, "classification", labels)
    assert got == {"ABBR": "abbreviation", "HUM": "person"} and list(got) == ["ABBR", "HUM"]
    assert label_texts(labels, got) == ["abbreviation", "DESC", "person"]
    with pytest.raises(ValueError, match=r"'LOC', not among the task's labels \('ABBR', 'DESC', 'HUM'\)"):
        check_label_words({"LOC": "place"}, "classification", labels)
    with pytest.raises(ValueError, match=r"label_words\['HUM'\] must be a non-empty string"):
        check_label_words({"HUM": "  "}, "classification", labels)
    with pytest.raises(ValueError, match="non-empty string, got 3"):
        check_label_words({"HUM": 3}, "classification", labels)
    with pytest.raises(ValueError, match="'ABBR' and 'HUM' would both be written 'x'"):
        check_label_words({"ABBR": "x", "HUM": "x"}, "classification", labels)
    with pytest.raises(ValueError, match="'DESC' and 'HUM' would both be written 'DESC'"):
        check_label_words({"HUM": "DESC"}, "classification", labels)  # another label's own text
    with pytest.raises(ValueError, match="only to classification"):
        check_label_words({"a": "b"}, "generation", None)
    # integer keys name the labels they print as (integer labels in the data become their str())
    assert check_label_words({1: "terrible", "2": "bad"}, "classification", ["1", "2", "3"]) == {
        "1": "terrible",
        "2": "bad",
    }
    with pytest.raises(ValueError, match="label '1' twice"):
        check_label_words({1: "terrible", "1": "awful"}, "classification", ["1", "2"])
    with pytest.raises(ValueError, match="must be a mapping"):
        check_label_words([("HUM", "person")], "classification", labels)


def test_training_targets_and_the_init_text_use_the_words(tiny_bank, monkeypatch):
    from promptbank import bank as bank_mod

    seen = {}
    real_train, real_describe = bank_mod.train_soft_prompt, bank_mod.describe_task

    def spy_train(model, tok, module, train, dev, config, **kw):
        seen["targets"] = {tuple(t) for _, t in train + dev}
        seen["label_ids"] = kw.get("label_ids")
        return real_train(model, tok, module, train, dev, config, **kw)

    def spy_describe(kind, labels, *a, **kw):
        seen["described"] = list(labels)
        return real_describe(kind, labels, *a, **kw)

    monkeypatch.setattr(bank_mod, "train_soft_prompt", spy_train)
    monkeypatch.setattr(bank_mod, "describe_task", spy_describe)
    tok = tiny_bank.backbone.tokenizer
    words_ids = {tuple(encode_target(tok, w)) for w in WORDS.values()}
    rec = tiny_bank.learn_task("weather", WEATHER, label_words=WORDS, objective="labels+lm", **fast_options())
    assert seen["targets"] == words_ids
    assert {tuple(t) for t in seen["label_ids"]} == words_ids
    assert seen["described"] == ["good", "bad"]  # label order of first appearance: G, B
    assert rec.labels == ["G", "B"] and rec.label_words == {"G": "good", "B": "bad"}
    assert rec.label_texts == ["good", "bad"]


def test_predict_ranks_the_words_and_returns_the_labels(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, label_words=WORDS, probe=False, **fast_options())  # the LM's ranking
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    texts = ["the weather is grim today", "the weather is fine today", "sunny"]
    preds = tiny_bank.predict(texts, task="weather")
    kv = tiny_bank.prompt_prefix("weather")
    ids = [encode_target(tok, "good"), encode_target(tok, "bad")]
    ref = rank_labels(model, tok, [kv] * 3, [encode_input(tok, t) for t in texts], [ids] * 3)
    for p, r in zip(preds, ref):
        assert set(p.label_scores) == {"G", "B"}
        torch.testing.assert_close(torch.tensor([p.label_scores["G"], p.label_scores["B"]]), r, atol=1e-5, rtol=0)
        assert p.output == ["G", "B"][int(r.argmax())]
    res = tiny_bank.evaluate(WEATHER, task="weather")
    expected = sum(
        p.output == row["label"]
        for p, row in zip(tiny_bank.predict([r["text"] for r in WEATHER], task="weather"), WEATHER)
    )
    assert res["accuracy"] == expected / len(WEATHER) and res["n"] == len(WEATHER)


def test_words_change_what_is_ranked(tiny_bank):
    """The same prompt ranks other texts with label words: the scores are those of the words, not the labels."""
    tiny_bank.learn_task("plain", WEATHER, **fast_options())
    tiny_bank.learn_task("worded", WEATHER, label_words=WORDS, **fast_options())
    plain = tiny_bank.predict(["the weather is sunny today"], task="plain")[0].label_scores
    worded = tiny_bank.predict(["the weather is sunny today"], task="worded")[0].label_scores
    assert plain["G"] != pytest.approx(worded["G"], abs=1e-3)
    assert tiny_bank.tasks["plain"].label_words is None


def test_label_words_round_trip_and_old_manifests_stay_unchanged(tiny_bank, tmp_path):
    tiny_bank.learn_task("plain", WEATHER, **fast_options())
    tiny_bank.learn_task("weather", WEATHER, label_words=WORDS, **fast_options())
    tiny_bank.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "promptbank.json").read_text())
    records = {r["name"]: r for r in _records(manifest)}
    assert "label_words" not in records["plain"]  # readable by versions before label words
    assert records["weather"]["label_words"] == {"G": "good", "B": "bad"}
    loaded = PromptBank.load(tmp_path / "b", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)
    assert loaded.tasks["weather"].label_words == {"G": "good", "B": "bad"}
    text = ["the weather is odd today"]
    assert loaded.predict(text, task="weather")[0].label_scores == pytest.approx(
        tiny_bank.predict(text, task="weather")[0].label_scores, abs=1e-6
    )


def _records(manifest):
    tasks = manifest["tasks"]
    return tasks if isinstance(tasks, list) else list(tasks.values())


@pytest.mark.parametrize(
    "words,fragment",
    [({"X": "good"}, "not among the task's labels"), ({"G": "B"}, "would both be written 'B'"), (["G"], "object")],
)
def test_load_refuses_bad_label_words(tiny_bank, tmp_path, words, fragment):
    tiny_bank.learn_task("weather", WEATHER, label_words=WORDS, **fast_options())
    tiny_bank.save(tmp_path / "b")
    path = tmp_path / "b" / "promptbank.json"
    manifest = json.loads(path.read_text())
    next(r for r in _records(manifest) if r["name"] == "weather")["label_words"] = words
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BankFormatError, match=fragment):
        PromptBank.load(tmp_path / "b", backbone=tiny_bank.backbone, embedder=tiny_bank.embedder)


def test_variants_and_resume_use_the_tasks_words(tiny_bank):
    tiny_bank.learn_task("weather", WEATHER, label_words=WORDS, **fast_options())
    var = tiny_bank.learn_variant("weather", "b", WEATHER, method="deep", **fast_options())
    assert var.label_words == WORDS
    resumed = tiny_bank.resume_task("weather", WEATHER, max_steps=3)
    assert resumed.label_words == WORDS
    cmp = tiny_bank.compare("weather", WEATHER)
    # compare's accuracy of the serving prompt is evaluate's: both rank the words
    assert cmp["main"]["accuracy"] == pytest.approx(tiny_bank.evaluate(WEATHER, task="weather")["accuracy"])
    tiny_bank.promote("weather", "b")
    assert tiny_bank.tasks["weather"].label_words == WORDS


def test_bad_label_words_leave_the_bank_untouched(tiny_bank):
    with pytest.raises(ValueError, match="not among the task's labels"):
        tiny_bank.learn_task("weather", WEATHER, label_words={"good": "nice"}, **fast_options())
    with pytest.raises(ValueError, match="only to classification"):
        tiny_bank.learn_task("echo", [{"input": "a", "target": "b"}] * 4, label_words={"a": "b"}, **fast_options())
    assert not tiny_bank.tasks


def test_encoder_bank_stores_words_and_predicts_labels(enc_bank):
    rec = enc_bank.learn_task("weather", WEATHER, label_words=WORDS, **fast_options())
    assert rec.label_words == WORDS
    assert {p.output for p in enc_bank.predict(["the weather is sunny today"], task="weather")} <= {"G", "B"}


def test_cli_label_words(tmp_path, capsys):
    from conftest import make_tiny_model, make_tiny_tokenizer

    from promptbank.cli import main

    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in WEATHER), encoding="utf-8")
    (tmp_path / "words.json").write_text(json.dumps({"B": "bad"}), encoding="utf-8")
    opts = ["--backbone", str(tmp_path / "tiny"), "--embedder", "hashing", "--bank", str(tmp_path / "bank")]
    fast = ["--steps", "2", "--batch-size", "4", "--tokens", "3", "--quiet"]
    assert main(["learn", "w1", str(data), *opts, *fast, "--label-words", '{"G": "good", "B": "bad"}']) == 0
    assert "2 labels (2 written as label words)" in capsys.readouterr().out
    assert main(["learn", "w2", str(data), *opts, *fast, "--label-words", str(tmp_path / "words.json")]) == 0
    capsys.readouterr()
    assert main(["list", "--json", "--bank", str(tmp_path / "bank")]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["w1"]["label_words"] == {"G": "good", "B": "bad"} and rows["w2"]["label_words"] == {"B": "bad"}
    # bad values: usage errors (exit 2) before any model loads; a label the data lacks: a one-line error
    for bad, fragment in (
        ('{"G": 1}', "expected a JSON object of label -> text strings"),
        ("{not json", "not valid JSON"),
        (str(tmp_path / "missing.json"), "no file"),
    ):
        assert main(["learn", "w3", str(data), *opts, *fast, "--label-words", bad]) == 2
        assert fragment in capsys.readouterr().err
    assert main(["learn", "w3", str(data), *opts, *fast, "--label-words", '{"X": "x"}']) == 1
    assert "not among the task's labels" in capsys.readouterr().err
    assert main(["learn", "w1", str(data), *opts, *fast, "--variant", "v", "--label-words", '{"G": "good"}']) == 2
    assert "--label-words does not apply to --variant" in capsys.readouterr().err
