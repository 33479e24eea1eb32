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


class VariantExistsError(TaskExistsError):
    """The task already has a prompt variant with this name."""


class VariantNotFoundError(TaskNotFoundError):
    """The task has no prompt variant with this name."""


class ResumeError(PromptBankError, ValueError):
    """A task cannot resume training: it has no stored train state, or the state does not fit its prompt config."""


class TaskChangedError(PromptBankError, RuntimeError):
    """The task was replaced or removed by another writer while it was being trained; nothing was stored."""


class AdapterError(PromptBankError, ValueError):
    """A PEFT adapter folder cannot be imported: missing or pickle-only files, an unsupported PEFT type, or a
    shape that does not fit the bank's backbone. The message names the file and the offending value."""
