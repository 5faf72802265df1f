"""A browser's way past the token: `?token=` once, swapped for a cookie derived from it.

A browser cannot send `Authorization: Bearer` when it opens a page, so, as Jupyter servers do,
a valid `?token=` on the index page (or on any page a browser navigates to) is answered with a
redirect to the same URL without it (out of the address bar and the history) that sets a
cookie. The cookie holds an HMAC of the token, never the token: it is useless as a Bearer token
and its value reveals nothing kgpool would echo. It is HttpOnly (no script reads it),
SameSite=Strict (no other site's page or link makes the browser send it), Secure over TLS and
scoped to --base-url. The same token always gives the same cookie, so several replicas behind
one address accept each other's, and a new token retires old cookies; it lasts as long as the
browser session.

Cross-site requests never carry the cookie (SameSite=Strict). Pages on the same *site* but
another origin (another port of the same host, a sibling subdomain) do get it sent, so the
cookie alone authenticates only what such a page cannot misuse:
- GET and HEAD of the index page: no side effect, and another origin cannot read the answer;
- a request the browser itself marks `Sec-Fetch-Site: same-origin` (or `none`: typed,
  bookmarked), which no page can forge (browsers send it to HTTPS and loopback servers);
- a request with the `X-Kgpool-Page` header, which the index page's own calls add: a page on
  another origin can only add it after a CORS preflight, and kgpool grants none that carries
  credentials unless --allow-credentials trusts that origin by name.
Anything else needs the token itself. Content the notebook serves on kgpool's origin (an
endpoint answering HTML with scripts) is same-origin and trusted like the index page.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

from multidict import CIMultiDictProxy

PAGE_HEADER = "X-Kgpool-Page"
_SESSION = b"kgpool browser session v1"
_NAME = b"kgpool cookie name v1"
_LOCATION_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "\\")


@dataclass(frozen=True)
class BrowserCookie:
    """The cookie that stands for the token: its name, value and path."""

    name: str
    value: str
    path: str

    @classmethod
    def for_token(cls, token: str, base_path: str) -> BrowserCookie:
        """Named after the token too (a short HMAC), so that two kgpool servers on one host
        with different tokens (cookies ignore ports) do not overwrite each other's."""
        key = token.encode("utf-8", "surrogateescape")
        name = hmac.new(key, _NAME, hashlib.sha256).hexdigest()[:12]
        value = hmac.new(key, _SESSION, hashlib.sha256).hexdigest()
        return cls(f"kgpool-auth-{name}", value, base_path or "/")

    def header(self, secure: bool) -> str:
        """The Set-Cookie value."""
        return (f"{self.name}={self.value}; Path={self.path}; HttpOnly; SameSite=Strict"
                + ("; Secure" if secure else ""))

    def presented(self, cookie_header: str) -> bool:
        for name, value in _pairs(cookie_header):
            if name == self.name and hmac.compare_digest(value.encode("utf-8",
                                                         "surrogateescape"),
                                                         self.value.encode()):
                return True
        return False

    def removed_from(self, cookie_header: str) -> str:
        """The Cookie header without this cookie (what notebook code may see); as it was
        when it does not hold it."""
        pairs = _pairs(cookie_header)
        if all(name != self.name for name, _ in pairs):
            return cookie_header
        return "; ".join(f"{name}={value}" for name, value in pairs if name != self.name)


def _pairs(cookie_header: str) -> list[tuple[str, str]]:
    pairs = []
    for part in cookie_header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            pairs.append((name.strip(), value.strip()))
    return pairs


def trusted_use(method: str, headers: CIMultiDictProxy[str], index: bool) -> bool:
    """Whether a request carrying the valid cookie may be authenticated by it (see above)."""
    site = headers.get("Sec-Fetch-Site")
    if index and method in ("GET", "HEAD"):
        return True
    if site in ("same-origin", "none"):
        return True
    return site is None and PAGE_HEADER in headers


def navigation(headers: CIMultiDictProxy[str]) -> bool:
    """A browser opening a page (not a script's fetch, not curl): what Sec-Fetch-Mode says."""
    return headers.get("Sec-Fetch-Mode") == "navigate"


def without_token(raw_path: str, raw_query: str) -> str:
    """Where to send a browser that came with `?token=`: the same URL without it, as a
    relative reference (`./last-segment?rest`), right behind a proxy that moves kgpool."""
    kept = [part for part in raw_query.split("&")
            if part and unquote_plus(part.partition("=")[0]) != "token"]
    last = raw_path.rsplit("/", 1)[-1]
    # a header value: printable ASCII only; and no backslash, which browsers read as "/"
    return quote("./" + last + ("?" + "&".join(kept) if kept else ""), safe=_LOCATION_SAFE)
