"""The dashboard's static files (``z4j/static``), served by the brain's ASGI app.

The page is plain HTML, CSS and JavaScript with no build step, so the files
are served as they sit in the package. They are read once, on first use,
into memory (a few tens of KiB), each with a strong ETag and, where it
saves bytes, a gzipped copy. Browsers revalidate on every load
(``Cache-Control: no-cache``) and get ``304 Not Modified`` while the file is
unchanged: an upgraded brain is picked up at once, an unchanged one costs a
round trip and no body.

Only names present in the package are served (a fixed table, built from the
directory listing), so a request path can never reach outside it.

The dashboard's HTML needs a signed-in session whatever path names it
(``/``, ``/index.html``, ``/static/index.html``, ``//index.html``...): the
check is made here, on the file resolved, not on the path's spelling. The
sign-in page and the scripts, styles and images are public.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

__all__ = [
    "PRIVATE_FILES",
    "StaticFile",
    "dashboard_pages",
    "resolve",
    "serve_static",
    "static_files",
]

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
SignedIn = Callable[[Iterable[tuple[bytes, bytes]]], Awaitable[bool]]
Pages = Callable[[Scope, Receive, Send, str], Awaitable[bool]]

# Files served only to a signed-in session (else a redirect to /login).
PRIVATE_FILES = frozenset({"index.html"})

_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
    ".txt": b"text/plain; charset=utf-8",
}
_COMPRESSIBLE = frozenset({".html", ".js", ".css", ".svg", ".json", ".txt"})

# The page loads only its own files and talks only to its own origin
# (REST and /ws/dashboard; 'self' covers ws: and wss: of the same host).
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    b"form-action 'self'; frame-ancestors 'none'"
)


@attrs.frozen(kw_only=True)
class StaticFile:
    """One file of the page, ready to send."""

    name: str
    content_type: bytes
    body: bytes
    gzipped: bytes | None
    etag: bytes


def _load() -> dict[str, StaticFile]:
    files: dict[str, StaticFile] = {}
    root = importlib.resources.files("z4j") / "static"
    for entry in root.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if not entry.is_file() or suffix not in _CONTENT_TYPES or name.startswith("."):
            continue
        body = entry.read_bytes()
        gzipped = None
        if suffix in _COMPRESSIBLE and len(body) > 1024:
            packed = gzip.compress(body, compresslevel=9, mtime=0)
            if len(packed) < len(body) * 0.9:
                gzipped = packed
        digest = hashlib.blake2b(body, digest_size=12).hexdigest()
        files[name] = StaticFile(
            name=name,
            content_type=_CONTENT_TYPES[suffix],
            body=body,
            gzipped=gzipped,
            etag=f'"{digest}"'.encode(),
        )
    return files


_files: dict[str, StaticFile] | None = None


def static_files() -> Mapping[str, StaticFile]:
    """Every servable file of ``z4j/static`` by name (read once, then cached)."""
    global _files
    if _files is None:
        _files = _load()
    return _files


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if bytes(key).lower() == name:
            return bytes(value)
    return b""


def _accepts_gzip(value: bytes) -> bool:
    for part in value.split(b","):
        coding, _, params = part.strip().partition(b";")
        if coding.strip().lower() == b"gzip":
            return params.replace(b" ", b"").lower() not in (b"q=0", b"q=0.0", b"q=0.00")
    return False


def _etag_matches(value: bytes, etag: bytes) -> bool:
    if value.strip() == b"*":
        return True
    for candidate in value.split(b","):
        candidate = candidate.strip()
        if candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


# The page's addresses: the dashboard at "/", the sign-in page at "/login", setup at "/setup",
# everything else under "/static/" (a bare file name is accepted too).
_ROUTES = {
    "": "index.html",
    "index.html": "index.html",
    "login": "login.html",
    "setup": "setup.html",  # the first-run setup link (auth.announce_setup)
}


def resolve(path: str) -> StaticFile | None:
    """The file a request path names, if any."""
    name = path.lstrip("/")
    name = _ROUTES.get(name, name.removeprefix("static/"))
    return static_files().get(name)


def dashboard_pages(signed_in: SignedIn) -> Pages:
    """`serve_static` with the sign-in check the dashboard's HTML needs."""
    return functools.partial(serve_static, signed_in=signed_in)


async def serve_static(
    scope: Scope,
    receive: Receive,
    send: Send,
    path: str,
    *,
    signed_in: SignedIn | None = None,
) -> bool:
    """Answer a GET or HEAD for ``path``: ``/`` (the dashboard), ``/login``, or
    ``/static/<file>`` (a file of ``z4j/static``). False, having sent
    nothing, when there is no such file or the method is neither GET nor
    HEAD. A file of `PRIVATE_FILES` is sent only when ``signed_in`` says
    the request's headers are signed in (none given: never), else a
    redirect to ``/login``."""
    if scope.get("type") != "http" or scope.get("method") not in ("GET", "HEAD"):
        return False
    file = resolve(path)
    if file is None:
        return False
    if file.name in PRIVATE_FILES and (
        signed_in is None or not await signed_in(scope.get("headers", ()))
    ):
        headers = [(b"location", b"/login"), (b"content-length", b"0")]
        headers.append((b"cache-control", b"no-store"))
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True
    headers = [
        (b"content-type", file.content_type),
        (b"cache-control", b"no-cache"),
        (b"etag", file.etag),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    if file.content_type.startswith(b"text/html"):
        headers += [(b"content-security-policy", _CSP), (b"x-frame-options", b"DENY")]
    if file.gzipped is not None:
        headers.append((b"vary", b"accept-encoding"))
    if _etag_matches(_header(scope, b"if-none-match"), file.etag):
        headers = [(k, v) for k, v in headers if k != b"content-type"]
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True
    body = file.body
    if file.gzipped is not None and _accepts_gzip(_header(scope, b"accept-encoding")):
        body = file.gzipped
        headers.append((b"content-encoding", b"gzip"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
    return True
