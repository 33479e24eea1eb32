"""Small bundled example tasks for ``promptbank``.

Four tiny text-classification tasks, written for this project, ship with the
package so that ``promptbank demo`` runs on a fresh machine without downloading
any data. Each task has ``<task>_train.jsonl`` (48 rows) and
``<task>_test.jsonl`` (40 rows), one ``{"text": ..., "label": ...}`` object per
line, balanced across labels. ``mixed_queries.jsonl`` holds 12
``{"text": ..., "task": <task name or null>}`` rows for the routing display.
See ``README.md`` in this folder for details.
"""

from __future__ import annotations

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent

EXAMPLE_TASKS: tuple[str, ...] = (
    "ticket_routing",
    "review_sentiment",
    "question_topic",
    "urgency",
)


def example_path(name: str) -> pathlib.Path:
    """Return the path of ``<name>.jsonl`` in this folder.

    ``name`` is a file stem such as ``"urgency_train"`` or ``"mixed_queries"``.
    Raises ``FileNotFoundError`` listing the available names if it is absent.
    """
    path = _HERE / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in _HERE.glob("*.jsonl"))
        raise FileNotFoundError(f"no example file {name!r} in {_HERE}; available: {', '.join(available)}")
    return path


__all__ = ["EXAMPLE_TASKS", "example_path"]
