"""SentenceEmbedder runs plain mean-pooled sentence-transformers models through transformers directly: the same
embeddings as sentence-transformers, without importing it. Tiny config-built BERT folders saved by
sentence-transformers itself; (real_model) all-MiniLM-L6-v2."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from promptbank.embed import SentenceEmbedder, _MeanPooledEncoder

TEXTS = [
    "the weather is sunny today",
    "  Leading and trailing spaces  ",
    "I would like to eat a LEMON",
    "x",
    "word " * 300,  # longer than max_seq_length: truncated the same way
    "Ünïcödé – text\twith\nbreaks",
]


def _save_st_folder(path, pooling: str = "mean", normalize: bool = True, max_seq_length: int = 32, lower=False):
    from conftest import make_tiny_bert, make_tiny_tokenizer
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    hf = path.parent / (path.name + "_hf")
    make_tiny_bert().model.save_pretrained(hf)
    make_tiny_tokenizer().save_pretrained(hf)
    first = Transformer(str(hf), max_seq_length=max_seq_length, do_lower_case=lower)
    modules = [first, Pooling(first.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def _st_reference(folder, mid_layer: bool) -> SentenceEmbedder:
    """The same embedder forced onto the sentence-transformers path."""
    ref = SentenceEmbedder(folder, mid_layer=mid_layer)
    model = ref._load_sentence_transformers(torch)
    ref._model, ref._dim = model, model.dim * (2 if mid_layer else 1)
    return ref


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mid_layer", [False, True])
def test_mean_pooled_folder_runs_directly_and_matches_sentence_transformers(tmp_path, mid_layer, normalize):
    folder = _save_st_folder(tmp_path / "st", normalize=normalize)
    direct = SentenceEmbedder(folder, mid_layer=mid_layer)
    assert isinstance(direct._load(), _MeanPooledEncoder)
    assert direct._load().max_length == 32  # from sentence_bert_config.json
    ref = _st_reference(folder, mid_layer)
    assert not isinstance(ref._model, _MeanPooledEncoder)
    a, b = direct.encode(TEXTS, batch_size=3), ref.encode(TEXTS, batch_size=3)
    assert a.shape == b.shape == (len(TEXTS), direct.dim)
    np.testing.assert_allclose(a, b, atol=2e-6)
    assert np.abs(a[0] - a[2]).max() > 1e-3  # distinct texts, distinct rows (not a degenerate match)


def test_lower_case_option_is_applied(tmp_path):
    folder = _save_st_folder(tmp_path / "st", lower=True)
    direct = SentenceEmbedder(folder)
    assert isinstance(direct._load(), _MeanPooledEncoder)
    np.testing.assert_allclose(direct.encode(["LEMON Tree"]), direct.encode(["lemon tree"]), atol=1e-7)
    np.testing.assert_allclose(direct.encode(TEXTS), _st_reference(folder, False).encode(TEXTS), atol=2e-6)


def test_plain_hugging_face_folder_is_mean_pooled_as_sentence_transformers_does(tmp_path):
    from conftest import make_tiny_bert, make_tiny_tokenizer

    folder = tmp_path / "hf"
    make_tiny_bert().model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    direct = SentenceEmbedder(folder, mid_layer=True)
    assert isinstance(direct._load(), _MeanPooledEncoder)
    np.testing.assert_allclose(direct.encode(TEXTS), _st_reference(folder, True).encode(TEXTS), atol=2e-6)


def test_other_pooling_falls_back_to_sentence_transformers(tmp_path):
    folder = _save_st_folder(tmp_path / "st", pooling="cls")
    e = SentenceEmbedder(folder)
    assert not isinstance(e._load(), _MeanPooledEncoder)
    rows = e.encode(TEXTS)
    assert rows.shape == (len(TEXTS), e.dim) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_direct_path_is_thread_safe(tmp_path):
    e = SentenceEmbedder(_save_st_folder(tmp_path / "st"), mid_layer=True)
    want = e.encode(TEXTS)
    got, errors = {}, []

    def work(i):
        try:
            got[i] = e.encode(TEXTS[i % 3 :] + TEXTS[: i % 3], batch_size=2)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, rows in got.items():
        np.testing.assert_allclose(rows, np.roll(want, -(i % 3), axis=0), atol=1e-6)


@pytest.mark.real_model
def test_default_routing_embedder_needs_no_sentence_transformers_import():
    code = (
        "import sys, numpy as np\n"
        "from promptbank.embed import ROUTING_EMBEDDER, SentenceEmbedder, _MeanPooledEncoder\n"
        "e = SentenceEmbedder(ROUTING_EMBEDDER)\n"
        "v = e.encode(['how do I reset my password', 'the stock market fell today'])\n"
        "assert isinstance(e._load(), _MeanPooledEncoder) and v.shape == (2, 768)\n"
        "print('sentence_transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.real_model
def test_default_routing_embedder_matches_sentence_transformers():
    from promptbank.embed import ROUTING_EMBEDDER

    e = SentenceEmbedder(ROUTING_EMBEDDER)
    ref = SentenceEmbedder(ROUTING_EMBEDDER)
    model = ref._load_sentence_transformers(torch)
    ref._model = model
    texts = [*TEXTS, ""]  # MiniLM's tokenizer adds [CLS] / [SEP]: an empty text still has tokens
    np.testing.assert_allclose(e.encode(texts), ref.encode(texts), atol=1e-6)


def _layer_means(folder, texts, layers):
    """Reference: the full model's hidden states, each layer mean-pooled and normalised, concatenated / sqrt(k)."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    b = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hs = model(**b, output_hidden_states=True).hidden_states
    m = b["attention_mask"][..., None].float()
    parts = [torch.nn.functional.normalize((hs[x] * m).sum(1) / m.sum(1), dim=-1) for x in layers]
    return (torch.cat(parts, -1) / np.sqrt(len(parts))).numpy()


def test_layers_spec_runs_only_the_layers_it_needs(tmp_path):
    """``+layers=2,1``: the mean-pooled states of layers 2 and 1 (of 3), from a model truncated to 2 layers (less
    compute and memory than the whole model), equal to the same layers of the full model; the name round-trips."""
    from promptbank.embed import load_embedder

    folder = _save_st_folder(tmp_path / "st")
    e = SentenceEmbedder(folder, layers=[2, 1])
    assert e.name == f"{folder}+layers=2,1" and load_embedder(e.name).name == e.name
    rows = e.encode(TEXTS, batch_size=3)
    assert e._load().n_layers == 2 and rows.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(rows, _layer_means(folder, TEXTS, [2, 1]), atol=2e-6)
    last = SentenceEmbedder(f"{folder}+layers=3")  # the last layer alone is the plain sentence embedding
    np.testing.assert_allclose(last.encode(TEXTS), SentenceEmbedder(folder).encode(TEXTS), atol=1e-6)


def test_layers_spec_errors(tmp_path):
    folder = _save_st_folder(tmp_path / "st")
    for bad in ([0], [1, 1], [], [True]):
        with pytest.raises(ValueError, match="layers"):
            SentenceEmbedder(folder, layers=bad)
    with pytest.raises(ValueError, match="not both"):
        SentenceEmbedder(folder, layers=[1], mid_layer=True)
    with pytest.raises(OSError, match="layer 4 asked for, but the model has 3 layers"):
        SentenceEmbedder(folder, layers=[4, 1]).encode(["x"])
    with pytest.raises(OSError, match="plain mean-pooled"):
        SentenceEmbedder(_save_st_folder(tmp_path / "cls", pooling="cls"), layers=[1]).encode(["x"])


def test_bank_with_a_layers_embedder_saves_and_loads(tmp_path, tiny_backbone):
    from conftest import fast_options

    from promptbank import PromptBank

    folder = _save_st_folder(tmp_path / "st")
    rows = [{"text": f"the weather is {w} today", "label": lab} for w, lab in [("sunny", "good"), ("awful", "bad")] * 4]
    bank = PromptBank(tiny_backbone, SentenceEmbedder(folder, layers=[2, 1]), routing="knn")
    bank.learn_task("weather", rows, num_virtual_tokens=3, **fast_options(max_steps=1))
    bank.save(tmp_path / "bank")
    loaded = PromptBank.load(tmp_path / "bank", backbone=tiny_backbone)
    assert loaded.embedder.name == bank.embedder.name and loaded.embedder.layers == [2, 1]
    assert loaded.route("the weather is sunny today").ranked == bank.route("the weather is sunny today").ranked


@pytest.mark.real_model
def test_fast_routing_embedder_on_the_real_model():
    """all-MiniLM-L6-v2+layers=3,2 (opt-in fast routing): half of MiniLM's layers, 768-d like the default."""
    e = SentenceEmbedder("all-MiniLM-L6-v2+layers=3,2")
    v = e.encode(["how do I reset my password", "I forgot my login password", "the stock market fell today"])
    assert e.dim == 768 and v.shape == (3, 768) and e._load().n_layers == 3
    assert v[0] @ v[1] > v[0] @ v[2]


_COMPILED_CHECK = """
import json, sys, threading
import numpy as np
from promptbank.embed import SentenceEmbedder
folder, texts = sys.argv[1], json.loads(sys.argv[2])
eager = SentenceEmbedder(folder, layers=[3, 1])
compiled = SentenceEmbedder(folder, layers=[3, 1], compile=True)
assert "compile=True" in repr(compiled) and compiled.name == eager.name  # same embeddings: same name, same keys
model = compiled._load()
assert model._one_row is not None and model._one_row[0] == (3, 1), "not compiled"
calls, fn = [], model._one_row[1]
model._one_row = ((3, 1), lambda **kw: calls.append(1) or fn(**kw))
want = {t: eager.encode([t]) for t in texts}
one = max(float(np.abs(compiled.encode([t]) - want[t]).max()) for t in texts)
n_one = len(calls)
batch = float(np.abs(compiled.encode(texts, batch_size=4) - eager.encode(texts, batch_size=4)).max())
got, errors = [], []
def work(i):  # concurrent one-text calls into the compiled forward
    try:
        for t in texts[i % 3 :] + texts[: i % 3]:
            got.append(float(np.abs(compiled.encode([t]) - want[t]).max()))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"one": one, "n_one": n_one, "n_after_batch": len(calls) - len(got), "batch": batch,
                  "threads": max(got), "n_threads": len(got), "errors": errors}))
"""


def test_compiled_one_text_forward_matches_eager(tmp_path):
    """``compile=True``: the one-text forward (one-query routing) runs torch.compile'd, with the same embeddings
    as the eager path, also from concurrent threads; batches stay eager; lower-casing is applied on both paths.
    In a fresh interpreter: compiling is process-wide state (and inductor's build can be broken by what an earlier
    test imported, which the next test covers: a warning and the eager path)."""
    import json

    folder = _save_st_folder(tmp_path / "st", lower=True)
    out = subprocess.run(
        [sys.executable, "-c", _COMPILED_CHECK, str(folder), json.dumps(TEXTS)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["one"] < 1e-5 and r["n_one"] == len(TEXTS)  # lengths other than the warm-up's: one dynamic graph
    assert r["batch"] < 1e-6 and r["n_after_batch"] == len(TEXTS)  # the batch did not go through it
    assert not r["errors"] and r["n_threads"] == 4 * len(TEXTS) and r["threads"] < 1e-5


def test_compile_failure_warns_and_runs_eagerly(tmp_path, monkeypatch):
    folder = _save_st_folder(tmp_path / "st")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    e = SentenceEmbedder(folder, compile=True)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        rows = e.encode(["the weather is sunny today"])
    assert e._load()._one_row is None
    np.testing.assert_allclose(rows, SentenceEmbedder(folder).encode(["the weather is sunny today"]), atol=1e-6)


def test_compile_option_errors(tmp_path):
    with pytest.raises(TypeError, match="compile must be a bool"):
        SentenceEmbedder("all-MiniLM-L6-v2", compile="yes")
    with pytest.raises(OSError, match="compile= needs a plain mean-pooled"):
        SentenceEmbedder(_save_st_folder(tmp_path / "cls", pooling="cls"), compile=True).encode(["x"])
