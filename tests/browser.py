"""A small real-browser harness: headless Debian Chromium driven over the DevTools protocol.

    with Chromium.launch() as browser:           # pytest.skip if no chromium binary
        with browser.open("http://127.0.0.1:8000/page.html") as page:
            page.wait_for("window.results !== undefined")
            results = page.evaluate("window.results")   # promises are awaited
            page.type('input[name="q"]', "text")        # real key input (Input.insertText)
            page.click("button[data-try]")              # real mouse press/release at its centre

How: Chromium starts with --remote-debugging-port=0 and writes the port it chose into
DevToolsActivePort in its (fresh, temporary) profile directory; one websocket (aiohttp) to the
browser endpoint carries every command, each page attached as a flat session. An asyncio loop on a
private thread runs the connection; every call from the test waits a bounded time. Chromium runs
in its own session/process group and is killed as a group (SIGTERM, then SIGKILL) on every path;
`close()` asks it to quit first (so it reaps its own children; PID 1 here leaves orphans as
zombies) and checks that no process using its profile directory survives.

Network: only 127.0.0.1. Besides the machine notes' flags, every host name resolves to nothing
(--host-resolver-rules) and any non-loopback connection is sent to a closed local proxy port.

PageServer serves static pages from plain aiohttp apps on one or more free 127.0.0.1 ports (each
port is its own origin), on a private thread too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_PACKAGES = ("chromium",)  # Debian: /usr/bin/chromium; no recommends needed for headless
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--mute-audio", "--password-store=basic",
    "--use-mock-keychain", "--disable-features=Translate,MediaRouter,OptimizationHints",
    # No crashpad handler: it would run outside the process group and write to ~/.config.
    "--disable-crash-reporter",
    # Nothing but 127.0.0.1: names never resolve, and anything not on loopback (which Chromium
    # never proxies) goes to a port where nothing listens.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
)


class BrowserError(AssertionError):
    """Chromium or the page did something the test did not expect."""


def find_chromium() -> str | None:
    """The Chromium binary: $KGPOOL_CHROMIUM, else the first of CANDIDATES on PATH."""
    given = os.environ.get("KGPOOL_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium(timeout: float = 90.0) -> str | None:
    """As root with apt-get, try Debian's chromium package (bounded); the binary or None.
    KGPOOL_NO_CHROMIUM_INSTALL=1 turns this off."""
    if os.environ.get("KGPOOL_NO_CHROMIUM_INSTALL") == "1" or os.geteuid() != 0 or \
            shutil.which("apt-get") is None:
        return None
    deadline = time.monotonic() + timeout
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=60", "install", "-y", "-q",
               "--no-install-recommends", *APT_PACKAGES]
    for cmd in (install, ["apt-get", "-o", "DPkg::Lock::Timeout=60", "update", "-q"], install):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            return None
        if find_chromium():
            return find_chromium()
    return None


def chromium_or_skip() -> str:
    import pytest

    binary = find_chromium() or install_chromium()
    if binary is None:
        pytest.skip("no Chromium binary: install Debian's package "
                    f"(apt-get install {' '.join(APT_PACKAGES)}) or set KGPOOL_CHROMIUM")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids_using(marker: str) -> list[int]:
    """Live processes whose command line mentions marker (our unique profile directory)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class _LoopThread:
    """An asyncio loop on a daemon thread; run() waits for a coroutine, bounded."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 5)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class _Connection:
    """One DevTools websocket: commands by id, events to listeners (flat sessions)."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        error: BaseException = BrowserError("DevTools connection closed")
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    fut = self.pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                else:
                    for listener in list(self.listeners):
                        listener(data)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting command
            error = exc
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps(msg))
        reply = await fut
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader
        await self.http.close()


class Page:
    """One tab. Every method waits at most `timeout` seconds (default: the browser's)."""

    def __init__(self, browser: Chromium, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session
        self.log: list[str] = []  # console calls, uncaught exceptions, browser log entries
        self._loaded: asyncio.Event | None = None

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("sessionId") != self.session:
            return
        method, params = event["method"], event.get("params", {})
        if method == "Page.loadEventFired" and self._loaded is not None:
            self._loaded.set()
        elif method == "Runtime.consoleAPICalled":
            args = [str(a.get("value", a.get("description", ""))) for a in params["args"]]
            self.log.append(f"console.{params['type']}: {' '.join(args)}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.log.append(f"exception: {text}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.log.append(f"{entry['source']}.{entry['level']}: {entry['text']}")

    def _send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser._conn.send(method, params, self.session)  # type: ignore[union-attr]

    def _run(self, coro: Awaitable[T], timeout: float | None) -> T:
        return self.browser._loop.run(coro, timeout or self.browser.timeout)

    def goto(self, url: str, timeout: float | None = None) -> None:
        """Navigate and wait for the load event; HTTP errors are fine, network errors raise."""
        async def go() -> None:
            self._loaded = asyncio.Event()
            result = await self._send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"navigating to {url}: {result['errorText']}")
            await self._loaded.wait()
        self._run(go(), timeout)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The JSON value of a JavaScript expression; a promise is awaited; a throw raises."""
        async def ev() -> Any:
            result = await self._send("Runtime.evaluate", {
                "expression": expression, "awaitPromise": True, "returnByValue": True,
                "userGesture": True})
            if "exceptionDetails" in result:
                details = result["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                raise BrowserError(f"page script failed: {text}\npage log: {self.log}")
            return result["result"].get("value")
        return self._run(ev(), timeout)

    def wait_for(self, expression: str, timeout: float | None = None,
                 interval: float = 0.05) -> Any:
        """Poll until a JavaScript expression is truthy; its value."""
        limit = timeout or self.browser.timeout
        deadline = time.monotonic() + limit
        while True:
            value = self.evaluate(expression, timeout=limit)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {limit}s waiting for {expression!r}\n"
                                   f"page log: {self.log}")
            time.sleep(interval)

    def _centre(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; })()")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        if box[2] <= 0 or box[3] <= 0:
            raise BrowserError(f"element {selector!r} is not visible (size {box[2]}x{box[3]})")
        return box[0], box[1]

    def click(self, selector: str, timeout: float | None = None) -> None:
        """A real left click (mouse pressed and released) at the element's centre."""
        x, y = self._centre(selector)

        async def press() -> None:
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                await self._send("Input.dispatchMouseEvent", {
                    "type": kind, "x": x, "y": y, "button": "left",
                    "buttons": 1 if kind == "mousePressed" else 0, "clickCount": 1})
        self._run(press(), timeout)

    def type(self, selector: str, text: str, timeout: float | None = None) -> None:
        """Focus the element (by clicking it), select what it holds, and type text over it."""
        self.click(selector, timeout)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select?.()")
        self._run(self._send("Input.insertText", {"text": text}), timeout)

    def close(self) -> None:
        conn = self.browser._conn
        if conn is not None and self._on_event in conn.listeners:
            conn.listeners.remove(self._on_event)
        with contextlib.suppress(Exception):
            self.browser._loop.run(conn.send("Target.closeTarget",  # type: ignore[union-attr]
                                             {"targetId": self.target}), 5)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Chromium:
    """One headless Chromium process (group) with a fresh profile, driven over DevTools."""

    def __init__(self, binary: str, timeout: float = 30.0) -> None:
        self.binary, self.timeout = binary, timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile = ""
        self._loop = _LoopThread("chromium-devtools")
        self._conn: _Connection | None = None
        self._stderr: Any = None

    @classmethod
    def launch(cls, timeout: float = 30.0) -> Chromium:
        """Start Chromium (pytest.skip if there is none); close() it, or use `with`."""
        browser = cls(chromium_or_skip(), timeout)
        try:
            browser.start()
        except BaseException:
            browser.close()
            raise
        return browser

    def start(self, timeout: float = 30.0) -> None:
        # One temporary root for everything Chromium writes: the profile, and its config and
        # cache homes (so the crash handler, which leaves the process group, names it too).
        self.profile = tempfile.mkdtemp(prefix="kgpool-chromium-")
        user_data = os.path.join(self.profile, "profile")
        env = {**os.environ, "XDG_CONFIG_HOME": os.path.join(self.profile, "config"),
               "XDG_CACHE_HOME": os.path.join(self.profile, "cache")}
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={user_data}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # its own process group: killed as one
        port_file = Path(user_data) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited {self.proc.returncode}: {self.output()}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) >= 2:
                break
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium gave no DevTools port in {timeout}s: "
                                   f"{self.output()}")
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{lines[0]}{lines[1]}"

        async def connect() -> _Connection:
            http = aiohttp.ClientSession()
            try:
                ws = await http.ws_connect(url, max_msg_size=0)
            except BaseException:
                await http.close()
                raise
            return _Connection(http, ws)
        self._conn = self._loop.run(connect(), timeout)

    def open(self, url: str | None = None, timeout: float | None = None) -> Page:
        """A new tab (a flat session with Page, Runtime and Log events on), at url if given."""
        conn = self._conn
        assert conn is not None, "start() first"

        async def new() -> Page:
            target = (await conn.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await conn.send("Target.attachToTarget",
                                       {"targetId": target, "flatten": True}))["sessionId"]
            page = Page(self, target, session)
            conn.listeners.append(page._on_event)
            for domain in ("Page", "Runtime", "Log"):
                await conn.send(f"{domain}.enable", {}, session)
            return page
        page = self._loop.run(new(), timeout or self.timeout)
        if url is not None:
            try:
                page.goto(url, timeout)
            except BaseException:
                page.close()
                raise
        return page

    def output(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        text: str = self._stderr.read().decode("utf-8", errors="replace")
        return text[-4000:]

    def close(self) -> None:
        """Ask Chromium to quit (Browser.close: it reaps its own children), then kill what is
        left of its process group (SIGTERM, then SIGKILL) and check that nothing using the
        profile survives; the profile is removed."""
        try:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._loop.run(self._conn.send("Browser.close"), 5)
                with contextlib.suppress(Exception):
                    self._loop.run(self._conn.close(), 5)
                self._conn = None
        finally:
            self._loop.stop()
            left: list[int] = []
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                    left = _pids_using(self.profile)
                    if self.proc.poll() is not None and not left:
                        break
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(wait)
                    deadline = time.monotonic() + wait
                    while (left := _pids_using(self.profile)) and time.monotonic() < deadline:
                        time.sleep(0.05)
                for pid in left:  # a child that left the group (crash handler): by PID
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while (left := _pids_using(self.profile)) and time.monotonic() < deadline:
                    time.sleep(0.05)
            if self._stderr is not None:
                self._stderr.close()
            if self.profile:
                shutil.rmtree(self.profile, ignore_errors=True)
            if left:
                raise BrowserError(f"chromium processes outlived their group kill: {left}")

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PageServer:
    """Static pages from a plain aiohttp app on `origins` free 127.0.0.1 ports (one origin each).

    pages maps a path to (content type, body); every request is recorded in `seen` as
    (port, method, path, Origin header)."""

    def __init__(self, pages: dict[str, tuple[str, str | bytes]], origins: int = 1) -> None:
        self.pages = pages
        self.ports = [free_port() for _ in range(origins)]
        self.seen: list[tuple[int, str, str, str | None]] = []
        self._loop: _LoopThread | None = None
        self._runner: web.AppRunner | None = None

    def origin(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def url(self, path: str, index: int = 0) -> str:
        return self.origin(index) + path

    async def _handle(self, request: web.Request) -> web.Response:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        self.seen.append((port, request.method, request.path, request.headers.get("Origin")))
        page = self.pages.get(request.path)
        if page is None:
            return web.Response(status=404, text="no such page")
        content_type, body = page
        return web.Response(body=body.encode() if isinstance(body, str) else body,
                            headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    def start(self) -> PageServer:
        self._loop = _LoopThread("page-server")

        async def up() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            for port in self.ports:
                await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._loop.run(up(), 10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._loop.run(self._runner.cleanup(), 10)
        self._loop.stop()
        self._loop = None

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def chromium(timeout: float = 30.0) -> Iterator[Chromium]:
    """Chromium.launch() as a context manager (pytest.skip if there is no binary)."""
    browser = Chromium.launch(timeout)
    try:
        yield browser
    finally:
        browser.close()
