"""Settings: one frozen, validated object; defaults and help text live beside the fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LOG_FORMATS = ("text", "json")
CHANNELS = ("direct", "jupyter")
TRANSPORTS = ("auto", "ipc", "tcp")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _csv(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything `kgpool serve` can be told; built once by the CLI (or a test)."""

    notebooks: tuple[str, ...] = _opt(
        (), "notebooks to serve: files, folders of .ipynb files, or FILE=/prefix; with several "
        "notebooks each is served under /<its name> unless given a prefix", positional=True,
        env="KGPOOL_NOTEBOOK")
    kernels: int = _opt(1, "number of warm kernels in each notebook's pool")
    kernels_for: str = _opt("", "per-notebook kernel counts, NAME=N[,NAME=N...]")
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
    transport: str = _opt(
        "auto", "how kgpool connects to its kernels: ipc (Unix sockets in a private folder), "
        "tcp (loopback ports, what every kernel supports) or auto (ipc for the languages whose "
        "kernels are known to support it, tcp for the others)", choices=TRANSPORTS)
    allow_unverified_language: bool = _opt(
        False, "serve a kernel whose language has no REQUEST binding proven inert by kgpool's "
        "tests (Kernel Gateway's REQUEST = \"...\" may let request bytes run as code there); "
        "logs a warning")
    auth_token: str = _opt(
        "", "require 'Authorization: Bearer TOKEN' (or 'token TOKEN') on endpoint requests; "
        "prefer the environment variable, which keeps the token out of ps", secret=True)
    metrics_auth: bool = _opt(False, "require the token on /metrics too")
    max_body_size: int = _opt(
        10 * 1024 * 1024, "largest request body in bytes; larger ones get 413 before a kernel "
        "is involved")
    allow_origin: str = _opt(
        "", "CORS: origins allowed to call from a browser, comma-separated, or * (none if empty)")
    allow_methods: str = _opt(
        "GET,POST,PUT,DELETE,PATCH", "CORS: methods a browser may use")
    allow_headers: str = _opt(
        "Content-Type,Authorization,X-Request-ID", "CORS: request headers a browser may send "
        "(replaces the default list: keep Content-Type for JSON bodies)")
    expose_headers: str = _opt("X-Request-ID", "CORS: response headers a browser may read")
    max_age: int = _opt(600, "CORS: seconds a browser may cache a preflight answer")
    allow_credentials: bool = _opt(False, "CORS: let browsers send cookies/credentials")
    expose_traceback: bool = _opt(
        False, "include the cell's traceback in 500 answers (debugging only: it shows code)")
    reload: bool = _opt(True, "reload a notebook when its file changes (also on SIGHUP): a new "
                        "pool is warmed and swapped in; a broken version is refused")
    log_format: str = _opt("text", "log line format: text or json", choices=LOG_FORMATS)
    log_level: str = _opt("info", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if self.kernels < 1:
            raise ConfigError(f"--kernels must be at least 1, not {self.kernels}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, not {self.port}")
        if self.max_body_size < 1:
            raise ConfigError(f"--max-body-size must be at least 1, not {self.max_body_size}")
        if self.allow_credentials and "*" in self.origins:
            raise ConfigError("--allow-credentials needs explicit origins, not *")
        for name in ("timeout", "shutdown_timeout", "max_queue", "max_requests",
                     "max_requests_jitter", "max_age"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must not be negative, not {getattr(self, name)}")
        if self.init_timeout <= 0:
            raise ConfigError(f"--init-timeout must be positive, not {self.init_timeout}")
        if self.channel not in CHANNELS:
            raise ConfigError(f"--channel must be one of {', '.join(CHANNELS)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be one of {', '.join(TRANSPORTS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")

    @property
    def origins(self) -> frozenset[str]:
        return _csv(self.allow_origin)

    @property
    def request_timeout(self) -> float | None:
        """The per-request deadline in seconds, or None when disabled."""
        return self.timeout or None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
