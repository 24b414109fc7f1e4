"""z4j.brain.http.dashboard_page: the dashboard's files, their types, caching and compression."""

from __future__ import annotations

import gzip
from typing import Any

import pytest

from z4j.brain.http.dashboard_page import dashboard_pages, resolve, serve_static, static_files


async def _yes(headers: Any) -> bool:
    return True


async def _no(headers: Any) -> bool:
    return False


async def get(
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    signed_in: Any = _yes,
) -> tuple[bool, int | None, dict[bytes, bytes], bytes]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    served = await serve_static(scope, receive, send, path, signed_in=signed_in)
    if not served:
        assert sent == []
        return False, None, {}, b""
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return True, start["status"], dict(start["headers"]), body["body"]


def test_the_page_files_are_package_data() -> None:
    names = set(static_files())
    assert {"index.html", "login.html", "app.js", "login.js", "app.css", "logo.svg"} <= names


@pytest.mark.parametrize(
    ("path", "name", "content_type"),
    [
        ("/", "index.html", b"text/html; charset=utf-8"),
        ("/index.html", "index.html", b"text/html; charset=utf-8"),
        ("/login", "login.html", b"text/html; charset=utf-8"),
        ("/static/app.js", "app.js", b"text/javascript; charset=utf-8"),
        ("/static/app.css", "app.css", b"text/css; charset=utf-8"),
        ("/static/logo.svg", "logo.svg", b"image/svg+xml"),
        ("app.js", "app.js", b"text/javascript; charset=utf-8"),
    ],
)
async def test_paths_and_content_types(path: str, name: str, content_type: bytes) -> None:
    served, status, headers, body = await get(path)
    assert served and status == 200
    assert headers[b"content-type"] == content_type
    assert body == static_files()[name].body
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"cache-control"] == b"no-cache"
    assert headers[b"x-content-type-options"] == b"nosniff"


@pytest.mark.parametrize(
    "path", ["/", "/index.html", "/static/index.html", "//index.html", "///static/index.html"]
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("signed_in", [_no, None])
async def test_the_dashboard_html_needs_a_session_by_any_path(
    path: str, method: str, signed_in: Any
) -> None:
    """The check is on the file, not the path's spelling (no check given: never served)."""
    served, status, headers, body = await get(path, method=method, signed_in=signed_in)
    assert served and status == 303 and headers[b"location"] == b"/login" and body == b""
    served, status, _, _ = await get("/login", method=method, signed_in=signed_in)
    assert served and status == 200


async def test_dashboard_pages_asks_the_given_check() -> None:
    asked: list[Any] = []

    async def check(headers: Any) -> bool:
        asked.append(headers)
        return True

    pages = dashboard_pages(check)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", b"c")]}
    assert await pages(scope, _never, send, "/static/index.html")
    assert asked == [[(b"cookie", b"c")]] and sent[0]["status"] == 200


async def _never() -> dict[str, Any]:
    raise AssertionError("a GET has no body to read")


async def test_html_gets_a_content_security_policy() -> None:
    _, _, headers, _ = await get("/")
    csp = headers[b"content-security-policy"].decode()
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    _, _, headers, _ = await get("/static/app.js")
    assert b"content-security-policy" not in headers


@pytest.mark.parametrize(
    "path",
    [
        "/nope.js",
        "/static/",
        "/static/../dashboard_page.py",
        "/../__init__.py",
        "/static/%2e%2e/cli.py",
        "/static//etc/passwd",
        "/metrics",
        "/api/v1/instances",
    ],
)
async def test_anything_else_is_not_served(path: str) -> None:
    served, *_ = await get(path)
    assert not served


async def test_only_get_and_head() -> None:
    assert not (await get("/", method="POST"))[0]
    served, status, headers, body = await get("/static/app.js", method="HEAD")
    assert served and status == 200 and body == b""
    assert headers[b"content-length"] == str(len(static_files()["app.js"].body)).encode()


async def test_etag_revalidation() -> None:
    _, _, headers, _ = await get("/static/app.css")
    etag = headers[b"etag"].decode()
    served, status, headers, body = await get("/static/app.css", headers={"If-None-Match": etag})
    assert served and status == 304 and body == b""
    assert headers[b"etag"] == etag.encode()
    _, status, _, _ = await get("/static/app.css", headers={"If-None-Match": f'W/{etag}, "x"'})
    assert status == 304
    _, status, _, _ = await get("/static/app.css", headers={"If-None-Match": '"stale"'})
    assert status == 200


async def test_gzip_when_accepted() -> None:
    plain = static_files()["app.js"].body
    _, _, headers, body = await get("/static/app.js", headers={"Accept-Encoding": "gzip, br"})
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"vary"] == b"accept-encoding"
    assert gzip.decompress(body) == plain and len(body) < len(plain)
    _, _, headers, body = await get("/static/app.js", headers={"Accept-Encoding": "gzip;q=0"})
    assert b"content-encoding" not in headers and body == plain
    _, _, headers, body = await get("/static/app.js")
    assert b"content-encoding" not in headers and body == plain


def test_resolve() -> None:
    assert resolve("/") is static_files()["index.html"]
    assert resolve("/login") is static_files()["login.html"]
    assert resolve("/static/login.js") is static_files()["login.js"]
    assert resolve("/static") is None
