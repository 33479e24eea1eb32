"""promptbank: continual learning with soft prompts on one frozen language model.

>>> from promptbank import PromptBank
>>> bank = PromptBank.from_pretrained()
>>> bank.learn_task("tickets", "tickets.jsonl")
>>> bank.predict(["I was charged twice"])   # routed to the right soft prompt, no task id needed

Names are imported lazily so that ``import promptbank`` (and ``promptbank --help``) stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterError": "errors",
    "Backbone": "backbone",
    "BackboneMismatchError": "errors",
    "BankFormatError": "errors",
    "DataError": "errors",
    "Method": "config",
    "Prediction": "bank",
    "PromptBank": "bank",
    "PromptBankError": "errors",
    "PromptConfig": "config",
    "ResumeError": "errors",
    "Routing": "bank",
    "TaskData": "tasks",
    "TaskChangedError": "errors",
    "TaskExistsError": "errors",
    "TaskNotFoundError": "errors",
    "TaskRecord": "bank",
    "TrainConfig": "config",
    "TrainingDivergedError": "errors",
    "VariantExistsError": "errors",
    "VariantNotFoundError": "errors",
    "load_backbone": "backbone",
    "load_task_data": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'promptbank' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .backbone import Backbone, load_backbone
    from .bank import Prediction, PromptBank, Routing, TaskRecord
    from .config import Method, PromptConfig, TrainConfig
    from .errors import (
        AdapterError,
        BackboneMismatchError,
        BankFormatError,
        DataError,
        PromptBankError,
        ResumeError,
        TaskChangedError,
        TaskExistsError,
        TaskNotFoundError,
        TrainingDivergedError,
        VariantExistsError,
        VariantNotFoundError,
    )
    from .tasks import TaskData, load_task_data
