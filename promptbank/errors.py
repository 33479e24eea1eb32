"""Exceptions raised by promptbank. All derive from :class:`PromptBankError`."""

from __future__ import annotations


class PromptBankError(Exception):
    """Base class of every error promptbank raises on purpose."""


class DataError(PromptBankError, ValueError):
    """Task data is unusable. The message names the source (file or object) and the line/row."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(f"{where}{message}")
        self.source = source
        self.line = line


class TaskExistsError(PromptBankError, ValueError):
    """A task with this name is already in the bank."""


class TaskNotFoundError(PromptBankError, KeyError):
    """No task with this name is in the bank."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TrainingDivergedError(PromptBankError, RuntimeError):
    """The loss became NaN or infinite; the bank was left untouched."""


class BackboneMismatchError(PromptBankError):
    """A bank or soft prompt was made for a different backbone than the one given."""


class BankFormatError(PromptBankError):
    """A bank folder is missing, corrupt, or written in an unsupported format."""
