"""The only place a ``requests.Session`` is built: user agent, timeouts, size caps, retries.

Sources call :func:`fetch` (bounded GET with conditional-GET validators); providers call
:func:`build_session` and handle retries themselves through the sender, because only the
send ledger knows whether a retry is safe.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import MaxRetryError, NewConnectionError

from digest import __version__
from digest.errors import SourceError

USER_AGENT = f"digest/{__version__} (+https://github.com/digest-newsletter/digest; newsletter digest bot)"
DEFAULT_TIMEOUT = (5.0, 30.0)  # connect, read
MAX_BYTES = 10 * 1024 * 1024  # decompressed body cap
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class BodyParts:
    """A request body kept as the pieces it was built from, never joined whole.

    Why: a batch of full bodies (Postmark's 500 messages of ~50 KB) is ~25 MB once joined, and
    joining it for every batch in flight made the sender's memory grow with its concurrency
    (and the allocator kept much of it). As pieces, a batch holds mostly references to the
    draft's shared parts.

    Over plain HTTP (a session from :func:`build_session`), the pieces go to the socket as
    they are, up to :data:`GATHER` of them per ``sendmsg`` call: no copy of the body is made
    at all. Anywhere else (HTTPS, a proxy, a test double) the body is iterated: slices of
    about 1 MiB, each one copy of its pieces. Why 1 MiB: Postmark batches went out 5-12%
    faster than in slices of 256 KiB, and slower again in slices of 4 MiB, or with the large
    shared parts written without a copy, one write each (benchmarks/RESULTS.md).
    ``len()`` is the byte length (it becomes Content-Length); iterating again sends the same
    bytes again; ``bytes()`` joins it.
    """

    SLICE = 1024 * 1024

    def __init__(self, parts: Sequence[bytes]) -> None:
        self.parts = parts
        self._length = sum(map(len, parts))

    def __len__(self) -> int:
        return self._length

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __iter__(self) -> Iterator[bytes]:
        chunk: list[bytes] = []
        size = 0
        for part in self.parts:
            chunk.append(part)
            size += len(part)
            if size >= self.SLICE:
                yield b"".join(chunk)
                chunk, size = [], 0
        if chunk:
            yield b"".join(chunk)


#: The most pieces one ``sendmsg`` call takes (Linux's IOV_MAX).
GATHER = 1024


def send_gathered(sock: Any, parts: Sequence[bytes]) -> None:
    """Send ``parts`` on ``sock`` in order, as ``sendall`` would send them joined: up to
    :data:`GATHER` pieces per ``sendmsg`` call, a call that sent part of a piece going on
    from where it stopped. (The socket's timeout applies to each call, as to ``sendall``'s.)"""
    index, offset, count = 0, 0, len(parts)
    while index < count:
        window: list[bytes | memoryview] = list(parts[index:index + GATHER])
        if offset:
            window[0] = memoryview(window[0])[offset:]
        sent = sock.sendmsg(window)
        before = (index, offset)
        for piece in window:  # past the pieces it sent whole, to the one it stopped in
            size = len(piece)
            if sent < size:
                offset += sent
                break
            sent -= size
            index, offset = index + 1, 0
        if (index, offset) == before:  # a blocking socket that took nothing: never again
            raise ConnectionError("the connection took no more of the request body")


class _GatheringConnection(urllib3.connection.HTTPConnection):
    """A plain-HTTP connection that sends a :class:`BodyParts` body with :func:`send_gathered`."""

    def request(self, method: str, url: str, body: Any = None, headers: Mapping[str, Any] | None = None,
                **kwargs: Any) -> None:
        if isinstance(body, BodyParts) and headers is not None and any(
                k.lower() == "content-length" for k in headers):
            body = (body,)  # urllib3 hands each item of an iterable body to send(): the whole body
        super().request(method, url, body=body, headers=headers, **kwargs)

    def send(self, data: Any) -> None:
        if not isinstance(data, BodyParts):
            super().send(data)
        elif self.sock is None or not hasattr(self.sock, "sendmsg"):
            for chunk in data:
                super().send(chunk)
        else:
            send_gathered(self.sock, data.parts)


class _GatheringPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GatheringConnection


def build_session(*, pool_size: int = 10, user_agent: str = USER_AGENT) -> requests.Session:
    """A session with our user agent, a redirect cap and a connection pool of ``pool_size``.
    Plain-HTTP connections send a :class:`BodyParts` body without copying it."""
    session = requests.Session()
    session.headers["User-Agent"] = user_agent
    session.max_redirects = MAX_REDIRECTS
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    pools = adapter.poolmanager.pool_classes_by_scheme
    adapter.poolmanager.pool_classes_by_scheme = {**pools, "http": _GatheringPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def read_environment_once(session: requests.Session, url: str) -> None:
    """Settle, once, what ``requests`` otherwise reads from the environment on every request
    to ``url``: the proxy (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, with ``NO_PROXY``
    applied to this URL's host) and the CA bundle (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``),
    each overriding the session's own as in ``requests``.

    For a provider's session, which sends batch after batch to one host (``NO_PROXY`` is
    read for that host): the per-request reading (the environment, a ``.netrc`` lookup) cost
    a third of each call's own CPU time. ``.netrc`` is not read at all: a provider
    authenticates with its own header, which a password from a file must not replace.
    Raises ``ValueError`` for a URL that cannot be parsed.
    """
    if not session.trust_env:
        return
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


class ApiCalls:
    """Calls to a provider's API through ``session``'s adapter, without the session's
    per-request bookkeeping: what a provider's batch after batch to one host does not use.

    ``Session.request`` merges the session's cookies, hooks and settings into every request,
    parses its URL again, and after the answer stores the cookies it set and looks for a
    redirect; that was a third of a provider call's CPU time (``bench_send.py http``). Here a
    URL is parsed once (a provider calls a handful), the session's headers (the user agent)
    are merged with the call's, the body and any credentials in the URL are prepared by
    ``requests`` itself, and the request goes to the session's adapter with the session's
    proxies, CA bundle and client certificate. No cookies are sent or kept (provider APIs
    authenticate with a header), no redirect is followed (a provider API that redirects is
    misconfigured) and no hooks run. Read the environment first
    (:func:`read_environment_once`): nothing here reads it.
    """

    _MAX_URLS = 64

    def __init__(self, session: requests.Session) -> None:
        self.session = session
        self._urls: dict[str, str] = {}

    def url(self, url: str) -> str:
        """``url`` as ``requests`` prepares it; ``requests``' own errors for one it refuses."""
        prepared = self._urls.get(url)
        if prepared is None:
            request = requests.PreparedRequest()
            request.prepare_url(url, None)
            if len(self._urls) >= self._MAX_URLS:
                self._urls.clear()
            prepared = self._urls[url] = request.url or url
        return prepared

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: Any,
                 timeout: float | tuple[float, float] | None) -> requests.Response:
        """One request; the answer's body is not read yet (``response.content`` reads it)."""
        session = self.session
        request = requests.PreparedRequest()
        request.prepare_method(method)
        request.url = self.url(url)
        merged = CaseInsensitiveDict(session.headers)  # the call's own win, whatever their case
        merged.update(headers)
        request.prepare_headers(merged)
        request.prepare_body(body, None)
        request.prepare_auth(session.auth, request.url)
        return session.get_adapter(request.url).send(request, stream=False, timeout=timeout, verify=session.verify,
                                                     cert=session.cert, proxies=session.proxies)


# The longest a server's Retry-After (or rate-limit reset) is waited: a longer one (a daily
# quota, a misread header) is waited this long, and the retry then tells.
RETRY_AFTER_CAP = 300.0


def backoff_delay(attempt: int, retry_after: float | None = None, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2 ...): ``base`` doubling with each
    attempt, at most ``cap``; or the server's ``Retry-After`` where it asks for longer, at most
    ``RETRY_AFTER_CAP``. A ``Retry-After`` of 0, or a date already past (clocks that disagree),
    leaves the backoff: retries spent all at once help nobody."""
    return float(max(min(cap, base * 2 ** (attempt - 1)), min(retry_after or 0.0, RETRY_AFTER_CAP)))


def retry_after_seconds(value: str | None, *, now: datetime | None = None,
                        cap: float = RETRY_AFTER_CAP) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date), capped at ``cap`` seconds."""
    if not value:
        return None
    value = value.strip()
    # isascii(): str.isdigit() is also true for "²" and other Unicode digits that float()
    # rejects, and header values arrive decoded as Latin-1, so a hostile server can send one.
    if value.isascii() and value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), cap)


def reset_at_seconds(value: str | None, *, now: datetime, cap: float = RETRY_AFTER_CAP) -> float | None:
    """Seconds from ``now`` until the Unix time in a rate-limit reset header (SendGrid's
    ``X-RateLimit-Reset``), capped at ``cap``; None when the header is absent, unreadable, or
    names a time already past: that says nothing about when to call (the window reset
    already, or the clocks disagree), so the caller's own backoff applies instead of 0."""
    if not value:
        return None
    value = value.strip()
    # isascii(): as in retry_after_seconds; and no float("nan"), "inf" or exponents.
    if not (value.isascii() and value.replace(".", "", 1).isdigit()):
        return None
    delta = float(value) - now.timestamp()
    return min(delta, cap) if delta > 0 else None


@dataclass(frozen=True)
class Fetched:
    """A bounded HTTP GET's outcome."""

    url: str
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    not_modified: bool = False
    wire_bytes: int = 0

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")

    @property
    def last_modified(self) -> str | None:
        return self.headers.get("last-modified")


def fetch(
    session: requests.Session,
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_BYTES,
    retries: int = 3,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Fetched:
    """GET ``url`` with conditional validators, a size cap, and retries on 429/5xx/network errors.

    Raises :class:`SourceError` for anything that is not a 2xx or 304 after the retries.
    """
    request_headers = dict(headers or {})
    if etag:
        request_headers["If-None-Match"] = etag
    if last_modified:
        request_headers["If-Modified-Since"] = last_modified
    attempt = 0
    while True:
        attempt += 1
        try:
            response = _get_following(session, url, request_headers, timeout)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise SourceError(f"{url}: not a usable URL: {exc}") from exc  # retrying cannot help
        except requests.RequestException as exc:
            if attempt <= retries:
                sleep(backoff * 2 ** (attempt - 1))
                continue
            raise SourceError(f"{url}: {describe(exc)}") from exc
        with response:
            if response.status_code in RETRY_STATUSES and attempt <= retries:
                _drain(response)
                sleep(backoff_delay(attempt, retry_after_seconds(response.headers.get("Retry-After"), cap=60.0),
                                    base=backoff))
                continue
            lowered = {k.lower(): v for k, v in response.headers.items()}
            if response.status_code == 304:
                _drain(response)  # an unread response closes the connection instead of reusing it
                return Fetched(url=response.url, status=304, headers=lowered, not_modified=True)
            if not 200 <= response.status_code < 300:
                raise SourceError(f"{url}: HTTP {response.status_code}", status=response.status_code)
            declared = lowered.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
                raise SourceError(f"{url}: body of {declared} bytes is over the {max_bytes}-byte cap")
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in response.iter_content(65536):
                    size += len(chunk)
                    if size > max_bytes:
                        raise SourceError(f"{url}: body is over the {max_bytes}-byte cap")
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise SourceError(f"{url}: {describe(exc)} while reading") from exc
            tell = getattr(response.raw, "tell", None)  # bytes on the wire (compressed), if known
            wire = int(tell() or size) if callable(tell) else size
            return Fetched(url=response.url, status=response.status_code, body=b"".join(chunks),
                           headers=lowered, wire_bytes=wire)


# Request headers that may follow a redirect to another origin. Anything else (an API key in
# Api-Key, a session cookie) stays with the origin it was meant for: requests itself strips
# only Authorization when a redirect changes host.
_PORTABLE_HEADERS = frozenset({"accept", "accept-encoding", "accept-language", "user-agent",
                               "if-none-match", "if-modified-since"})


def describe(exc: BaseException) -> str:
    """One short phrase for a network failure, instead of urllib3's nested reprs.

    A failure to go through the configured proxy (``requests.exceptions.ProxyError``) names
    the proxy, not the host the request was for: "connection refused by api.postmarkapp.com"
    sent the operator to the provider (or delivery.base_url) when the proxy had refused.
    """
    text = repr(exc)
    if isinstance(exc, requests.exceptions.ProxyError):
        return _describe_proxy(exc, text)
    host = _request_host(exc)
    if "NameResolutionError" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return f"cannot resolve the host name {host}".rstrip()
    if "ConnectionRefusedError" in text or "Connection refused" in text:
        return f"connection refused by {host}".rstrip()
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"timed out connecting to {host}".rstrip()
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "timed out waiting for the answer"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate or handshake)"
    if "Connection reset" in text or "RemoteDisconnected" in text or "ConnectionResetError" in text:
        return "the connection was closed before an answer"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


_TUNNEL_REFUSED_RE = re.compile(r"Tunnel connection failed: (\d{3}\b[^'\"\\)]*)")


def _describe_proxy(exc: requests.exceptions.ProxyError, text: str) -> str:
    """:func:`describe` for a failure at the proxy: the proxy named by its host (and port),
    never its credentials."""
    proxy = proxy_host(exc)
    name = f"the proxy {proxy}" if proxy else "the proxy"
    if "NameResolutionError" in text or "Name or service not known" in text or "nodename nor servname" in text:
        return f"cannot resolve the host name of {name}"
    if "ConnectionRefusedError" in text or "Connection refused" in text:
        return f"{name} refused the connection"
    if "ConnectTimeoutError" in text or "timed out" in text:
        return f"timed out connecting to {name}"
    refused = _TUNNEL_REFUSED_RE.search(text)
    if refused:
        return f"{name} refused to open a tunnel to {_request_host(exc) or 'the host'} ({refused.group(1).strip()})"
    return f"cannot reach {name}"


def _request_host(exc: BaseException) -> str:
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    return (urlsplit(url).hostname or "") if isinstance(url, str) else ""


def proxy_host(exc: BaseException) -> str:
    """``host`` or ``host:port`` of the proxy a failed request went through, read from the
    exception urllib3 raised (its connection pool's proxy, or the connection that failed);
    ``""`` when it does not say. Never the proxy's credentials."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    conn_host = ""
    while todo and len(seen) < 20:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MaxRetryError):
            proxy = getattr(current.pool, "proxy", None)
            if proxy is not None and proxy.host:
                return _host_port(proxy.host, proxy.port)
        if isinstance(current, NewConnectionError) and not conn_host:
            # Through a proxy, the connection urllib3 could not make was the one to the proxy.
            conn = current.conn
            conn_host = _host_port(str(conn.host), conn.port) if conn is not None and conn.host else ""
        todo += [getattr(current, "reason", None), getattr(current, "original_error", None),
                 current.__cause__, current.__context__, *current.args]
    return conn_host


def _host_port(host: str, port: int | None) -> str:
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _get_following(session: requests.Session, url: str, headers: dict[str, str],
                   timeout: tuple[float, float]) -> requests.Response:
    """GET with redirects followed by hand: at most MAX_REDIRECTS, http(s) only, and
    credentials dropped when the origin changes."""
    current, sent = url, dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(current, headers=sent, timeout=timeout, stream=True, allow_redirects=False)
        if not response.is_redirect:
            return response
        target = urljoin(current, response.headers.get("location", ""))
        _drain(response)
        response.close()
        if urlsplit(target).scheme not in ("http", "https"):
            raise SourceError(f"{url}: redirected to a non-http URL")
        if _origin(target) != _origin(current):
            sent = {k: v for k, v in sent.items() if k.lower() in _PORTABLE_HEADERS}
        current = target
    raise SourceError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _drain(response: requests.Response, limit: int = 65536) -> None:
    """Read a small unwanted body so the connection goes back to the pool."""
    try:
        response.raw.read(limit, decode_content=False)
    except Exception:  # the connection is dropped then, which is only slower
        pass


def get_json(
    session: requests.Session,
    url: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_BYTES,
    retries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """GET ``url`` (with ``params``) through :func:`fetch` and decode JSON; ``SourceError`` if it is not JSON."""
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urlencode(params, doseq=True)}"
    request_headers = {"Accept": "application/json", **(headers or {})}
    fetched = fetch(session, url, headers=request_headers, timeout=timeout, max_bytes=max_bytes,
                    retries=retries, sleep=sleep)
    try:
        return json.loads(fetched.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{url}: the answer is not JSON ({exc.__class__.__name__})") from exc
