"""The token for browsers: `?token=` once, swapped for an HttpOnly SameSite=Strict cookie that
holds an HMAC of it; the cookie authenticates only same-origin use; neither reaches notebook
code, answers or logs. (Chromium itself: tests/test_browser.py.)"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import NOTEBOOKS, Server
from multidict import CIMultiDict, CIMultiDictProxy

import kgpool.testing
from kgpool.cookies import PAGE_HEADER, BrowserCookie, trusted_use, without_token

# kgpool's web layer alone: the channel to the kernel plays no part
pytestmark = [pytest.mark.timeout(120), pytest.mark.channel_independent]

TOKEN = "cookie-test-t0ken-0123456789"
KITCHEN = NOTEBOOKS / "kitchen.ipynb"
CHANNEL = os.environ.get("KGPOOL_CHANNEL", "direct")
COOKIE = BrowserCookie.for_token(TOKEN, "")


# ----- pure parts ------------------------------------------------------------------------

@pytest.mark.parametrize("path,query,location", [
    ("/", "token=abc", "./"),
    ("/", "a=1&token=abc&b=%20x", "./?a=1&b=%20x"),
    ("/v1/", "token=abc", "./"),
    ("/v1", "token=abc", "./v1"),
    ("/users/42", "token=t&x=1&token=u", "./42?x=1"),
    ("/", "tok%65n=abc&tokens=1&token", "./?tokens=1"),  # an escaped name is the same name
    ("/a:b", "token=x", "./a:b"),  # never read as a scheme
    ("/x/\\evil.example", "token=x", "./%5Cevil.example"),  # nor as another host
    ("/caf\u00e9", "token=x&q=\u00e9 x", "./caf%C3%A9?q=%C3%A9%20x"),  # a header value
])
def test_redirect_drops_every_token_parameter(path: str, query: str, location: str) -> None:
    assert without_token(path, query) == location


def test_the_cookie_is_derived_from_the_token_and_never_holds_it() -> None:
    cookie = BrowserCookie.for_token(TOKEN, "/v1")
    assert TOKEN not in cookie.name + cookie.value
    assert cookie == BrowserCookie.for_token(TOKEN, "/v1")  # replicas agree
    other = BrowserCookie.for_token(TOKEN + "x", "/v1")
    assert other.name != cookie.name and other.value != cookie.value
    assert cookie.header(secure=False) == \
        f"{cookie.name}={cookie.value}; Path=/v1; HttpOnly; SameSite=Strict"
    assert cookie.header(secure=True).endswith("; SameSite=Strict; Secure")
    assert BrowserCookie.for_token(TOKEN, "").path == "/"
    assert cookie.presented(f"a=1; {cookie.name}={cookie.value}")
    assert not cookie.presented(f"{cookie.name}={cookie.value[:-1]}0")
    assert not cookie.presented(f"{other.name}={cookie.value}")
    assert not cookie.presented(f"{cookie.name}={TOKEN}")
    assert cookie.removed_from(f"a=1; {cookie.name}={cookie.value}; b=2") == "a=1; b=2"
    assert cookie.removed_from("a=1;b=2") == "a=1;b=2"  # untouched without kgpool's cookie


@pytest.mark.parametrize("method,headers,index,trusted", [
    ("GET", {}, True, True),  # the index page: no side effect, unreadable cross-origin
    ("HEAD", {}, True, True),
    ("POST", {}, True, False),
    ("GET", {}, False, False),  # an endpoint: a same-site page could trigger it
    ("GET", {PAGE_HEADER: "1"}, False, True),  # the index page's own calls
    ("POST", {PAGE_HEADER: "1"}, False, True),
    ("GET", {"Sec-Fetch-Site": "same-origin"}, False, True),
    ("POST", {"Sec-Fetch-Site": "same-origin"}, False, True),
    ("GET", {"Sec-Fetch-Site": "none"}, False, True),  # typed into the address bar
    ("POST", {"Sec-Fetch-Site": "same-site"}, False, False),
    ("POST", {"Sec-Fetch-Site": "same-site", PAGE_HEADER: "1"}, False, False),
    ("GET", {"Sec-Fetch-Site": "cross-site", PAGE_HEADER: "1"}, False, False),
])
def test_where_the_cookie_alone_authenticates(method: str, headers: dict[str, str],
                                              index: bool, trusted: bool) -> None:
    assert trusted_use(method, CIMultiDictProxy(CIMultiDict(headers)), index) is trusted


# ----- a served notebook -----------------------------------------------------------------

@pytest.fixture
async def served() -> AsyncIterator[kgpool.testing.Client]:
    async with kgpool.testing.serve(KITCHEN, channel=CHANNEL, auth_token=TOKEN) as client:
        yield client


async def fetch(client: kgpool.testing.Client, method: str, path: str,
                headers: dict[str, str] | None = None) -> tuple[int, CIMultiDictProxy[str], str]:
    """A request with exactly these headers: no cookie jar, redirects not followed."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.request(method, client.url + path, headers=headers or {},
                                   allow_redirects=False) as resp:
            return resp.status, resp.headers, await resp.text()


def with_cookie(**extra: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE.name}={COOKIE.value}", **extra}


def shows_no_secret(headers: CIMultiDictProxy[str], body: str) -> None:
    for text in (body, *headers.values()):
        assert TOKEN not in text


async def test_index_token_is_swapped_for_a_cookie(served: kgpool.testing.Client,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await fetch(served, "GET", "/?token=" + TOKEN)
    assert status == 303
    assert headers["Location"] == "./"
    assert headers["Set-Cookie"] == COOKIE.header(secure=False)  # HttpOnly, SameSite=Strict
    assert headers["Cache-Control"] == "no-store"
    shows_no_secret(headers, body)
    status, headers, body = await fetch(served, "GET", f"/?view=1&token={TOKEN}")
    assert (status, headers["Location"]) == (303, "./?view=1")

    status, headers, body = await fetch(served, "GET", "/", with_cookie())
    assert status == 200 and "data-kgpool-index" in body
    assert "Set-Cookie" not in headers
    shows_no_secret(headers, body)

    for wrong in ("/?token=wrong", "/"):
        assert (await fetch(served, "GET", wrong))[0] == 401
    bad = {"Cookie": f"{COOKIE.name}={COOKIE.value[::-1]}"}
    assert (await fetch(served, "GET", "/", bad))[0] == 401
    assert TOKEN not in caplog.text and COOKIE.value not in caplog.text


async def test_the_cookie_alone_is_not_enough_for_an_endpoint(
        served: kgpool.testing.Client) -> None:
    assert (await fetch(served, "GET", "/hello/world", with_cookie()))[0] == 401
    ok = await fetch(served, "GET", "/hello/world", with_cookie(**{PAGE_HEADER: "1"}))
    assert ok[0] == 200 and ok[2] == "fixed"
    same_origin = with_cookie(**{"Sec-Fetch-Site": "same-origin"})
    assert (await fetch(served, "POST", "/created", same_origin))[0] == 201
    for site in ("same-site", "cross-site"):
        refused = with_cookie(**{"Sec-Fetch-Site": site, PAGE_HEADER: "1"})
        assert (await fetch(served, "POST", "/created", refused))[0] == 401


async def test_api_clients_keep_kernel_gateway_token_query(
        served: kgpool.testing.Client) -> None:
    """A script's `GET /echo?token=T` is answered, not redirected (Kernel Gateway's clients);
    a browser opening that URL is sent to it without the token."""
    status, headers, body = await fetch(served, "GET", f"/echo?token={TOKEN}&word=hi")
    assert status == 200
    assert json.loads(body)["args"] == {"word": ["hi"]}
    assert "Set-Cookie" not in headers
    assert (await fetch(served, "POST", f"/echo?token={TOKEN}"))[0] == 200

    navigation = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none",
                  "Sec-Fetch-Dest": "document"}
    status, headers, body = await fetch(served, "GET", f"/echo?token={TOKEN}&word=hi",
                                        navigation)
    assert (status, headers["Location"]) == (303, "./echo?word=hi")
    assert headers["Set-Cookie"] == COOKIE.header(secure=False)
    status, headers, body = await fetch(served, "GET", "/echo?word=hi",
                                        with_cookie(**navigation))
    assert status == 200 and json.loads(body)["args"] == {"word": ["hi"]}


async def test_neither_token_nor_cookie_reaches_the_notebook(
        served: kgpool.testing.Client) -> None:
    status, _, body = await fetch(served, "GET", "/echo?a=1", {
        "Cookie": f"theirs=1; {COOKIE.name}={COOKIE.value}; also=2", PAGE_HEADER: "1"})
    assert status == 200
    request = json.loads(body)
    assert request["headers"]["Cookie"] == "theirs=1; also=2"
    assert COOKIE.value not in body and TOKEN not in body
    status, _, body = await fetch(served, "GET", "/echo", with_cookie(**{PAGE_HEADER: "1"}))
    assert "Cookie" not in json.loads(body)["headers"]
    status, _, body = await fetch(served, "GET", f"/echo?token={TOKEN}",
                                  {"Cookie": "theirs=1"})
    request = json.loads(body)
    assert request["args"] == {} and request["headers"]["Cookie"] == "theirs=1"
    assert TOKEN not in body


async def test_cookie_path_is_the_base_url() -> None:
    async with kgpool.testing.serve(KITCHEN, channel=CHANNEL, auth_token=TOKEN,
                                    base_url="/v1") as client:
        status, headers, _ = await fetch(client, "GET", "/?token=" + TOKEN)
        async with aiohttp.ClientSession() as session:  # outside --base-url: not kgpool's
            async with session.get(client.server.origin + "/?token=" + TOKEN,
                                   allow_redirects=False,
                                   headers={"Sec-Fetch-Mode": "navigate"}) as outside:
                assert outside.status == 404 and "Set-Cookie" not in outside.headers
    assert status == 303
    assert headers["Set-Cookie"] == BrowserCookie.for_token(TOKEN, "/v1").header(False)
    assert "; Path=/v1;" in headers["Set-Cookie"]


async def test_secure_behind_a_trusted_tls_proxy() -> None:
    async with kgpool.testing.serve(KITCHEN, channel=CHANNEL, auth_token=TOKEN,
                                    trust_xheaders=True) as client:
        status, headers, _ = await fetch(client, "GET", "/?token=" + TOKEN,
                                         {"X-Forwarded-Proto": "https"})
        assert status == 303 and headers["Set-Cookie"].endswith("; Secure")
        status, headers, _ = await fetch(client, "GET", "/?token=" + TOKEN)
        assert "Secure" not in headers["Set-Cookie"]


def test_secure_over_tls() -> None:
    """`kgpool serve --certfile`: the cookie is Secure."""
    with tempfile.TemporaryDirectory(prefix="kgpool-test-tls-") as folder:
        key, cert = Path(folder) / "key.pem", Path(folder) / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True, timeout=60)
        server = Server(KITCHEN, f"--certfile={cert}", f"--keyfile={key}",
                        env={"KGPOOL_AUTH_TOKEN": TOKEN})
        server.https = ssl.create_default_context(cafile=str(cert))
        with server:
            resp = server.get("/?token=" + TOKEN)
            assert resp.status == 303
            assert resp.headers["Set-Cookie"] == COOKIE.header(secure=True)
        assert TOKEN not in server.output() and COOKIE.value not in server.output()
