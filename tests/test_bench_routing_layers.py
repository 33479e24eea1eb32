"""benchmarks/routing_layers.py end to end on a tiny mean-pooled BERT folder and tiny fake dataset folders (the CI
slice of the benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forgetting  # noqa: E402
import routing_layers  # noqa: E402
from test_embed_direct import _save_st_folder  # noqa: E402


def test_quick_run_measures_every_layer_variant_and_latency(tmp_path):
    data = tmp_path / "data"
    names = dict.fromkeys(list(forgetting.TASKS) + forgetting.STREAMS["long"]["L1"][:4])
    for short in names:
        folder, pool_file, test_file, _ = forgetting.DATASETS[short]
        labels = [f"{short}_a", f"{short}_b"]
        (data / folder).mkdir(parents=True, exist_ok=True)
        (data / folder / "labels.json").write_text(json.dumps({"labels": labels}))
        for fname in {pool_file, test_file} - {None}:
            rows = [{"text": f"{short} {lab} text number {k}", "label": lab} for lab in labels for k in range(10)]
            (data / folder / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "clinc150").mkdir(exist_ok=True)
    (data / "clinc150" / "oos_test.jsonl").write_text(
        "".join(json.dumps({"text": f"query {k}", "label": "oos"}) + "\n" for k in range(5))
    )
    model = _save_st_folder(tmp_path / "st")
    out = tmp_path / "layers.json"
    res = routing_layers.main(
        ["--quick", "--data", str(data), "--model", str(model), "--out", str(out), "--query-dtype", "bfloat16"]
    )
    assert json.loads(out.read_text())["n_layers"] == 3
    for set_name in ("cl4", "long"):
        got = res["accuracy"][set_name]
        assert "+layers=4,2" not in got  # beyond the 3-layer model: skipped
        assert got["default (+mid: L, L/2)"]["layers"] == [3, 1] and got["+layers=3,2"]["layers"] == [3, 2]
        for row in got.values():
            assert 0.0 <= row["hit@1"] <= row["top1"] <= 1.0 and row["queries"] == 4 * 2 * 4
    lat = res["latency"]
    assert set(lat) == {"default (+mid)", "+layers=3,2", "ratio_p50_fast_vs_default"}
    assert lat["+layers=3,2"]["n"] == 5 and lat["ratio_p50_fast_vs_default"] > 0
    low = res["accuracy_bfloat16_queries"]  # the same keys and queries, the queries embedded with bf16 weights
    for set_name in ("cl4", "long"):
        assert set(low[set_name]) == set(res["accuracy"][set_name])
        for row in low[set_name].values():
            assert 0.0 <= row["hit@1"] <= row["top1"] <= 1.0 and row["queries"] == 4 * 2 * 4
