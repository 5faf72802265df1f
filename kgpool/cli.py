"""Command line: flags and environment -> Settings, logging set-up, and running the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

from prometheus_client import disable_created_metrics

from . import __version__
from .call import CALL_SETTINGS, Call, add_call_parser, parse_call
from .call import main as call_main
from .checks import Plan, plan
from .config import HIDDEN_ENV, LOG_LEVELS, Settings
from .connections import ensure_descriptors
from .errors import ConfigError, KgpoolError, NotebookError
from .kgcompat import Translation, fetch_seed, is_kernel_gateway_argv, translate
from .logs import Formatter, LineHandler
from .mounts import MountSpec, clashes, mount_specs
from .notebook import load_notebook
from .routes import Router
from .secrets import (
    carries_token,
    forbid_inspection,
    protect_token,
    reexec_without_secrets,
    take_handover,
)
from .web import CONNECTIONS, MOUNTS, create_app, create_runner

log = logging.getLogger("kgpool")
ENV_PREFIX = "KGPOOL_"


def _env_name(name: str) -> str:
    field = next((f for f in dataclasses.fields(Settings) if f.name == name), None)
    return str(field.metadata["env"]) if field and "env" in field.metadata \
        else ENV_PREFIX + name.upper()


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="serve a notebook's endpoints over HTTP",
        description="Serve a notebook's annotated cells as HTTP endpoints from a pool of warm "
                    "kernels. Every flag can also be set as KGPOOL_<FLAG> in the environment "
                    "(e.g. KGPOOL_KERNELS=4); a flag on the command line wins.",
    )
    _add_setting_flags(serve, positional=True)


def _add_setting_flags(parser: argparse.ArgumentParser, positional: bool,
                       only: Container[str] | None = None) -> None:
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        if meta.get("cli") is False or (only is not None and f.name not in only):
            continue
        if meta.get("positional"):
            if positional:
                parser.add_argument(f.name, nargs="*", metavar="NOTEBOOK",
                                    help=f"{meta['help']} [env {_env_name(f.name)}]")
            continue
        serve = parser
        default = f" (default: {f.default})" if f.default not in ("", False) else ""
        if _kind(f) is bool:
            serve.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction,
                               help=f"{meta['help']} (default: {'on' if f.default else 'off'})"
                                    f" [env {_env_name(f.name)}=1|0]")
            continue
        kind = _log_level if f.name == "log_level" else _kind(f)
        serve.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                           default=None, choices=meta.get("choices"),
                           metavar=f.name.upper() if not meta.get("choices") else None,
                           help=f"{meta['help']}{default} "
                                f"[env {_env_name(f.name)}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kgpool", description="Serve a Jupyter notebook as a REST API from warm kernels.")
    parser.add_argument("--version", action="version", version=f"kgpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    routes = sub.add_parser(
        "routes", help="check notebooks as serve would, list their endpoints and warnings",
        description="Run every check `kgpool serve` runs before it starts a kernel (notebook "
                    "grammar, kernel spec, language, cell syntax, route clashes, --strict) and "
                    "list what it would serve, in matching order, with every warning. Exits "
                    "2 exactly when serve would refuse to start. Takes serve's arguments.")
    _add_setting_flags(routes, positional=True)
    add_call_parser(sub, lambda call: _add_setting_flags(call, False, CALL_SETTINGS))
    return parser


def call_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """serve's settings, from the flags and KGPOOL_* variables that matter for one request;
    the others (pool size, address, token, connection limits) keep their defaults. The log
    shows warnings and errors unless a log level is given."""
    unused = {_env_name(f.name) for f in dataclasses.fields(Settings)
              if f.name not in CALL_SETTINGS and f.name != "notebooks"}
    args.notebooks = [args.notebook]
    settings = settings_from(args, {k: v for k, v in environ.items() if k not in unused})
    level = settings.log_level if args.log_level or environ.get(_env_name("log_level")) \
        else "warning"
    return settings.replace(kernels=1, reload=False, log_level=level,
                            kernel_env={k: v for k, v in environ.items() if k not in HIDDEN_ENV})


def _log_level(text: str) -> str:
    """debug..critical in any case, Kernel Gateway's WARN, or a number (10, 20, ...)."""
    value = text.strip().lower()
    value = {"warn": "warning", "0": "debug", "10": "debug", "20": "info", "30": "warning",
             "40": "error", "50": "critical"}.get(value, value)
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return value


def _kind(f: dataclasses.Field[Any]) -> Any:
    return {"int": int, "float": float, "bool": bool}.get(str(f.type), str)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str],
                  base: Mapping[str, Any] | None = None) -> Settings:
    """A flag wins over its KGPOOL_* variable, which wins over `base` (what Kernel Gateway's
    options said), which wins over the default."""
    values: dict[str, Any] = dict(base or {})
    for f in dataclasses.fields(Settings):
        if f.metadata.get("cli") is False:
            continue
        value = getattr(args, f.name, None)
        env = environ.get(_env_name(f.name))
        if f.metadata.get("positional"):
            if value or env:
                values[f.name] = tuple(value) if value else (env,)
            continue
        if value is None and env not in (None, ""):
            try:
                value = _parse_bool(env) if _kind(f) is bool else _kind(f)(env)
            except ValueError:
                hint = (" (a Kubernetes Service named kgpool sets KGPOOL_PORT=tcp://...; set "
                        "enableServiceLinks: false)") if env.startswith("tcp://") else ""
                raise ConfigError(f"{_env_name(f.name)}={env!r} is not a valid "
                                  f"{_kind(f).__name__}{hint}") from None
        if value is not None:
            values[f.name] = value
    if not values.get("notebooks"):
        raise ConfigError("a NOTEBOOK argument (or KGPOOL_NOTEBOOK) is required")
    if values.get("auth_token") and values.get("auth_token_file"):
        raise ConfigError("give the token one way: --auth-token-file or the token itself "
                          "(--auth-token, KGPOOL_AUTH_TOKEN, KG_AUTH_TOKEN), not both")
    values["kernel_env"] = {k: v for k, v in environ.items() if k not in HIDDEN_ENV}
    return Settings(**values)


class JsonFormatter(Formatter):
    _std = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._std})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str, level: str) -> None:
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Records skip what neither format shows: the thread, process and multiprocessing names
    # (a getpid(2) and two lookups for every line, the access log's included).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if level != "debug":  # jupyter_client and asyncio chatter is debug material
        for noisy in ("traitlets", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def check_routes(settings: Settings) -> list[tuple[MountSpec, Plan]]:
    """What serve would serve, checked as serve checks it (NotebookError / ConfigError)."""
    checked: list[tuple[MountSpec, Plan]] = []
    for spec in mount_specs(settings):
        notebook = load_notebook(spec.path, strict=settings.strict,
                                 prefixes=settings.comment_prefixes)
        planned = plan(notebook, settings)
        taken = clashes(spec.name, spec.prefix, planned.notebook,
                        [(s.name, s.prefix, p.notebook) for s, p in checked], settings.strict)
        notebook = dataclasses.replace(planned.notebook,
                                       warnings=planned.notebook.warnings + tuple(taken))
        checked.append((spec, dataclasses.replace(planned, notebook=notebook)))
    return checked


def print_routes(spec: MountSpec, planned: Plan) -> None:
    notebook = planned.notebook
    print(f"{notebook.name} at {spec.prefix or '/'}: language {planned.language.name}, "
          f"kernel {planned.kernel_name}, {len(notebook.init_cells)} init cell(s)")
    for route in Router(notebook.endpoints).routes:
        for method, ep in route.endpoints.items():
            info = f", ResponseInfo cells {list(ep.response_cells)}" if ep.response_cells else ""
            print(f"{method:7} {spec.prefix + ep.path:30} cells {list(ep.cells)}{info}")
    for warning in notebook.warnings:
        print(f"warning: {warning}")


async def serve(settings: Settings) -> int:
    try:
        app = create_app(settings)
    except (NotebookError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    mounts = app[MOUNTS]
    for mount in mounts.all:
        for warning in mount.service.notebook.warnings:
            log.warning("%s: %s", mount.name, warning)
    runner = create_runner(app, settings)
    try:
        await runner.setup()  # starts the pools' warm-up
    except KgpoolError as exc:
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        return 1
    connections = app[CONNECTIONS]
    shortage = ensure_descriptors(settings.max_connections)
    if shortage:
        log.warning("%s", shortage)
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        log.info("received %s%s", signal.Signals(signum).name,
                 "" if signals == 1 else " again: stopping now")
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, mounts.reload_changed, True)
    try:
        try:
            await connections.listen(runner, None if settings.host in ("*", "") else
                                     settings.host, settings.port, ssl_context(settings))
        except (OSError, ConfigError) as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
            return 1
        scheme = "https" if settings.certfile else "http"
        log.info("listening on %s://%s:%d%s/, warming %s", scheme, settings.host, settings.port,
                 settings.prefix, ", ".join(f"{m.spec.kernels} kernel(s) for {m.spec.path}"
                                            for m in mounts.all))
        warm = asyncio.ensure_future(mounts.warmed())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if warm.done() and warm.exception() is not None:
            log.error("start-up failed: %s", warm.exception())
            return 1
        if not stop.is_set():
            for mount in mounts.all:
                log.info("ready: %s at %s: %s", mount.name, mount.prefix or "/", ", ".join(
                    f"{e.method} {e.path}" for e in mount.service.notebook.endpoints))
            await stop.wait()
        warm.cancel()
        log.info("draining: up to %gs for queued and running requests",
                 settings.shutdown_timeout)
        stopped_early = asyncio.ensure_future(_second_signal(lambda: signals))
        drain = asyncio.ensure_future(mounts.drain(settings.shutdown_timeout))
        await asyncio.wait({drain, stopped_early}, return_when=asyncio.FIRST_COMPLETED)
        stopped_early.cancel()
        if not (drain.done() and drain.result()):
            drain.cancel()
            log.warning("shutdown timeout passed with requests unfinished; stopping anyway")
        await mounts.close()  # waiting requests get 503 and running ones end before the
        return 0              # listener closes, so no client is left without an answer
    finally:
        await connections.close()
        await runner.cleanup()
        log.info("stopped; all kernels shut down")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """HTTPS when a certificate is configured; client certificates when a CA is."""
    if not settings.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile or None)
        if settings.client_ca:
            context.load_verify_locations(settings.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS set-up failed: {exc}") from None
    return context


async def _second_signal(count: Any) -> None:
    while count() < 2:
        await asyncio.sleep(0.1)


def kernel_gateway_settings(argv: list[str], environ: Mapping[str, str],
                            seed_dir: Callable[[], str]) -> tuple[Settings, Translation]:
    """`kgpool --KernelGatewayApp.seed_uri=...`: Kernel Gateway's options (command line, config
    file, KG_*), with kgpool's own flags and KGPOOL_* variables on top."""
    parser = argparse.ArgumentParser(prog="kgpool", allow_abbrev=False, add_help=False)
    _add_setting_flags(parser, positional=False)
    args, rest = parser.parse_known_args(argv)
    translation = translate(rest, environ)
    seed = translation.values["notebooks"][0]
    translation.values["notebooks"] = (fetch_seed(seed, seed_dir),)
    return settings_from(args, environ, translation.values), translation


def main(argv: Sequence[str] | None = None) -> int:
    environ: Mapping[str, str] = os.environ
    notes: list[str] = []
    own = argv is None
    if argv is None:  # the process is kgpool's own: keep the token out of its /proc entries
        try:
            argv, environ, notes = _own_process(sys.argv[1:])
        except ConfigError as exc:
            print(f"kgpool: error: {exc}", file=sys.stderr)
            return 2
    argv = list(argv)
    if argv[:1] == ["kernelgateway"]:  # `jupyter kernelgateway ...` with one word changed
        argv = argv[1:]
    kg_mode = is_kernel_gateway_argv(argv) and \
        (bool(argv) or any(k.startswith("KG_") for k in environ))
    call: Call | None = None
    with contextlib.ExitStack() as stack:
        try:
            if kg_mode:
                settings, translation = kernel_gateway_settings(
                    argv, environ, lambda: stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="kgpool-seed-")))
            else:
                args = build_parser().parse_args(argv)
                if args.command == "call":
                    settings, translation = call_settings(args, environ), Translation()
                    call = parse_call(args.request, args.data, args.header)
                else:
                    settings, translation = settings_from(args, environ), Translation()
                if args.command == "routes":
                    for spec, planned in check_routes(settings):
                        print_routes(spec, planned)
                    return 0
            for name in HIDDEN_ENV:  # kernels must not inherit a token
                os.environ.pop(name, None)
            disable_created_metrics()  # *_created series double the count; nobody graphs them
            configure_logging(settings.log_format, settings.log_level)
        except (NotebookError, ConfigError) as exc:
            print(f"kgpool: error: {exc}", file=sys.stderr)
            return 2
        if kg_mode:
            log.info("Kernel Gateway options read: %s", ", ".join(
                f"{k}={'***' if k == 'auth_token' else v!r}"
                for k, v in translation.values.items()))
        for note in [*translation.notes, *notes]:
            log.warning("%s", note)
        if call is not None:  # its settings hold no token
            return call_main(settings, call, args.body_only)
        if settings.auth_token and own:
            settings = protect_token(settings, stack.callback)
        return asyncio.run(serve(settings))


def _own_process(argv: list[str]) -> tuple[list[str], Mapping[str, str], list[str]]:
    """The real arguments and environment, re-executing first when either holds a token."""
    handed = take_handover(os.environ)
    if handed is not None:
        forbid_inspection()  # before anything else: the new process starts inspectable
        real_argv, secrets = handed
        return real_argv, {**os.environ, **secrets}, []
    if carries_token(argv, os.environ):
        forbid_inspection()
        reason = reexec_without_secrets(argv, os.environ)  # returns only if it could not
        note = f"the token stays visible in /proc/{os.getpid()}/environ or /cmdline: {reason}"
        return argv, os.environ, [note]
    return argv, os.environ, []
