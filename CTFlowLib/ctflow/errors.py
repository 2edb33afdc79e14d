"""Errors a user can act on. Each message says what went wrong and what to do about it."""


class CTFlowError(Exception):
    """Base class: the command line prints these as one line, without a traceback."""


class ReportError(CTFlowError, ValueError):
    """The report cannot be used as a prompt (empty, not text, ...)."""


class RequestError(CTFlowError, ValueError):
    """A generation option is out of range (slice count, steps, guidance, ...)."""


class ModelError(CTFlowError):
    """A model folder or hub id cannot be found, read or trusted."""


class CorruptModelError(ModelError):
    """A model file does not match the checksum in its manifest, or cannot be parsed."""


class DeviceError(CTFlowError):
    """The requested device is not available, or ran out of memory."""


class OutOfMemory(DeviceError):
    """The device ran out of memory: a smaller request, or another device, may fit."""


class OutputExistsError(CTFlowError, FileExistsError):
    """Refusing to overwrite a file the user already has."""


def first_line(exc: BaseException) -> str:
    """What a third-party exception says, in one line for a one-line message (its type when it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
