"""Real-browser tests: headless Chromium (tests/browser.py) against real kgpool servers.

CORS (issue 7): a page served from another 127.0.0.1 origin calls kgpool with fetch(); an allowed
origin gets its answers (and only the exposed headers), a refused one gets a TypeError.
Index page (issue 8): `GET /` lists every endpoint with a try-it form and the live pool status.
Skipped, with the reason, only when no Chromium binary can be found or installed.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from browser import Chromium, PageServer, chromium
from conftest import NOTEBOOKS, ROOT, Server

pytestmark = pytest.mark.timeout(120)

NOTEBOOK = NOTEBOOKS / "browser_echo.ipynb"
ENDPOINTS = {"GET /echo", "POST /echo", "PUT /echo", "GET /sleep", "GET /hello/:name"}

# Calls kgpool (base URL in ?kgpool=) the ways a web app would and reports each outcome.
CORS_PAGE = """<!doctype html>
<meta charset="utf-8"><title>kgpool CORS check</title>
<pre id="results">running</pre>
<script>
const base = new URLSearchParams(location.search).get('kgpool');
async function call(path, init) {
  try {
    const r = await fetch(base + path, init);
    const body = await r.text();
    return {ok: true, status: r.status, body,
            requestId: r.headers.get('X-Request-ID'),
            contentType: r.headers.get('Content-Type'),
            hidden: r.headers.get('X-Hidden')};
  } catch (e) {
    return {ok: false, error: e.name, message: e.message};
  }
}
window.results = (async () => {
  const out = {};
  // simple request: no preflight
  out.get = await call('/echo?word=hi');
  // JSON body + custom header: the browser must preflight
  out.post = await call('/echo', {method: 'POST',
    headers: {'Content-Type': 'application/json', 'X-Custom': 'yes'},
    body: JSON.stringify({n: 1, s: 'caf\\u00e9'})});
  // a method and a header the server does not allow
  out.put = await call('/echo', {method: 'PUT', body: 'x'});
  out.otherHeader = await call('/echo', {headers: {'X-Other': '1'}});
  document.getElementById('results').textContent = JSON.stringify(out, null, 1);
  return out;
})();
</script>
"""


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in server.get("/metrics").text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A kgpool server that is stopped (kernels checked) even when it never became ready."""
    server = Server(NOTEBOOK, *args, env=env)
    try:
        server.start(timeout=90)
        yield server
    finally:
        if server.proc is not None:
            server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with chromium(timeout=30) as launched:
        yield launched


@pytest.fixture(scope="module")
def pages() -> Iterator[PageServer]:
    """The CORS page on two origins: index 0 is allowed by cors_server, index 1 is not."""
    with PageServer({"/cors.html": ("text/html; charset=utf-8", CORS_PAGE)}, origins=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def cors_server(pages: PageServer) -> Iterator[Server]:
    with serving("--kernels", "1", "--allow-origin", pages.origin(0),
                 "--allow-headers", "Content-Type,X-Custom", "--allow-methods", "GET,POST",
                 "--expose-headers", "X-Request-ID", "--max-age", "600") as server:
        yield server


def run_cors_page(browser: Chromium, pages: PageServer, server: Server,
                  origin: int) -> tuple[dict[str, Any], list[str]]:
    url = pages.url(f"/cors.html?kgpool={quote(f'http://127.0.0.1:{server.port}')}", origin)
    with browser.open(url) as page:
        results = page.evaluate("window.results")
        shown = json.loads(page.evaluate("document.getElementById('results').textContent"))
        assert shown == results
        return results, page.log


def test_allowed_origin_get_and_preflighted_post(browser: Chromium, pages: PageServer,
                                                 cors_server: Server) -> None:
    preflights = metric(cors_server, "kgpool_http_requests_total", method="OPTIONS", code="204")
    results, log = run_cors_page(browser, pages, cors_server, origin=0)

    get = results["get"]
    assert get["ok"], (get, log)
    assert get["status"] == 200
    assert json.loads(get["body"]) == {"method": "GET", "args": {"word": ["hi"]}, "custom": None}
    assert get["contentType"] == "application/json"  # CORS-safelisted: always readable
    assert get["requestId"], "X-Request-ID is exposed, so the page must be able to read it"
    assert get["hidden"] is None, "X-Hidden is not exposed, so the page must not see it"

    post = results["post"]
    assert post["ok"], (post, log)
    assert post["status"] == 200
    assert json.loads(post["body"]) == {"method": "POST", "body": {"n": 1, "s": "café"},
                                        "custom": "yes"}
    assert post["requestId"] and post["requestId"] != get["requestId"]
    assert post["hidden"] is None
    # The browser really asked first (a preflight, answered 204 by kgpool).
    after = metric(cors_server, "kgpool_http_requests_total", method="OPTIONS", code="204")
    assert after >= preflights + 1


def test_allowed_origin_unlisted_method_and_header_blocked(
        browser: Chromium, pages: PageServer, cors_server: Server) -> None:
    puts = metric(cors_server, "kgpool_http_requests_total", method="PUT")
    results, log = run_cors_page(browser, pages, cors_server, origin=0)
    for name in ("put", "otherHeader"):
        assert not results[name]["ok"], (name, results[name])
        assert results[name]["error"] == "TypeError", results[name]
    assert any("blocked by CORS policy" in line and "PUT" in line for line in log), log
    assert any("blocked by CORS policy" in line and "x-other" in line for line in log), log
    # The refused PUT never got past its preflight: no kernel ran it.
    assert metric(cors_server, "kgpool_http_requests_total", method="PUT") == puts
    assert cors_server.request("PUT", "/echo").status == 200  # the endpoint itself works


def test_refused_origin_gets_type_errors(browser: Chromium, pages: PageServer,
                                         cors_server: Server) -> None:
    posts = metric(cors_server, "kgpool_http_requests_total", route="/echo", method="POST")
    results, log = run_cors_page(browser, pages, cors_server, origin=1)
    for name in ("get", "post", "put", "otherHeader"):
        assert not results[name]["ok"], (name, results[name], log)
        assert results[name]["error"] == "TypeError", results[name]
    blocked = [line for line in log if "blocked by CORS policy" in line]
    assert any("No 'Access-Control-Allow-Origin' header" in line for line in blocked), log
    assert any("preflight" in line for line in blocked), log
    # The POST's preflight was refused, so the POST itself never reached kgpool.
    assert metric(cors_server, "kgpool_http_requests_total", route="/echo",
                  method="POST") == posts


def preflight(server: Server, origin: str, method: str = "POST",
              headers: str = "content-type,x-custom") -> Any:
    return server.request("OPTIONS", "/echo", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


def test_preflight_answers_without_a_kernel(pages: PageServer, cors_server: Server) -> None:
    allowed, refused = pages.origin(0), pages.origin(1)
    resp = preflight(cors_server, allowed)
    assert resp.status == 204
    assert resp.body == b""
    assert resp.headers["Access-Control-Allow-Origin"] == allowed
    assert {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")} == \
        {"GET", "POST"}
    allow_headers = {h.strip().lower()
                     for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-custom"} <= allow_headers
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in resp.headers.get("Vary", "")

    resp = preflight(cors_server, refused)
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.status >= 400 or resp.status == 204  # what matters is the missing header

    # Actual responses carry the headers for the allowed origin only.
    resp = cors_server.get("/echo", headers={"Origin": allowed})
    assert resp.headers["Access-Control-Allow-Origin"] == allowed
    assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-ID"
    assert "Access-Control-Allow-Origin" not in \
        cors_server.get("/echo", headers={"Origin": refused}).headers

    # With the only kernel busy for 4 s, a preflight is still answered at once.
    executions = metric(cors_server, "kgpool_execution_duration_seconds_count")
    slow = threading.Thread(target=cors_server.get, args=("/sleep?s=4",))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while metric(cors_server, "kgpool_kernels", state="busy") < 1:
            assert time.monotonic() < deadline, "the slow request never reached the kernel"
            time.sleep(0.02)
        started = time.monotonic()
        resp = preflight(cors_server, allowed)
        took = time.monotonic() - started
        assert resp.status == 204
        assert took < 1.0, f"a preflight waited {took:.2f}s behind a busy kernel"
    finally:
        slow.join(30)
    assert metric(cors_server, "kgpool_execution_duration_seconds_count") == executions + 1


# A page that talks to a token-protected kgpool: the preflight must not need the token (browsers
# never send credentials on it) and kgpool's own errors must stay readable to the page.
AUTH_PAGE = """<!doctype html>
<meta charset="utf-8"><title>kgpool CORS + token</title>
<script>
const params = new URLSearchParams(location.search);
const base = params.get('kgpool'), token = params.get('token');
async function call(path, headers) {
  try {
    const r = await fetch(base + path, {headers});
    return {ok: true, status: r.status, body: await r.text(),
            requestId: r.headers.get('X-Request-ID')};
  } catch (e) {
    return {ok: false, error: e.name, message: e.message};
  }
}
window.results = (async () => ({
  authed: await call('/hello/web', {'Authorization': 'Bearer ' + token}),
  wrongToken: await call('/hello/web', {'Authorization': 'Bearer nope'}),
  noToken: await call('/hello/web', {}),
  missing: await call('/no/such/endpoint', {'Authorization': 'Bearer ' + token}),
}))();
</script>
"""
TOKEN = "browser-test-token-0123456789"


@pytest.fixture(scope="module")
def auth_pages() -> Iterator[PageServer]:
    with PageServer({"/auth.html": ("text/html; charset=utf-8", AUTH_PAGE)}) as srv:
        yield srv


def test_token_protected_server_from_allowed_origin(browser: Chromium,
                                                    auth_pages: PageServer) -> None:
    """Default --allow-headers (Authorization among them): Bearer from the page works, and
    401/404 answers carry the CORS headers, so the page reads them instead of a TypeError."""
    with serving("--allow-origin", auth_pages.origin(),
                 env={"KGPOOL_AUTH_TOKEN": TOKEN}) as server:
        query = f"kgpool={quote(f'http://127.0.0.1:{server.port}')}&token={TOKEN}"
        with browser.open(auth_pages.url(f"/auth.html?{query}")) as page:
            results = page.evaluate("window.results")
            log = page.log
    for name, status in (("authed", 200), ("wrongToken", 401), ("noToken", 401),
                         ("missing", 404)):
        assert results[name]["ok"], (name, results[name], log)
        assert results[name]["status"] == status, (name, results[name])
        assert results[name]["requestId"], name
    assert results["authed"]["body"] == "hello web"
    assert json.loads(results["noToken"]["body"])["error"] == "unauthorized"
    assert json.loads(results["missing"]["body"])["error"] == "not_found"
    assert TOKEN not in json.dumps(results["wrongToken"])


# --- the index page (issue 8) ---------------------------------------------------------------

INDEX_MARKER = "data-kgpool-index"
INDEX_LANDED = any(INDEX_MARKER in path.read_text(errors="replace")
                   for path in (ROOT / "kgpool").rglob("*") if path.is_file()
                   and path.suffix in (".py", ".html", ".js", ".css"))


@pytest.fixture(scope="module")
def index_server() -> Iterator[Server]:
    with serving("--kernels", "2") as server:
        yield server


@pytest.mark.skipif(not INDEX_LANDED, reason="the index page (GET /, issue 8) has not landed: "
                    f"no {INDEX_MARKER} in kgpool/")
def test_index_page_lists_endpoints_tries_one_and_shows_the_pool(
        browser: Chromium, index_server: Server) -> None:
    resp = index_server.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert INDEX_MARKER in resp.text

    with browser.open(f"http://127.0.0.1:{index_server.port}/") as page:
        assert page.evaluate(f"!!document.querySelector('[{INDEX_MARKER}]')")
        listed = page.evaluate("[...document.querySelectorAll('[data-endpoint]')]"
                               ".map(e => e.getAttribute('data-endpoint'))")
        assert set(listed) >= ENDPOINTS, listed
        assert len([e for e in listed if e in ENDPOINTS]) == len(ENDPOINTS), listed

        # Try it: a real click and real typing into the path parameter's input.
        scope = '[data-endpoint="GET /hello/:name"]'
        assert page.evaluate(f"!!document.querySelector('{scope} [data-result]')")
        page.type(f'{scope} input[name="name"]', "chromium")
        page.click(f"{scope} [data-try]")
        shown = page.wait_for(
            f"(() => {{ const t = document.querySelector('{scope} [data-result]').textContent;"
            " return t.includes('hello chromium') && t; })()", timeout=20)
        assert "hello chromium" in shown
        assert re.search(r"\b200\b", shown), shown  # the status is shown too

        # A POST endpoint's form sends its body (JSON by default) and shows the answer.
        scope = '[data-endpoint="POST /echo"]'
        page.type(f"{scope} textarea", '{"from": "index"}')
        page.click(f"{scope} [data-try]")
        shown = page.wait_for(
            f"(() => {{ const t = document.querySelector('{scope} [data-result]').textContent;"
            " return t.includes('index') && t; })()", timeout=20)
        assert json.loads(shown[shown.index("{"):])["body"] == {"from": "index"}, shown

        # Live pool status: both kernels idle at rest, then one busy while /sleep runs, shown
        # without reloading the page.
        status = "document.querySelector('[data-pool-status]').textContent"

        def shown_when(*patterns: str, timeout: float = 20) -> str:
            test = " && ".join(f"/{p}/i.test(t)" for p in patterns)
            return str(page.wait_for(f"(() => {{ const t = {status}; return ({test}) && t; }})()",
                                     timeout=timeout))

        count = r"\b{n}\s+{word}\b|\b{word}\W+{n}\b"
        at_rest = shown_when(count.format(n=2, word="idle"), count.format(n=0, word="busy"),
                             timeout=60)
        slow = threading.Thread(target=index_server.get, args=("/sleep?s=6",))
        slow.start()
        try:
            busy = shown_when(count.format(n=1, word="idle"), count.format(n=1, word="busy"),
                              timeout=15)
        finally:
            slow.join(30)
        assert busy != at_rest
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1

def test_harness_stays_on_loopback(browser: Chromium, pages: PageServer) -> None:
    """The browser cannot leave 127.0.0.1: names do not resolve, other addresses are refused."""
    with browser.open(pages.url("/cors.html")) as page:
        outcome = page.evaluate("""Promise.all(['http://example.com/', 'http://10.255.255.1/']
            .map(u => fetch(u, {mode: 'no-cors'}).then(() => 'reached', e => e.name)))""")
    assert outcome == ["TypeError", "TypeError"], outcome



# Reads a streamed endpoint with EventSource; resolves once its `end` event came (or it failed).
EVENT_SOURCE = """new Promise(resolve => {
  const started = performance.now(), events = [];
  const source = new EventSource(%s);
  source.onmessage = e => events.push({at: performance.now() - started, data: e.data});
  source.addEventListener('end', () => { source.close(); resolve({events, ended: true}); });
  source.onerror = () => { source.close(); resolve({events, ended: false}); };
})"""


def test_event_source_gets_each_printed_line_as_it_is_printed(browser: Chromium) -> None:
    """A page reads a `# kgpool: stream sse` endpoint with the browser's EventSource: one event
    per printed line, in order, as they are printed (200 ms apart), and the `end` event closes
    it rather than reconnecting and running the cell again."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(NOTEBOOKS / "streaming.ipynb", "--kernels", "1"))
        page = stack.enter_context(browser.open(f"http://127.0.0.1:{server.port}/"))
        seen = page.evaluate(EVENT_SOURCE % json.dumps("/events"), timeout=30)
        assert seen["ended"], seen
        assert [e["data"] for e in seen["events"]] == [f"event {i}" for i in range(5)]
        first, last = seen["events"][0]["at"], seen["events"][-1]["at"]
        assert last - first >= 600, seen  # streamed, not gathered and sent at the end
        # the cell ran once: no reconnection after the end
        assert server.metric("kgpool_http_requests_total", 'route="/events"') == 1


# --- the index page behind a token (issue 17) ------------------------------------------------

INDEX_TOKEN = "index-cookie-token-9876543210"
# A page on another port of the same host: the same *site*, so SameSite=Strict lets the
# browser attach kgpool's cookie; kgpool must still refuse what it sends (CSRF).
SAME_SITE_PAGE = """<!doctype html>
<meta charset="utf-8"><title>same site, other origin</title>
<script>
const base = new URLSearchParams(location.search).get('kgpool');
window.results = (async () => {
  const out = {};
  try {  // a "simple" request: no preflight, sent with cookies, answer unreadable
    await fetch(base + '/echo', {method: 'POST', mode: 'no-cors', credentials: 'include',
                                 headers: {'Content-Type': 'text/plain'}, body: 'csrf'});
    out.noCors = 'sent';
  } catch (e) { out.noCors = e.name; }
  try {
    const r = await fetch(base + '/hello/csrf', {credentials: 'include',
                                                 headers: {'X-Kgpool-Page': '1'}});
    out.cors = r.status;
  } catch (e) { out.cors = e.name; }
  return out;
})();
</script>
"""


def browser_cookies(page: Any) -> list[dict[str, Any]]:
    found = page._run(page._send("Network.getCookies", {"urls": ["http://127.0.0.1/"]}), None)
    return list(found["cookies"])


def test_index_page_with_a_token_from_the_address_bar(browser: Chromium) -> None:
    """`/?token=...` once: the page loads, the address bar loses the token, an HttpOnly
    SameSite=Strict cookie that is not the token takes its place, try-it works with it, a
    wrong token gets 401, and the token is in no page, log line or cookie."""
    metric_line = 'route="/echo",method="POST"'
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serving("--kernels", "1",
                                             env={"KGPOOL_AUTH_TOKEN": INDEX_TOKEN}))
        other = stack.enter_context(PageServer(
            {"/same-site.html": ("text/html; charset=utf-8", SAME_SITE_PAGE)}))
        page = stack.enter_context(browser.open())
        stack.callback(lambda: page._run(page._send("Network.clearBrowserCookies"), None))
        root = f"http://127.0.0.1:{server.port}/"
        navigation = "performance.getEntriesByType('navigation')[0]"

        page.goto(root + "?token=wrong")
        assert page.evaluate(f"{navigation}.responseStatus") == 401
        assert "unauthorized" in page.evaluate("document.body.textContent")
        assert browser_cookies(page) == []

        page.goto(root + f"?token={INDEX_TOKEN}")
        assert page.evaluate(f"{navigation}.responseStatus") == 200
        assert page.evaluate(f"!!document.querySelector('[{INDEX_MARKER}]')")
        assert page.evaluate("location.href") == root
        assert INDEX_TOKEN not in page.evaluate(f"{navigation}.name")
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script sees it
        (cookie,) = browser_cookies(page)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        assert INDEX_TOKEN not in cookie["name"] + cookie["value"]

        scope = '[data-endpoint="GET /hello/:name"]'
        page.type(f'{scope} input[name="name"]', "cookie")
        page.click(f"{scope} [data-try]")
        shown = page.wait_for(
            f"(() => {{ const t = document.querySelector('{scope} [data-result]').textContent;"
            " return t.includes('hello cookie') && t; })()", timeout=20)
        assert re.search(r"\b200\b", shown), shown
        scope = '[data-endpoint="POST /echo"]'
        page.type(f"{scope} textarea", '{"from": "cookie"}')
        page.click(f"{scope} [data-try]")
        shown = page.wait_for(
            f"(() => {{ const t = document.querySelector('{scope} [data-result]').textContent;"
            " return t.includes('cookie') && t; })()", timeout=20)
        assert json.loads(shown[shown.index("{"):])["body"] == {"from": "cookie"}, shown
        status = page.wait_for("(() => { const t = document.querySelector("
                               "'[data-pool-status]').textContent; return /idle/.test(t) && t;"
                               " })()", timeout=20)
        assert "1 idle" in status or "idle" in status
        html = page.evaluate("document.documentElement.outerHTML")
        assert INDEX_TOKEN not in html and cookie["value"] not in html
        posts = server.metric("kgpool_http_requests_total", metric_line + ',code="200"')

        # A same-site page of another origin: the browser sends the cookie, kgpool refuses.
        page.goto(other.url(f"/same-site.html?kgpool={quote(root.rstrip('/'))}"))
        results = page.evaluate("window.results")
        assert results["noCors"] == "sent", results
        assert results["cors"] == "TypeError", results  # no CORS: unreadable, and refused
        assert server.metric("kgpool_http_requests_total", 'method="POST",code="401"') == 1
        assert server.metric("kgpool_http_requests_total",
                             metric_line + ',code="200"') == posts
        log = "\n".join(page.log)
    output = server.output()
    assert INDEX_TOKEN not in output and cookie["value"] not in output
    assert INDEX_TOKEN not in log
