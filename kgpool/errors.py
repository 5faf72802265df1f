"""The exception tree shared by every layer; HTTP statuses are chosen only in web.py."""

from __future__ import annotations


class KgpoolError(Exception):
    """Base of every error kgpool raises on purpose."""


class NotebookError(KgpoolError):
    """The notebook cannot be read or serves no endpoint."""


class ConfigError(KgpoolError):
    """A setting has a value kgpool cannot use."""


class KernelError(KgpoolError):
    """A kernel could not be started or talked to."""


class KernelDied(KernelError):
    """The kernel process exited while kgpool was waiting on it."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ExecutionError(KgpoolError):
    """Code sent to a kernel raised; carries the kernel's own error fields."""

    def __init__(self, ename: str, evalue: str, traceback: list[str] | None = None,
                 cell: str = "") -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback or []
        self.cell = cell  # which notebook cell(s) raised: `cell 4 ('# GET /x')`


class InitError(KgpoolError):
    """An init cell failed while a kernel was being warmed; the message names the cell."""


class ExecutionTimeout(KgpoolError, TimeoutError):
    """A request's deadline passed, while queued or while running."""


class PoolClosed(KgpoolError):
    """The pool is draining or closed and takes no new work."""


class PoolUnavailable(KgpoolError):
    """No warm kernel exists and replacements keep failing."""


class EndpointRemoved(KgpoolError):
    """A request waited for an endpoint that a reload took away."""


class QueueFull(KgpoolError):
    """The bounded queue of waiting requests is full."""


class ResponseTooLarge(KgpoolError):
    """A cell's answer is larger than --max-response-size."""


class BatchError(KgpoolError):
    """A batched cell's answers do not fit its batch (count, shape)."""


class ResponseInfoError(KgpoolError):
    """A ResponseInfo cell produced something that is not a usable status/headers object."""
