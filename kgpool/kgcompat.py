"""Kernel Gateway's command line, KG_* environment and config file -> kgpool settings.

A deployment that runs `jupyter kernelgateway --KernelGatewayApp.api=kernel_gateway.notebook_http
--KernelGatewayApp.seed_uri=...` moves to kgpool by changing the program name. Options are read
the way Kernel Gateway reads them (traitlets' command-line and config-file loaders, the Jupyter
config path, `--config`); precedence is Kernel Gateway's: command line, then config file, then
KG_* variables. Each option becomes a kgpool setting, or is reported: ignored (with the reason)
when it has no effect on a notebook-http server, refused when kgpool cannot do what it asks.
"""

from __future__ import annotations

import ast
import logging
import os
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode
from traitlets.config import Config, Configurable

from .errors import ConfigError

OPTION_CLASSES = ("KernelGatewayApp", "NotebookHTTPPersonality", "JupyterApp", "Application")
# Kernel Gateway's short options (its aliases and Jupyter's flags); kgpool serve has its own.
SHORT_OPTIONS = ("--ip", "--port", "--port_retries", "--api", "--seed_uri", "--keyfile",
                 "--certfile", "--client-ca", "--ssl_version", "--debug", "--config",
                 "--log-level", "--generate-config", "--y")
NOTEBOOK_HTTP_APIS = frozenset({"kernel_gateway.notebook_http", "notebook-http"})
SWAGGER_PARSER = "kernel_gateway.notebook_http.swagger.parser"
DEFAULT_PARSER = "kernel_gateway.notebook_http.cell.parser"
_LOG_LEVELS = {0: "debug", 10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical",
               "DEBUG": "debug", "INFO": "info", "WARN": "warning", "WARNING": "warning",
               "ERROR": "error", "CRITICAL": "critical"}


def is_kernel_gateway_argv(argv: Sequence[str]) -> bool:
    """True for a Kernel Gateway command line (no kgpool subcommand, KG-style options)."""
    if not argv:
        return True
    first = argv[0].split("=", 1)[0]
    return first.startswith(tuple(f"--{cls}." for cls in OPTION_CLASSES)) or \
        first in SHORT_OPTIONS


class GatewayOptions(JupyterApp):
    """Kernel Gateway's options, by its names and types, read by traitlets as it reads them."""

    name = "jupyter-kernel-gateway"  # -> jupyter_kernel_gateway_config.py on the config path
    aliases = {**base_aliases, "ip": "KernelGatewayApp.ip", "port": "KernelGatewayApp.port",
               "port_retries": "KernelGatewayApp.port_retries",
               "api": "KernelGatewayApp.api", "seed_uri": "KernelGatewayApp.seed_uri",
               "keyfile": "KernelGatewayApp.keyfile", "certfile": "KernelGatewayApp.certfile",
               "client-ca": "KernelGatewayApp.client_ca",
               "ssl_version": "KernelGatewayApp.ssl_version"}


class KernelGatewayApp(Configurable):
    port = Integer(config=True)
    port_retries = Integer(config=True)
    ip = Unicode(config=True)
    base_url = Unicode(config=True)
    auth_token = Unicode(config=True)
    allow_credentials = Unicode(config=True)
    allow_headers = Unicode(config=True)
    allow_methods = Unicode(config=True)
    allow_origin = Unicode(config=True)
    expose_headers = Unicode(config=True)
    trust_xheaders = Bool(config=True)
    max_age = Unicode(config=True)
    max_kernels = Integer(None, allow_none=True, config=True)
    seed_uri = Unicode(None, allow_none=True, config=True)
    prespawn_count = Integer(None, allow_none=True, config=True)
    default_kernel_name = Unicode(config=True)
    force_kernel_name = Unicode(config=True)
    env_process_whitelist: List[str] = List(config=True)
    api = Unicode(config=True)
    certfile = Unicode(None, allow_none=True, config=True)
    keyfile = Unicode(None, allow_none=True, config=True)
    client_ca = Unicode(None, allow_none=True, config=True)
    ssl_version = Integer(None, allow_none=True, config=True)
    cookie_secret_file = Unicode(config=True)
    cookie_secret = Unicode(config=True)
    ws_ping_interval = Integer(config=True)
    log_level = Unicode(config=True)
    kernel_spec_manager_class = Unicode(config=True)
    kernel_manager_class = Unicode(config=True)
    kernel_websocket_connection_class = Unicode(config=True)
    authorizer_class = Unicode(config=True)
    identity_provider_class = Unicode(config=True)


class NotebookHTTPPersonality(Configurable):
    cell_parser = Unicode(config=True)
    comment_prefix = Dict(config=True)
    allow_notebook_download = Bool(config=True)
    static_path = Unicode(None, allow_none=True, config=True)


def _flag(text: str) -> bool:
    return text.strip().lower() == "true"


# KG_* variables: the trait each sets when nothing else does, parsed as Kernel Gateway does.
ENVIRONMENT: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "KG_PORT": ("KernelGatewayApp", "port", int),
    "KG_PORT_RETRIES": ("KernelGatewayApp", "port_retries", int),
    "KG_IP": ("KernelGatewayApp", "ip", str),
    "KG_BASE_URL": ("KernelGatewayApp", "base_url", str),
    "KG_AUTH_TOKEN": ("KernelGatewayApp", "auth_token", str),
    "KG_ALLOW_CREDENTIALS": ("KernelGatewayApp", "allow_credentials", str),
    "KG_ALLOW_HEADERS": ("KernelGatewayApp", "allow_headers", str),
    "KG_ALLOW_METHODS": ("KernelGatewayApp", "allow_methods", str),
    "KG_ALLOW_ORIGIN": ("KernelGatewayApp", "allow_origin", str),
    "KG_EXPOSE_HEADERS": ("KernelGatewayApp", "expose_headers", str),
    "KG_TRUST_XHEADERS": ("KernelGatewayApp", "trust_xheaders", _flag),
    "KG_MAX_AGE": ("KernelGatewayApp", "max_age", str),
    "KG_MAX_KERNELS": ("KernelGatewayApp", "max_kernels", int),
    "KG_SEED_URI": ("KernelGatewayApp", "seed_uri", str),
    "KG_PRESPAWN_COUNT": ("KernelGatewayApp", "prespawn_count", int),
    "KG_DEFAULT_KERNEL_NAME": ("KernelGatewayApp", "default_kernel_name", str),
    "KG_FORCE_KERNEL_NAME": ("KernelGatewayApp", "force_kernel_name", str),
    "KG_ENV_PROCESS_WHITELIST": ("KernelGatewayApp", "env_process_whitelist",
                                 lambda v: [x for x in v.split(",") if x]),
    "KG_API": ("KernelGatewayApp", "api", str),
    "KG_CERTFILE": ("KernelGatewayApp", "certfile", str),
    "KG_KEYFILE": ("KernelGatewayApp", "keyfile", str),
    "KG_CLIENT_CA": ("KernelGatewayApp", "client_ca", str),
    "KG_SSL_VERSION": ("KernelGatewayApp", "ssl_version", int),
    "KG_WS_PING_INTERVAL_SECS": ("KernelGatewayApp", "ws_ping_interval", int),
    "KG_CELL_PARSER": ("NotebookHTTPPersonality", "cell_parser", str),
    "KG_ALLOW_NOTEBOOK_DOWNLOAD": ("NotebookHTTPPersonality", "allow_notebook_download",
                                   lambda v: v == "True"),
    "KG_STATIC_PATH": ("NotebookHTTPPersonality", "static_path", str),
}

# Options that change nothing on a notebook-http server, with what kgpool does instead.
IGNORED = {
    "port_retries": "kgpool never moves to another port: a busy port stops it with an error",
    "default_kernel_name": "no effect in notebook-http mode: the notebook's kernelspec (or "
                           "force_kernel_name) picks the kernel",
    "env_process_whitelist": "no effect in notebook-http mode: kernels inherit the server's "
                             "environment (kgpool removes its secrets)",
    "ssl_version": "kgpool negotiates TLS 1.2 or newer",
    "cookie_secret": "websocket mode only", "cookie_secret_file": "websocket mode only",
    "ws_ping_interval": "websocket mode only",
    "answer_yes": "kgpool asks no questions",
}
PLUGIN_CLASSES = frozenset({"kernel_spec_manager_class", "kernel_manager_class",
                            "kernel_websocket_connection_class", "authorizer_class",
                            "identity_provider_class"})


@dataclass
class Translation:
    """kgpool settings (Settings field -> value) and what the log should say about the rest."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def translate(argv: Sequence[str], environ: Mapping[str, str]) -> Translation:
    """Kernel Gateway's options -> kgpool settings; ConfigError for what kgpool cannot do."""
    config, app = _load(argv, environ)
    if app.generate_config:
        raise ConfigError("--generate-config is Kernel Gateway's; kgpool reads the same "
                          "jupyter_kernel_gateway_config.py, so keep generating it with "
                          "`jupyter kernelgateway --generate-config`")
    out = Translation()
    with warnings.catch_warnings():  # unknown options: reported below, with what to do
        warnings.simplefilter("ignore")
        try:
            gateway = KernelGatewayApp(config=config)
            personality = NotebookHTTPPersonality(config=config)
        except (TraitError, ValueError) as exc:  # a value of the wrong type, given twice...
            raise ConfigError(f"bad Kernel Gateway option: {exc}") from None
    for section, options in config.items():
        for name in options:
            _take(section, name, gateway, personality, out)
    if "notebooks" not in out.values:
        raise ConfigError("no notebook to serve: set --KernelGatewayApp.seed_uri (or "
                          "KG_SEED_URI), or use `kgpool serve NOTEBOOK`")
    return out


def _load(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Config, GatewayOptions]:
    quiet = logging.getLogger("kgpool.kgcompat.traitlets")  # kgpool reports, traitlets not
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    app = GatewayOptions(log=quiet)
    try:
        app.parse_command_line(list(argv))
        command_line = app.config.copy()
        quiet.setLevel(logging.CRITICAL)  # --debug turned it up
        app.load_config_file()
    except (SystemExit, Exception) as exc:
        raise ConfigError(f"cannot read the Kernel Gateway options: {exc}") from None
    if app.extra_args:
        raise ConfigError(f"unexpected argument(s) {' '.join(app.extra_args)}: Kernel Gateway "
                          "takes the notebook as --KernelGatewayApp.seed_uri=NOTEBOOK")
    config = Config()
    for variable, (section, name, parse) in ENVIRONMENT.items():
        text = environ.get(variable)
        if text is not None:
            try:
                config[section][name] = parse(text)
            except ValueError:
                raise ConfigError(f"{variable}={text!r} is not a valid value") from None
    config.merge(app.config)  # the config file, then the command line, win over KG_*
    config.merge(command_line)
    return config, app


def _value(section: str, name: str, gateway: Configurable, personality: Configurable) -> Any:
    owner = gateway if section == "KernelGatewayApp" else personality
    value = getattr(owner, name)
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # quotes kept by an exec-form command line (traitlets drops them too)
    return value


def _take(section: str, name: str, gateway: KernelGatewayApp,
          personality: NotebookHTTPPersonality, out: Translation) -> None:
    where = f"{section}.{name}"
    if section in ("JupyterApp", "Application", "GatewayOptions"):
        if name == "log_level":
            _take_log_level(gateway.config[section][name], out)
        elif name in IGNORED:
            out.notes.append(f"{where} ignored: {IGNORED[name]}")
        elif name not in ("config_file", "generate_config"):
            out.notes.append(f"{where} ignored: kgpool has no such setting")
        return
    if section not in ("KernelGatewayApp", "NotebookHTTPPersonality"):
        out.notes.append(f"{where} ignored: it configures Kernel Gateway's {section}, which "
                         "kgpool does not have")
        return
    owner = gateway if section == "KernelGatewayApp" else personality
    if not owner.has_trait(name):
        out.notes.append(f"{where} ignored: Kernel Gateway has no such option")
        return
    if name == "log_level":
        _take_log_level(owner.config[section][name], out)
        return
    if name in PLUGIN_CLASSES:
        raise ConfigError(f"{where}: kgpool cannot load Kernel Gateway plug-in classes")
    if name in IGNORED:
        out.notes.append(f"{where} ignored: {IGNORED[name]}")
        return
    _apply(name, _value(section, name, gateway, personality), gateway, out)


def _take_log_level(raw: Any, out: Translation) -> None:
    key = raw if isinstance(raw, int) else str(raw).strip("'\"").upper()
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if key not in _LOG_LEVELS:
        raise ConfigError(f"log_level {raw!r} is not one of {sorted(map(str, _LOG_LEVELS))}")
    out.values["log_level"] = _LOG_LEVELS[key]


def _apply(name: str, value: Any, gateway: KernelGatewayApp, out: Translation) -> None:
    """One Kernel Gateway option -> its kgpool setting."""
    direct = {"port": "port", "base_url": "base_url", "auth_token": "auth_token",
              "allow_headers": "allow_headers", "allow_methods": "allow_methods",
              "allow_origin": "allow_origin", "expose_headers": "expose_headers",
              "trust_xheaders": "trust_xheaders", "force_kernel_name": "kernel_name",
              "certfile": "certfile", "keyfile": "keyfile", "client_ca": "client_ca",
              "static_path": "static_path",
              "allow_notebook_download": "allow_notebook_download"}
    if name in direct:
        if value not in (None, ""):
            out.values[direct[name]] = value
    elif name == "ip":
        out.values["host"] = "*" if value in ("*", "") else value
    elif name == "allow_credentials":
        out.values["allow_credentials"] = str(value).lower() == "true"
    elif name == "max_age":
        if str(value).strip():
            try:
                out.values["max_age"] = int(value)
            except ValueError:
                raise ConfigError(f"max_age {value!r} is not a number of seconds") from None
    elif name == "seed_uri":
        if value:
            out.values["notebooks"] = (str(value),)
    elif name == "prespawn_count":
        out.values["kernels"] = value or 1  # notebook-http treats none and 0 as one kernel
    elif name == "max_kernels":
        if value is not None and (gateway.prespawn_count or 1) > value:
            raise ConfigError(f"cannot prespawn {gateway.prespawn_count} kernels; more than "
                              f"max_kernels {value}")
    elif name == "api":
        if value and value not in NOTEBOOK_HTTP_APIS:
            raise ConfigError(f"api {value!r}: kgpool serves notebook-http only "
                              "(kernel_gateway.notebook_http)")
    elif name == "cell_parser":
        if value and value != DEFAULT_PARSER:
            raise ConfigError(f"cell_parser {value!r}: kgpool reads the default annotations "
                              f"(# GET /path); {SWAGGER_PARSER} is not supported")
    elif name == "comment_prefix":
        out.values["comment_prefix"] = ",".join(
            f"{'*' if lang is None else lang}={prefix}" for lang, prefix in
            _as_dict(value).items())
    else:  # a trait declared above but given no meaning: a bug here, not the user's
        raise AssertionError(f"unhandled Kernel Gateway option {name}")


def _as_dict(value: Any) -> dict[Any, str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"comment_prefix {value!r} is not a dict") from None
    if not isinstance(value, dict):
        raise ConfigError(f"comment_prefix {value!r} is not a dict")
    return {k: str(v) for k, v in value.items()}


def fetch_seed(uri: str, directory: Callable[[], str]) -> str:
    """A local path for seed_uri: a path as is, file:// as its path, http(s):// downloaded once
    into `directory()` (Kernel Gateway fetches it the same way, at start-up only)."""
    parts = urllib.parse.urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return parts._replace(scheme="", netloc="").geturl() if parts.scheme == "file" else uri
    name = os.path.basename(parts.path) or "notebook.ipynb"
    target = os.path.join(directory(), name if name.endswith(".ipynb") else name + ".ipynb")
    try:
        with urllib.request.urlopen(uri, timeout=60) as response:  # noqa: S310 (the user's URL)
            data = response.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot fetch the notebook {uri}: {exc}") from None
    with open(target, "wb") as out:
        out.write(data)
    return target
