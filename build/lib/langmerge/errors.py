"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""


class LangmergeError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(LangmergeError):
    """A recipe or merge config is invalid or asks for something unsupported."""


class InputError(LangmergeError):
    """An input model, adapter or tensor is missing, corrupt or incompatible."""


class OutputExistsError(LangmergeError):
    """The output path exists and `--force` was not given."""


class TrainingFailed(LangmergeError):
    """A model learned nothing (its health check failed): reported and recorded, not used."""
