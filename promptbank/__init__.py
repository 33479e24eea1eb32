"""promptbank: continual learning with soft prompts on one frozen language model.

>>> from promptbank import PromptBank
>>> bank = PromptBank.from_pretrained()
>>> bank.learn_task("tickets", "tickets.jsonl")
>>> bank.predict(["I was charged twice"])   # routed to the right soft prompt, no task id needed
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbone import Backbone, load_backbone
from .bank import Prediction, PromptBank, Routing, TaskRecord
from .config import Method, PromptConfig, TrainConfig
from .errors import (
    BackboneMismatchError,
    BankFormatError,
    DataError,
    PromptBankError,
    TaskExistsError,
    TaskNotFoundError,
    TrainingDivergedError,
)
from .tasks import TaskData, load_task_data

__all__ = [
    "Backbone",
    "BackboneMismatchError",
    "BankFormatError",
    "DataError",
    "Method",
    "Prediction",
    "PromptBank",
    "PromptBankError",
    "PromptConfig",
    "Routing",
    "TaskData",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskRecord",
    "TrainConfig",
    "TrainingDivergedError",
    "load_backbone",
    "load_task_data",
]
