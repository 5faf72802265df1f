"""Settings: one frozen, validated object; defaults and help text live beside the fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

LOG_FORMATS = ("text", "json")
CHANNELS = ("direct", "jupyter")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything `kgpool serve` can be told; built once by the CLI (or a test)."""

    notebook: Path = _opt(Path(), "the notebook (.ipynb) to serve", positional=True)
    kernels: int = _opt(1, "number of warm kernels in the pool")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8888, "TCP port to listen on")
    kernel_name: str = _opt(
        "", "kernel spec to start (default: the notebook's kernelspec, else python3)"
    )
    timeout: float = _opt(
        30.0, "deadline per request in seconds, queue wait included (0 disables)"
    )
    max_queue: int = _opt(
        100, "requests allowed to wait for a kernel; beyond it 503 (0 disables waiting)"
    )
    max_requests: int = _opt(
        0, "retire a kernel after this many requests, to bound memory (0 disables)"
    )
    max_requests_jitter: int = _opt(
        0, "add a random 0..N to --max-requests per kernel so they do not all retire together"
    )
    shutdown_timeout: float = _opt(
        30.0, "on SIGTERM/SIGINT, seconds to let queued and running requests finish"
    )
    init_timeout: float = _opt(
        120.0, "seconds a kernel may take to start and run the init cells"
    )
    channel: str = _opt(
        "direct", "how requests reach Python kernels: direct (endpoint cells compiled at "
        "warm-up, called over a private socket) or jupyter (one execute_request each)",
        choices=CHANNELS)
    log_format: str = _opt("text", "log line format: text or json", choices=LOG_FORMATS)
    log_level: str = _opt("info", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if self.kernels < 1:
            raise ConfigError(f"--kernels must be at least 1, not {self.kernels}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, not {self.port}")
        for name in ("timeout", "shutdown_timeout", "max_queue", "max_requests",
                     "max_requests_jitter"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must not be negative, not {getattr(self, name)}")
        if self.init_timeout <= 0:
            raise ConfigError(f"--init-timeout must be positive, not {self.init_timeout}")
        if self.channel not in CHANNELS:
            raise ConfigError(f"--channel must be one of {', '.join(CHANNELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")

    @property
    def request_timeout(self) -> float | None:
        """The per-request deadline in seconds, or None when disabled."""
        return self.timeout or None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
