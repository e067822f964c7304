"""Outbound HTTP to user-supplied URLs (image URLs, webhooks) without server-side request forgery.

A URL is resolved once, every address it resolves to must be public (or allow-listed), and the connection then
goes to that checked address: the request URL is rewritten to the IP, `Host` carries the original name and, for
https, the TLS layer is given the name as SNI, so certificate verification still checks the real host. There is
no second lookup for a DNS-rebinding answer to slip into. Redirects are followed by hand, a few at most, and each
`Location` goes through the same check; a public host may not redirect into the allow-list. Bodies are streamed and
cut at a limit, never read whole first: the raw bytes are read and decoded here (gzip or deflate, one layer), so
the limit counts decoded bytes as they are produced and a compressed bomb never inflates past it. URLs carrying
credentials (`user:pass@`) are refused: they would be sent as Basic auth and echoed back.

Names are resolved in a small thread pool of their own (`ThreadedResolver`) with a deadline and a bound on lookups
in flight, never in asyncio's default executor: a silent nameserver cannot tie up the threads the rest of the
gateway needs.

Ranges are listed here explicitly rather than taken from `ipaddress.is_global` alone: that flag changes between
Python versions and calls multicast, 6to4 and IPv4-compatible IPv6 "global" in 3.11.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import re
import socket
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.cookiejar import Cookie, DefaultCookiePolicy
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import unquote

import anyio
import httpx

from gateway.errors import UrlNotAllowed

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"http": 80, "https": 443})
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CONNECT_TIMEOUT_S = 5.0  # a host that never answers the handshake is given up on early, whatever the budget
DEFAULT_STREAM_LIMIT = 64 * 1024  # for `send`: webhook receivers and the like answer with small bodies
NOT_ALLOWED_MESSAGE = "URL not allowed"
_URL_DISPLAY_CHARS = 200
# Credentials must not follow a redirect to another origin (what browsers and httpx do as well).
_ORIGIN_BOUND_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding", "content-encoding"})
# Legacy IPv4 spellings (2130706433, 0x7f.1, 127.1) that getaddrinfo accepts without DNS through inet_aton.
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # the ASCII (IDNA) form; anything else is no DNS name
# DNS: threads of the outbound resolver, how long a lookup may take, and lookups in flight per thread at most
# (queued ones included; a lookup abandoned at its deadline holds its place until its thread returns).
DNS_THREADS = 4
DNS_TIMEOUT_S = 5.0
DNS_PENDING_PER_THREAD = 4
# Content codings decoded here (one layer at most); anything else is refused, never passed through undecoded.
_GZIP_CODINGS = frozenset({"gzip", "x-gzip"})
_DEFLATE_CODINGS = frozenset({"deflate"})


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in pairs)


# First match wins, so specific entries (the metadata endpoint, broadcast) come before their enclosing ranges.
_BLOCKED_V4 = _nets(
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.169.254/32", "a link-local address (the cloud metadata endpoint)"),
    ("169.254.0.0/16", "a link-local address"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "a broadcast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("192.0.0.0/24", "a reserved (IETF protocol assignment) address"),
    ("192.0.2.0/24", "a documentation address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("192.88.99.0/24", "a reserved (6to4 relay) address"),
)
_BLOCKED_V6 = _nets(
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
    ("64:ff9b:1::/48", "a reserved (local-use NAT64) address"),
    ("100::/64", "a reserved (discard-only) address"),
    ("2001::/23", "a reserved (IETF protocol assignment, Teredo included) address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
)
# IPv6 ranges whose low bits carry an IPv4 address that the packet may end up at: that IPv4 is what is checked.
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be called ("a loopback address", ...), or None for a public address."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        kind, v4 = embedded
        inner = refusal_reason(v4)
        return None if inner is None else f"{kind} form of {v4}, {inner}"
    table = _BLOCKED_V4 if ip.version == 4 else _BLOCKED_V6
    for network, why in table:
        if ip in network:
            return why
    # A safety net for whatever the tables miss (IANA-reserved IPv6 space outside 2000::/3, future ranges).
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_unspecified:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(ip: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _MAPPED:
        return "an IPv4-mapped", low32
    if ip in _NAT64:
        return "a NAT64", low32
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves (unspecified, loopback)
        return "an IPv4-compatible", low32
    if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
        return "a 6to4", ip.sixtofour
    return None


def _kind_of_address(ip: IPAddress, reason: str) -> str:
    """`reason` (`refusal_reason(ip)`) without the address it may name: what a client is told of the address a
    name resolves to (the name's address is the deployment's business; a literal's is the client's own)."""
    embedded = _embedded_ipv4(ip)
    if embedded is None:
        return reason
    kind, v4 = embedded
    return f"{kind} form of {refusal_reason(v4) or 'a non-public address'}"


def _normalise_host(name: str) -> str:
    host = name.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


@dataclass(frozen=True)
class OutboundPolicy:
    """Which outbound targets are allowed besides public addresses, and how names are resolved.

    `allow` entries are hostnames (exact, case-insensitive) or IP addresses/CIDRs; an allowed host or address is
    exempt from the private-range block (tests, private deployments). `resolver` maps (host, port) to addresses;
    None uses the system resolver. Injecting one lets tests make any name resolve anywhere without DNS.
    """

    allow: tuple[str, ...] = ()
    resolver: Resolver | None = None
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in self.allow:
            text = entry.strip().strip("[]")
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                if "/" in text or ":" in text:
                    raise ValueError(f"outbound allow-list entry {entry!r} is neither a hostname nor a CIDR") from None
                hosts.add(_normalise_host(text))
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        resolver = shared_resolver(settings.outbound_dns_threads, settings.outbound_dns_timeout_s)
        return cls(allow=tuple(settings.outbound_allow), resolver=resolver)

    def host_allowed(self, host: str) -> bool:
        return _normalise_host(host) in self._hosts

    def address_allowed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            candidates.append(embedded[1])
        return any(c.version == n.version and c in n for c in candidates for n in self._networks)


@dataclass(frozen=True)
class ResolvedTarget:
    """A URL that passed the check: its host by name, the port, and the address the connection must go to."""

    url: httpx.URL
    host: str  # as in the URL, ASCII (IDNA) form, IPv6 without brackets
    port: int
    ip: str  # the checked address to connect to
    addresses: tuple[str, ...]  # every address the host resolved to, all checked
    internal: bool = False  # reachable only through the allow-list (some address is not public)

    @property
    def connect_url(self) -> httpx.URL:
        """The URL with its host replaced by the checked address; everything else (port, path, query) kept, and
        never any userinfo (httpx would send it as Basic auth)."""
        return self.url.copy_with(host=self.ip, port=self.port, userinfo=b"")


class OutboundError(Exception):
    """The call could not be made or completed, for a reason that is not the policy's (`UrlNotAllowed` is)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostNotResolved(OutboundError):
    """DNS gave no usable address for the host."""


class TooManyRedirects(OutboundError):
    """More redirects than the caller allowed."""


class BadRedirect(OutboundError):
    """A redirect without a usable `Location`."""


class DnsBusy(OutboundError):
    """Too many lookups in flight already (a slow or silent nameserver): refused at once, retry later."""


class BadContentEncoding(OutboundError):
    """A Content-Encoding not decoded here (br, stacked codings, ...) or a corrupt or truncated compressed body."""


class ResponseTooLarge(OutboundError):
    """The body is over the caller's limit; raised before reading it when Content-Length says so."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body over {limit} bytes")
        self.limit = limit


def display_url(url: httpx.URL | str) -> str:
    """The URL for an error message: no credentials, bounded length."""
    try:
        text = str(httpx.URL(url).copy_with(userinfo=b""))
    except (httpx.InvalidURL, TypeError, ValueError):
        text = str(url)
    return text if len(text) <= _URL_DISPLAY_CHARS else text[: _URL_DISPLAY_CHARS - 3] + "..."


def _not_allowed(details: str) -> UrlNotAllowed:
    return UrlNotAllowed(NOT_ALLOWED_MESSAGE, details)


def parse_url(url: str | httpx.URL) -> httpx.URL:
    """An absolute http(s) URL with a host, or `UrlNotAllowed` saying what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _not_allowed("Not a valid URL") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise _not_allowed("Only http and https URLs are allowed")
    if not parsed.raw_host:
        raise _not_allowed("The URL has no host")
    if parsed.userinfo:
        raise _not_allowed("URLs with credentials (user:password@) are not allowed")
    port = parsed.port
    if port is not None and not 0 < port < 65536:
        raise _not_allowed(f"Port {port} is out of range")
    return parsed


def literal_ip(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one, in any spelling the system resolver would accept without DNS.

    httpx leaves `2130706433`, `0x7f.1` and `127.1` as they are; getaddrinfo reads them through inet_aton as
    127.0.0.1, so they are read the same way here. IPv6 zone ids arrive percent-encoded (`fe80::1%25eth0`).
    """
    text = unquote(host.strip("[]"))
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(text) and any(c.isdigit() for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _shown_literal(host: str, ip: IPAddress) -> str:
    """The host as written when it is a standard spelling of `ip`, else both (`0x7f.1 (127.0.0.1)`)."""
    try:
        standard = ipaddress.ip_address(unquote(host)) == ip
    except ValueError:
        standard = False
    return host if standard else f"{host} ({ip})"


def _getaddrinfo(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


class ThreadedResolver:
    """getaddrinfo in a bounded pool of its own, with a deadline per lookup and a cap on lookups in flight.

    A lookup that outlives `timeout_s` raises `HostNotResolved` (its thread finishes on its own: getaddrinfo cannot
    be interrupted); with `max_pending` lookups in flight (running, queued, or abandoned but still running) the
    next one raises `DnsBusy` at once instead of queueing behind a silent nameserver.
    """

    def __init__(
        self, *, threads: int = DNS_THREADS, timeout_s: float = DNS_TIMEOUT_S, max_pending: int | None = None
    ) -> None:
        self.threads = max(1, threads)
        self.timeout_s = timeout_s
        self.max_pending = max_pending if max_pending is not None else self.threads * DNS_PENDING_PER_THREAD
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def _release(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def _submit(self, host: str, port: int) -> concurrent.futures.Future[list[str]]:
        with self._lock:
            if self._pending >= self.max_pending:
                raise DnsBusy(f"too many DNS lookups in flight ({self._pending}); retry later")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="imagen-dns")
            future = self._executor.submit(_getaddrinfo, host, port)
            self._pending += 1
        future.add_done_callback(self._release)
        return future

    async def __call__(self, host: str, port: int) -> list[str]:
        future = self._submit(host, port)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise HostNotResolved(f"no DNS answer for '{host}' within {self.timeout_s:g}s") from None


@functools.lru_cache(maxsize=8)
def shared_resolver(threads: int = DNS_THREADS, timeout_s: float = DNS_TIMEOUT_S) -> ThreadedResolver:
    """One resolver (one pool) per configuration in the process: apps built with the same settings share it."""
    return ThreadedResolver(threads=threads, timeout_s=timeout_s)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for `host` (TCP), in its order; empty when the name does not resolve.

    Runs in the shared outbound DNS pool (`ThreadedResolver`), never in asyncio's default executor."""
    return await shared_resolver()(host, port)


def _parse_resolved(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise OutboundError(f"the resolver returned an invalid address {text!r}") from None


async def resolve_checked(url: str | httpx.URL, policy: OutboundPolicy) -> ResolvedTarget:
    """Resolve the URL's host once and check every address; return where to connect, or raise `UrlNotAllowed`.

    Literal IP hosts are checked without DNS. An allow-listed host name exempts all of its addresses; otherwise
    each address must be public or inside an allow-listed network. A name that does not resolve raises
    `HostNotResolved` (not a policy refusal: the caller decides what the client is told).
    """
    parsed = parse_url(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    literal = literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        if not _HOST_NAME.fullmatch(host):
            raise _not_allowed("The URL's host is not a valid name")
        resolver = policy.resolver or system_resolver
        answers = list(dict.fromkeys(await resolver(host, port)))
        if not answers:
            raise HostNotResolved(f"could not resolve host '{host}'")
        addresses = [_parse_resolved(a) for a in answers]
    internal = False
    host_allowed = policy.host_allowed(host)
    for ip in addresses:
        reason = refusal_reason(ip)
        if reason is None:
            continue
        internal = True
        if host_allowed or policy.address_allowed(ip):
            continue
        if literal is not None:
            raise _not_allowed(f"Address {_shown_literal(host, ip)} is {reason}")
        # The address stays in the log: the client is told what kind of address, never which one.
        log.info("outbound URL refused: host %r resolves to %s, %s", host, ip, reason)
        raise _not_allowed(f"Host '{host}' resolves to {_kind_of_address(ip, reason)}")
    return ResolvedTarget(
        url=parsed,
        host=host,
        port=port,
        ip=str(addresses[0]),
        addresses=tuple(str(a) for a in addresses),
        internal=internal,
    )


async def check_url(url: str | httpx.URL, policy: OutboundPolicy, *, timeout_s: float = 5.0) -> ResolvedTarget:
    """`resolve_checked` for URLs taken now and called later (webhooks): every failure is `UrlNotAllowed`.

    A host that does not resolve, or not within `timeout_s`, cannot be checked, so it is refused as well. The
    call itself must still go through `send`, which checks again: DNS may answer differently by then.
    """
    try:
        with anyio.fail_after(timeout_s):
            return await resolve_checked(url, policy)
    except OutboundError as exc:
        raise _not_allowed(f"The host cannot be checked: {exc.reason}") from None
    except TimeoutError:
        raise _not_allowed(f"The host cannot be checked: no DNS answer within {timeout_s:g}s") from None


def _build_request(
    client: httpx.AsyncClient,
    method: str,
    target: ResolvedTarget,
    headers: Mapping[str, str],
    content: bytes | None,
    timeout_s: float,
) -> httpx.Request:
    """A request to the checked address that still names the real host (Host header, TLS SNI)."""
    request_headers = httpx.Headers(headers)
    request_headers["Host"] = target.url.netloc.decode("ascii")
    extensions: dict[str, str] = {}
    if target.url.scheme == "https":
        extensions["sni_hostname"] = target.host
        # The pool keys connections by address, not name: never hand a connection verified for one name to another.
        request_headers["Connection"] = "close"
    return client.build_request(
        method,
        target.connect_url,
        headers=request_headers,
        content=content,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        extensions=extensions,
    )


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.raw_host, a.port or DEFAULT_PORTS.get(a.scheme)) == (
        b.scheme,
        b.raw_host,
        b.port or DEFAULT_PORTS.get(b.scheme),
    )


@dataclass(frozen=True)
class Opened:
    """The final (non-redirect) response, body not yet read, and where it came from."""

    response: httpx.Response
    target: ResolvedTarget
    redirects: int


@asynccontextmanager
async def open_stream(
    method: str,
    url: str | httpx.URL,
    *,
    policy: OutboundPolicy,
    client: httpx.AsyncClient,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout_s: float,
    max_redirects: int = MAX_REDIRECTS,
) -> AsyncIterator[Opened]:
    """Open `url` through the guard and yield the final response unread (read it with `read_capped`).

    `timeout_s` bounds each connect (at most `CONNECT_TIMEOUT_S`), read and write; the caller bounds the whole
    exchange (`anyio.fail_after`), as `send` does. 301/302 turn a POST into a GET and 303 anything but HEAD,
    dropping the body; 307/308 resend it. Credentials headers are dropped when a redirect leaves the origin. A
    redirect from a public host to one reachable only through the allow-list is refused: the allow-list opens
    internal hosts to URLs that name them, not to whoever on the internet answers with a `Location`.
    Raises `UrlNotAllowed` (first URL or any hop), `OutboundError` subclasses, and httpx's transport errors.
    """
    method = method.upper()
    current = parse_url(url)
    sent_headers = dict(headers or {})
    body = content
    came_from_internal = True  # the first URL may name an allow-listed host
    for hop in range(max_redirects + 1):
        try:
            target = await resolve_checked(current, policy)
        except UrlNotAllowed as exc:
            if hop == 0:
                raise
            raise _not_allowed(f"Redirect to {display_url(current)} refused: {exc.details}") from None
        if target.internal and not came_from_internal:
            raise _not_allowed(
                f"Redirect to {display_url(current)} refused: a public host may not redirect to an allow-listed "
                "internal host"
            )
        came_from_internal = target.internal
        request = _build_request(client, method, target, sent_headers, body, timeout_s)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.status_code not in REDIRECT_STATUSES:
                yield Opened(response=response, target=target, redirects=hop)
                return
            status = response.status_code
            location = response.headers.get("location")
            if not location:
                raise BadRedirect(f"HTTP {status} without a Location header")
            if hop == max_redirects:
                raise TooManyRedirects(f"more than {max_redirects} redirects")
            try:
                following = current.join(location)  # relative to the URL as named, not to the address
            except (httpx.InvalidURL, ValueError):
                raise BadRedirect(f"HTTP {status} with an invalid Location") from None
        finally:
            await response.aclose()
        if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
            method, body = "GET", None
            sent_headers = {k: v for k, v in sent_headers.items() if k.lower() not in _BODY_HEADERS}
        if not _same_origin(current, following):
            sent_headers = {k: v for k, v in sent_headers.items() if k.lower() not in _ORIGIN_BOUND_HEADERS}
        current = following
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() else None


def content_coding(response: httpx.Response) -> str | None:
    """The one content coding to undo (`gzip` or `deflate`), None for identity; `BadContentEncoding` otherwise.

    Every `Content-Encoding` header counts (repeated headers stack like a list); `identity` entries are no-ops.
    More than one real coding (`gzip, gzip`: a bomb's favourite) and any coding not decoded here (br, zstd,
    compress, unknown) are refused: passing them on undecoded would hand the decoder bytes it cannot read.
    """
    codings = [
        token.strip().lower()
        for value in response.headers.get_list("content-encoding")
        for token in value.split(",")
        if token.strip() and token.strip().lower() != "identity"
    ]
    if not codings:
        return None
    shown = ", ".join(codings)[:_URL_DISPLAY_CHARS]
    if len(codings) > 1:
        raise BadContentEncoding(f"stacked Content-Encoding '{shown}' is not accepted")
    if codings[0] in _GZIP_CODINGS:
        return "gzip"
    if codings[0] in _DEFLATE_CODINGS:
        return "deflate"
    raise BadContentEncoding(f"Content-Encoding '{shown}' is not supported (send identity, gzip or deflate)")


class BoundedDecoder:
    """Undo one content coding with the output capped as it is produced: zlib is never asked for more than one
    byte past what is left of `limit`, so memory stays `limit` plus one input chunk whatever the ratio."""

    def __init__(self, coding: str | None, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.out = bytearray()
        self._zlib: zlib._Decompress | None = None
        self._head = b""  # deflate: the first bytes, until the zlib header can be told from raw deflate
        self._ended = False  # a compressed stream (or gzip member) ended; more data starts another member

    def _append(self, data: bytes) -> None:
        self.out += data
        if len(self.out) > self.limit:
            raise ResponseTooLarge(self.limit)

    def _start(self, data: bytes) -> bytes | None:
        """Create the decompressor for the stream starting with `data`; None while more bytes are needed."""
        if self.coding == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return data
        if self._ended:
            raise BadContentEncoding("data after the end of the deflate stream")
        data = self._head + data
        if len(data) < 2:
            self._head = data
            return None
        self._head = b""
        # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate: read both, as browsers do.
        wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return data

    def feed(self, data: bytes) -> None:
        if self.coding is None:
            self._append(data)
            return
        while data:
            decoder = self._zlib
            if decoder is None:
                started = self._start(data)
                if started is None or self._zlib is None:
                    return
                data, decoder = started, self._zlib
            try:
                self._append(decoder.decompress(data, self.limit - len(self.out) + 1))
            except zlib.error:
                raise BadContentEncoding(f"corrupt {self.coding} body") from None
            if decoder.eof:
                data = decoder.unused_data  # gzip: another member (RFC 1952 allows several)
                self._zlib, self._ended = None, True
            else:
                data = decoder.unconsumed_tail  # non-empty only when the output cap was hit (raised above)

    def finish(self) -> bytes:
        if self._zlib is not None or self._head:
            raise BadContentEncoding(f"truncated {self.coding} body")
        return bytes(self.out)


def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it came, undecoded. A response built from bytes (a test transport's) was read on creation, so
    its bytes are taken from the stream object, which replays them; a network response streams `aiter_raw`."""
    if response.is_stream_consumed:
        return aiter(response.stream)  # type: ignore[arg-type]
    return response.aiter_raw()


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body, refused unread when Content-Length is over `limit` and cut as soon as more than `limit` arrive.

    The raw stream is read (httpx decodes nothing) and a gzip or deflate coding is undone here by
    `BoundedDecoder`, so `limit` caps the decoded bytes as they are produced, and the bytes on the wire as well;
    other codings raise `BadContentEncoding`. Callers still ask for `Accept-Encoding: identity`.
    """
    declared = declared_length(response)
    if declared is not None and declared > limit:
        raise ResponseTooLarge(limit)
    decoder = BoundedDecoder(content_coding(response), limit)
    received = 0
    async for chunk in _raw_chunks(response):
        received += len(chunk)
        if received > limit:
            raise ResponseTooLarge(limit)
        decoder.feed(chunk)
    return decoder.finish()


@dataclass(frozen=True)
class OutboundResponse:
    """What `send` returns: the final response with its (capped) body, and where it came from."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    url: httpx.URL  # the final URL by name (after redirects)
    address: str  # the checked address it was fetched from
    redirects: int

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


async def send(
    method: str,
    url: str | httpx.URL,
    *,
    policy: OutboundPolicy,
    client: httpx.AsyncClient,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout_s: float,
    max_redirects: int = MAX_REDIRECTS,
    stream_limit: int = DEFAULT_STREAM_LIMIT,
    read_body: bool = True,
) -> OutboundResponse:
    """One guarded exchange, bounded as a whole by `timeout_s` (resolution, redirects and body included).

    The body is read up to `stream_limit` bytes (`ResponseTooLarge` beyond); `read_body=False` skips it (a webhook
    delivery only needs the status). Raises `UrlNotAllowed`, `OutboundError` subclasses, `TimeoutError` for the
    overall deadline, and httpx's transport errors (`httpx.HTTPError`).
    """
    with anyio.fail_after(timeout_s):
        async with open_stream(
            method,
            url,
            policy=policy,
            client=client,
            headers=headers,
            content=content,
            timeout_s=timeout_s,
            max_redirects=max_redirects,
        ) as opened:
            response = opened.response
            data = await read_capped(response, stream_limit) if read_body else b""
            return OutboundResponse(
                status_code=response.status_code,
                headers=response.headers,
                content=data,
                url=opened.target.url,
                address=opened.target.ip,
                redirects=opened.redirects,
            )


class _NoCookies(DefaultCookiePolicy):
    """Accept and return no cookies: outbound calls are one-off, and a jar keyed by address would leak them."""

    def set_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: object) -> bool:
        return False


def make_client(*, max_connections: int = 100) -> httpx.AsyncClient:
    """The client outbound calls should use: no redirects of its own, no proxy from the environment (a proxy
    would make its own DNS lookup), and no cookie jar shared between hosts that resolve to one address."""
    client = httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=max_connections),
    )
    client.cookies.jar.set_policy(_NoCookies())
    return client
