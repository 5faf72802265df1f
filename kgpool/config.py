"""Settings: one frozen, validated object; defaults and help text live beside the fields."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LOG_FORMATS = ("text", "json")
CHANNELS = ("direct", "jupyter")
TRANSPORTS = ("auto", "ipc", "tcp")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Environment variables that hold secrets: never passed on to kernels, and kgpool re-executes
# itself without them (kgpool/secrets.py) so that its /proc/<pid>/environ does not show them.
SECRET_ENV = frozenset({"KGPOOL_AUTH_TOKEN", "KG_AUTH_TOKEN"})
# Not secret themselves, but no business of the kernels: where the token is, and kgpool's own
# hand-over descriptor across that re-exec.
HIDDEN_ENV = SECRET_ENV | {"KGPOOL_AUTH_TOKEN_FILE", "KGPOOL_HANDOVER_FD"}
TOKEN_FILE_LIMIT = 64 * 1024
_BASE_URL = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*/?\Z")


def _csv(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


_UNITS = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*\Z", re.IGNORECASE)


def parse_size(text: str, flag: str) -> int:
    """'512' (MiB), '512M', '1.5G', '2GiB', '300MB' (binary units all) -> bytes; '' -> 0."""
    if not text.strip():
        return 0
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"{flag} wants a size such as 512M or 2G, not {text!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"{flag} must be positive, not {text!r}")
    return size


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
    ready_kernels: int = _opt(
        0, "at start-up, /readyz turns 200 (and requests start being served) once this many "
        "kernels of each pool are warm; 0 means all of them")
    kernels_for: str = _opt("", "per-notebook kernel counts, NAME=N[,NAME=N...]")
    max_kernels: int = _opt(
        0, "let each pool grow up to this many kernels while requests wait, and shrink back "
        "to --kernels when idle (0: a fixed pool of --kernels)")
    scale_up_delay: float = _opt(
        0.1, "seconds a request waits for a kernel before the pool grows (so one spike does "
        "not start a crowd)")
    idle_timeout: float = _opt(
        60.0, "seconds a kernel beyond --kernels may stay idle before it retires")
    fork: bool = _opt(
        False, "Python notebooks: run the init cells once per notebook version in a template "
        "kernel that never serves, and fork the kernels that serve from it (they share its "
        "memory copy-on-write and start in milliseconds); needs the direct channel")
    fork_allow_threads: bool = _opt(
        False, "with --fork, serve even though the init cells left Python threads running "
        "(the forked kernels do not have them; by default kgpool refuses)")
    max_kernel_memory: str = _opt(
        "", "replace a kernel gracefully (as --max-requests does) once its private memory "
        "(not shared with other processes) passes this size: a number of MiB, or with a unit "
        "(K, M, G: KiB, MiB, GiB); empty disables")
    host: str = _opt("127.0.0.1", "address to listen on; * (or 0.0.0.0) for every interface")
    port: int = _opt(8888, "TCP port to listen on")
    kernel_name: str = _opt(
        "", "kernel spec to start (default: the notebook's kernelspec, else python3)"
    )
    strict: bool = _opt(
        False, "refuse notebooks with doubtful cells (an annotation that almost parses, a path "
        "with spaces, two spellings of one route) instead of serving them with a warning")
    comment_prefix: str = _opt(
        "", "extra annotation comment prefixes by notebook language, LANG=PREFIX[,...] "
        "(Kernel Gateway's comment_prefix), e.g. python=##")
    base_url: str = _opt(
        "/", "serve everything (endpoints, index, /healthz, /readyz, /metrics, specs) under "
        "this path prefix, e.g. /v1 behind a proxy")
    static_path: str = _opt(
        "", "serve the files of this folder under /public/ (Kernel Gateway's static_path)")
    allow_notebook_download: bool = _opt(
        False, "serve each notebook's .ipynb file at /_api/source (behind the token, if set)")
    trust_xheaders: bool = _opt(
        False, "behind a proxy: log the client address from X-Forwarded-For / X-Real-IP")
    certfile: str = _opt("", "TLS: certificate file (PEM); serve HTTPS")
    keyfile: str = _opt("", "TLS: private key file (PEM), if not in the certificate file")
    client_ca: str = _opt("", "TLS: require client certificates signed by this CA file")
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
    warmup_concurrency: int = _opt(
        0, "kernels warmed at once, across all notebooks (0: two per CPU, at least 4), so a "
        "crash loop cannot start every kernel at once on a small machine")
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
        "prefer --auth-token-file (see README: what notebook code can and cannot see)",
        secret=True)
    auth_token_file: str = _opt(
        "", "read the token from this file once at start-up (one line; a trailing newline is "
        "dropped); kgpool then keeps notebook code from reading the file where Linux allows")
    metrics_auth: bool = _opt(False, "require the token on /metrics too")
    max_response_size: int = _opt(
        64 * 1024 * 1024, "largest answer in bytes (characters of output); a cell that prints "
        "more gets a 500 that says so, and its kernel is kept (0: no limit)")
    max_body_size: int = _opt(
        10 * 1024 * 1024, "largest request body in bytes; larger ones get 413 before a kernel "
        "is involved")
    body_timeout: float = _opt(
        60.0, "seconds a client may take to send a request body once its headers are in; "
        "past it 408 and the connection is closed, before any kernel is involved (0 disables)")
    header_timeout: float = _opt(
        20.0, "seconds a client may take to send a request's line and headers (from the "
        "connection's start, or from the first byte of a later request on it); past it the "
        "connection is closed (0 disables)")
    keepalive_timeout: float = _opt(
        75.0, "seconds an idle keep-alive connection stays open; behind a load balancer, set "
        "it above the balancer's own idle timeout")
    max_connections: int = _opt(
        1000, "open client connections at most; beyond it an idle keep-alive connection is "
        "closed to make room, or the new one gets 503 at once (0: no limit)")
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
    kernel_env: Mapping[str, str] = field(
        default_factory=lambda: dict(os.environ), compare=False,
        metadata={"cli": False, "help": "environment the kernels start with (secrets removed)"})

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
                     "max_response_size", "warmup_concurrency", "max_kernels",
                     "scale_up_delay", "max_requests_jitter", "max_age", "body_timeout",
                     "header_timeout", "keepalive_timeout", "max_connections"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must not be negative, not {getattr(self, name)}")
        if self.idle_timeout <= 0:
            raise ConfigError(f"--idle-timeout must be positive, not {self.idle_timeout}")
        if self.init_timeout <= 0:
            raise ConfigError(f"--init-timeout must be positive, not {self.init_timeout}")
        if self.channel not in CHANNELS:
            raise ConfigError(f"--channel must be one of {', '.join(CHANNELS)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be one of {', '.join(TRANSPORTS)}")
        if self.fork and self.channel != "direct":
            raise ConfigError("--fork serves through the direct channel: it cannot be combined "
                              f"with --channel {self.channel}")
        _ = self.kernel_memory_limit  # validates the size
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.ready_kernels < 0:
            raise ConfigError(f"--ready-kernels must not be negative, not {self.ready_kernels}")
        if not _BASE_URL.match(self.base_url) or not self.base_url.startswith("/"):
            raise ConfigError(f"--base-url must be a path such as /v1, not {self.base_url!r}")
        if self.keyfile and not self.certfile:
            raise ConfigError("--keyfile needs --certfile")
        if self.client_ca and not self.certfile:
            raise ConfigError("--client-ca needs --certfile (client certificates need TLS)")
        _ = self.comment_prefixes  # validates the syntax
        if self.auth_token_file and not self.auth_token:
            object.__setattr__(self, "auth_token", read_token_file(self.auth_token_file))
        env = {k: v for k, v in self.kernel_env.items() if k not in HIDDEN_ENV}
        object.__setattr__(self, "kernel_env", env)

    @property
    def kernel_memory_limit(self) -> int:
        """--max-kernel-memory in bytes; 0 when disabled."""
        return parse_size(self.max_kernel_memory, "--max-kernel-memory")

    @property
    def warmup_limit(self) -> int:
        return self.warmup_concurrency or max(4, 2 * (os.cpu_count() or 1))

    @property
    def prefix(self) -> str:
        """base_url without its trailing slash: "" at the root, else "/v1"."""
        return self.base_url.rstrip("/")

    @property
    def comment_prefixes(self) -> dict[str, str]:
        prefixes = {}
        for item in _csv(self.comment_prefix):
            language, eq, prefix = item.partition("=")
            if not eq or not language.strip() or not prefix.strip():
                raise ConfigError(f"--comment-prefix wants LANG=PREFIX, not {item!r}")
            prefixes[language.strip().lower()] = prefix.strip()
        return prefixes

    @property
    def origins(self) -> frozenset[str]:
        return _csv(self.allow_origin)

    @property
    def request_timeout(self) -> float | None:
        """The per-request deadline in seconds, or None when disabled."""
        return self.timeout or None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def read_token_file(path: str) -> str:
    """The token in `path`: read once, the file closed at once, one trailing newline dropped."""
    try:
        with open(path, "rb") as file:
            data = file.read(TOKEN_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"--auth-token-file {path}: cannot read it: {exc.strerror}") from None
    if len(data) > TOKEN_FILE_LIMIT:
        raise ConfigError(f"--auth-token-file {path}: larger than {TOKEN_FILE_LIMIT} bytes; "
                          "it should hold the token alone")
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    try:
        token = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--auth-token-file {path}: not UTF-8 text") from None
    if not token:
        raise ConfigError(f"--auth-token-file {path}: the file is empty")
    if token != token.strip() or not token.isprintable():
        raise ConfigError(f"--auth-token-file {path}: the token must be one line, without "
                          "control characters or leading and trailing whitespace")
    return token
