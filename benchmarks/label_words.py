"""Do label words (a verbalizer) help a causal-LM classification task whose labels are codes? A held-out study,
no test sets.

For each dataset, method, seed and setting, the same sampling as ``benchmarks/objective.py`` (``per_class``
training rows and 20 held-out rows per label, disjoint, from the dataset's TRAIN pool); ``learn_task`` on the
default backbone (SmolLM2-135M) at library defaults except ``max_steps`` (80), ``patience=3`` and no warm start,
once with the labels as the data spells them (``labels``) and once with ``label_words`` (``words``); then the
held-out accuracy with the task given (predictions are the labels either way).

The words are the datasets' documented meanings of their codes, fixed before any run: TREC's coarse classes as
Li & Roth (2002) name them (``promptbank.demo.TREC_WORDS``, what the real-data demo uses), and for 1-5 star reviews the verbalizer of LM-BFF (Gao et al., 2021) for SST-5 and
Yelp. A dataset without an entry here cannot be run.

    python benchmarks/label_words.py --datasets trec --methods deep --seeds 0,1,2 --out a.json
    python benchmarks/label_words.py --merge a.json b.json --out benchmarks/results/label_words.json

Prints a markdown table (mean held-out accuracy per dataset and method with and without the words, and on how
many seeds the words did better / worse) and writes JSON (config, versions, words, every run).
"""

from __future__ import annotations

from bench_common import mean
from objective import learn_and_score, run_record, run_study, seed_groups, study_parser

from promptbank.demo import TREC_WORDS

STARS = {"1": "terrible", "2": "bad", "3": "okay", "4": "good", "5": "great"}
LABEL_WORDS: dict[str, dict[str, str]] = {
    "trec": TREC_WORDS,
    "amazon_reviews": STARS,
    "yelp_reviews": STARS,
}
SETTINGS = ("labels", "words")


def run_one(bank, pool, name: str, method: str, setting: str, seed: int, per_class: int, steps: int) -> dict:
    """One learn_task with (``words``) or without (``labels``) the dataset's label words + held-out accuracy."""
    if name not in LABEL_WORDS:
        raise SystemExit(f"no label words for {name!r}; this study knows {', '.join(LABEL_WORDS)}")
    words = LABEL_WORDS[name] if setting == "words" else None
    scored = learn_and_score(bank, pool, method, seed, per_class, steps, label_words=words)
    return run_record(name, method, "words", setting, seed, pool, scored)


def summary(runs: list[dict]) -> list[dict]:
    """Per (dataset, method): mean held-out accuracy with and without the words over the seeds where both ran,
    and the per-seed differences."""
    out = []
    for row, by_setting in seed_groups(runs, "words"):
        if set(by_setting) != set(SETTINGS):
            continue
        seeds = row["seeds"]
        for s in SETTINGS:
            row[s] = 100 * mean([by_setting[s][seed]["held_out_accuracy"] for seed in seeds])
        row["per_seed_difference"] = [
            100 * (by_setting["words"][seed]["held_out_accuracy"] - by_setting["labels"][seed]["held_out_accuracy"])
            for seed in seeds
        ]
        out.append(row)
    return sorted(out, key=lambda r: (r["method"], r["dataset"]))


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | method | labels | seeds | labels as given | label words | difference (per seed) |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        diffs = ", ".join(f"{d:+.1f}" for d in r["per_seed_difference"])
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['n_labels']} | {','.join(map(str, r['seeds']))} | "
            f"{r['labels']:.1f} | {r['words']:.1f} | {r['words'] - r['labels']:+.1f} ({diffs}) |"
        )
    if rows:
        d = [x for r in rows for x in r["per_seed_difference"]]
        lines.append(
            f"\nover {len(d)} paired runs: mean difference {mean(d):+.1f} points, words better on "
            f"{sum(x > 0 for x in d)}, worse on {sum(x < 0 for x in d)}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = study_parser(__doc__, ",".join(LABEL_WORDS), "deep")
    ap.set_defaults(label_words=LABEL_WORDS)  # recorded in the result's config
    args = ap.parse_args()
    run_study(args, "words", list(SETTINGS), run_one, "label_words", summary, table)


if __name__ == "__main__":
    main()
