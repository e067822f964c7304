"""The SSRF guard: address ranges, literal and resolved hosts, the allow-list, pinning to the checked address,
redirect re-checks and streamed size caps.

No DNS and no network: names resolve through injected resolvers (except `localhost`, answered by the hosts file),
exchanges go to `httpx.MockTransport`, and the tests that use a real transport spy on `anyio.connect_tcp` (what
httpcore connects with) to show that a refused address is never connected to.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
import pytest

from gateway.errors import UrlNotAllowed, status_and_code
from gateway.media import netguard
from gateway.media.netguard import (
    BadRedirect,
    HostNotResolved,
    OutboundPolicy,
    ResponseTooLarge,
    TooManyRedirects,
    literal_ip,
    refusal_reason,
    resolve_checked,
    send,
)
from gateway.settings import Settings

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1::1"
TIMEOUT_S = 2.0


class FakeDns:
    """An injected resolver with a fixed table; records every lookup (to show each host is resolved once)."""

    def __init__(self, table: Mapping[str, list[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return list(self.table.get(host, [PUBLIC_V4]))


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"literal IP hosts must not be resolved (asked for {host}:{port})")


def refused_details(exc_info: pytest.ExceptionInfo[UrlNotAllowed]) -> str:
    assert status_and_code(exc_info.value) == (400, "url_not_allowed")
    assert exc_info.value.details
    return exc_info.value.details


# --- address ranges ------------------------------------------------------------------------------------------

ADDRESSES: list[tuple[str, str | None]] = [
    # (address, expected reason fragment; None = public, allowed)
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1, a private"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("::127.0.0.1", "IPv4-compatible form of 127.0.0.1"),
    ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1"),
    ("2002:7f00:1::1", "6to4 form of 127.0.0.1"),
    ("2002:c0a8:101::1", "6to4 form of 192.168.1.1"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("fc00::1", "unique-local"),
    ("fd12:3456:789a::1", "unique-local"),
    ("fd00:ec2::254", "unique-local"),  # AWS's IPv6 metadata endpoint
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    ("4000::1", "reserved"),
    # public
    (PUBLIC_V4, None),
    ("8.8.8.8", None),
    ("100.128.0.1", None),  # just outside CGNAT
    ("172.32.0.1", None),  # just outside 172.16/12
    (PUBLIC_V6, None),
    ("2a00:1450:4001:82b::200e", None),
    ("::ffff:93.184.216.34", None),
    ("2002:5db8:d822::1", None),  # 6to4 of a public address
]


@pytest.mark.parametrize(("address", "fragment"), ADDRESSES)
def test_address_table(address: str, fragment: str | None) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason, reason


@pytest.mark.asyncio
@pytest.mark.parametrize(("address", "fragment"), ADDRESSES)
async def test_a_name_resolving_to_each_address(address: str, fragment: str | None) -> None:
    dns = FakeDns({"evil.example": [address]})
    url = "https://evil.example/x.png"
    if fragment is None:
        target = await resolve_checked(url, OutboundPolicy(resolver=dns))
        assert (target.host, target.port) == ("evil.example", 443)
        assert ipaddress.ip_address(target.ip) == ipaddress.ip_address(address)
    else:
        with pytest.raises(UrlNotAllowed) as info:
            await resolve_checked(url, OutboundPolicy(resolver=dns))
        details = refused_details(info)
        assert details.startswith("Host 'evil.example' resolves to ")
        assert str(ipaddress.ip_address(address)) not in details  # the kind of address, never which one
        embedded = netguard._embedded_ipv4(ipaddress.ip_address(address))
        if embedded is None:
            assert fragment in details
        else:  # the kind of the IPv4 address inside, not that address
            assert str(embedded[1]) not in details
            assert details.endswith(f"{embedded[0]} form of {refusal_reason(embedded[1])}")
    assert dns.lookups == [("evil.example", 443)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1/", "Address 127.0.0.1 is a loopback address"),
        ("http://[::1]:8080/", "Address ::1 is a loopback address"),
        ("http://10.0.0.1/", "Address 10.0.0.1 is a private address"),
        ("http://172.16.0.1/", "Address 172.16.0.1 is a private address"),
        ("http://192.168.1.1/", "Address 192.168.1.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata endpoint"),
        ("http://[::ffff:127.0.0.1]/", "Address ::ffff:127.0.0.1 is an IPv4-mapped form of 127.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/", "form of 169.254.169.254"),
        ("http://2130706433/", "Address 2130706433 (127.0.0.1) is a loopback address"),
        ("http://0x7f.1/", "Address 0x7f.1 (127.0.0.1) is a loopback address"),
        ("http://127.1/", "Address 127.1 (127.0.0.1) is a loopback address"),
        ("http://0/", "Address 0 (0.0.0.0) is an unspecified"),
        ("http://0xa9fea9fe/", "(169.254.169.254)"),
        ("http://[fe80::1%25eth0]/", "a link-local address"),
        ("http://[fd00::1]/", "unique-local"),
        ("http://user:pw@10.0.0.1/", "URLs with credentials (user:password@) are not allowed"),
    ],
)
async def test_literal_hosts_are_checked_without_dns(url: str, expected: str) -> None:
    with pytest.raises(UrlNotAllowed) as info:
        await resolve_checked(url, OutboundPolicy(resolver=no_dns))
    assert expected in refused_details(info)


@pytest.mark.asyncio
async def test_public_literal_hosts_pass_without_dns() -> None:
    v4 = await resolve_checked(f"http://{PUBLIC_V4}:8080/a", OutboundPolicy(resolver=no_dns))
    v6 = await resolve_checked(f"https://[{PUBLIC_V6}]/a", OutboundPolicy(resolver=no_dns))
    assert (v4.ip, v4.port) == (PUBLIC_V4, 8080)
    assert (v6.ip, v6.port, v6.host) == (PUBLIC_V6, 443, PUBLIC_V6)
    assert str(v6.connect_url) == f"https://[{PUBLIC_V6}]/a"


def test_literal_ip_parsing() -> None:
    assert literal_ip("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert literal_ip("0x7f.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert literal_ip("[::1]") == ipaddress.ip_address("::1")
    for name in ("example.com", "cafe", "face.bad", "1e100.net", "localhost", "0x.example"):
        assert literal_ip(name) is None, name


@pytest.mark.asyncio
@pytest.mark.parametrize("answers", [[PUBLIC_V4, "10.0.0.5"], ["10.0.0.5", PUBLIC_V4], [PUBLIC_V6, "::1"]])
async def test_every_resolved_address_is_checked(answers: list[str]) -> None:
    """A name with one public and one private address is refused: the connection might have used either."""
    dns = FakeDns({"mixed.example": answers})
    with pytest.raises(UrlNotAllowed) as info:
        await resolve_checked("http://mixed.example/", OutboundPolicy(resolver=dns))
    assert "resolves to" in refused_details(info)


@pytest.mark.asyncio
async def test_localhost_through_the_system_resolver() -> None:
    with pytest.raises(UrlNotAllowed) as info:
        await resolve_checked("http://localhost:9/", OutboundPolicy())
    details = refused_details(info)
    assert details.startswith("Host 'localhost' resolves to ") and "a loopback address" in details


@pytest.mark.asyncio
@pytest.mark.parametrize("answers", [["10.1.2.3"], [PUBLIC_V4, "10.1.2.3"], ["::ffff:10.1.2.3"], ["64:ff9b::a01:203"]])
async def test_a_refused_name_does_not_reveal_its_internal_address(
    answers: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: `url_not_allowed` says the name resolves to a private address, never which one (that is the
    deployment's internal topology); the log keeps the address for operators. Also through a redirect."""
    dns = FakeDns({"intranet.example": answers})
    with caplog.at_level("INFO", logger=netguard.__name__), pytest.raises(UrlNotAllowed) as info:
        await resolve_checked("https://intranet.example/x.png", OutboundPolicy(resolver=dns))
    details = refused_details(info)
    assert details.startswith("Host 'intranet.example' resolves to ") and "a private address" in details
    answer = f"{info.value.message} {details}"
    assert "10." not in answer and "a01:203" not in answer and "ffff" not in answer, answer
    assert "10.1.2.3" in caplog.text or "a01:203" in caplog.text  # the operator's log has it

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://intranet.example/x.png"})

    handler, _ = recorder(respond)
    with pytest.raises(UrlNotAllowed) as redirected:
        await exchange(handler, "https://public.example/start", dns=dns)
    assert "10." not in refused_details(redirected) and "a private address" in refused_details(redirected)


@pytest.mark.asyncio
async def test_unresolvable_name() -> None:
    with pytest.raises(HostNotResolved, match=r"could not resolve host 'nowhere\.example'"):
        await resolve_checked("http://nowhere.example/", OutboundPolicy(resolver=FakeDns({"nowhere.example": []})))
    with pytest.raises(HostNotResolved):  # .invalid never resolves (RFC 6761); answered locally
        await resolve_checked("http://host.invalid/", OutboundPolicy())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.com/a.png", "Only http and https URLs are allowed"),
        ("file:///etc/passwd", "Only http and https URLs are allowed"),
        ("gopher://example.com:70/_x", "Only http and https URLs are allowed"),
        ("javascript:alert(1)", "Only http and https URLs are allowed"),
        ("//example.com/a.png", "Only http and https URLs are allowed"),
        ("not a url", "Only http and https URLs are allowed"),
        ("https://", "The URL has no host"),
        ("http://example.com:99999/", "Port 99999 is out of range"),
        ("http://exa mple.com/", "The URL's host is not a valid name"),
        ("http://a%2fb.example/", "The URL's host is not a valid name"),
    ],
)
async def test_url_shape(url: str, expected: str) -> None:
    with pytest.raises(UrlNotAllowed) as info:
        await resolve_checked(url, OutboundPolicy(resolver=no_dns))
    assert refused_details(info) == expected


@pytest.mark.asyncio
async def test_check_url_refuses_what_cannot_be_checked() -> None:
    """For webhook URLs at submission: unresolvable or slow names are refused too, all as `url_not_allowed`."""

    async def slow(_host: str, _port: int) -> list[str]:
        await asyncio.sleep(30)
        return [PUBLIC_V4]

    assert (await netguard.check_url("https://hooks.example/x", OutboundPolicy(resolver=FakeDns()))).ip == PUBLIC_V4
    cases = [
        ("http://10.0.0.1/", OutboundPolicy(resolver=no_dns), "Address 10.0.0.1 is a private address"),
        ("http://gone.example/", OutboundPolicy(resolver=FakeDns({"gone.example": []})), "could not resolve host"),
        ("http://slow.example/", OutboundPolicy(resolver=slow), "no DNS answer within 0.05s"),
    ]
    for url, policy, fragment in cases:
        with pytest.raises(UrlNotAllowed) as info:
            await netguard.check_url(url, policy, timeout_s=0.05)
        assert fragment in refused_details(info)


# --- the allow-list ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_allow_by_host_name_is_exact_and_case_insensitive() -> None:
    private = ["10.1.2.3"]
    dns = FakeDns(
        {name: private for name in ("files.internal", "files.internal.", "other.internal", "a.files.internal")}
    )
    policy = OutboundPolicy(allow=("Files.Internal",), resolver=dns)
    assert (await resolve_checked("http://FILES.internal/a", policy)).ip == "10.1.2.3"
    assert (await resolve_checked("http://files.internal./a", policy)).ip == "10.1.2.3"
    for url in ("http://other.internal/a", "http://a.files.internal/a"):  # no suffix or wildcard matching
        with pytest.raises(UrlNotAllowed):
            await resolve_checked(url, policy)


@pytest.mark.asyncio
async def test_allow_by_address_and_cidr() -> None:
    dns = FakeDns({"a.internal": ["10.9.8.7"], "b.internal": ["192.168.1.1"], "v6.internal": ["fd00::5"]})
    policy = OutboundPolicy(allow=("10.0.0.0/8", "127.0.0.2", "fd00::/8"), resolver=dns)
    assert (await resolve_checked("http://a.internal/", policy)).ip == "10.9.8.7"
    assert (await resolve_checked("http://v6.internal/", policy)).ip == "fd00::5"
    assert (await resolve_checked("http://127.0.0.2:8000/", policy)).ip == "127.0.0.2"
    assert (await resolve_checked("http://[::ffff:127.0.0.2]/", policy)).port == 80  # the mapped form too
    for url in ("http://b.internal/", "http://127.0.0.1/", "http://127.0.0.3/", "http://[::1]/", "http://[fe80::1]/"):
        with pytest.raises(UrlNotAllowed):
            await resolve_checked(url, policy)


def test_allow_entries_and_settings() -> None:
    policy = OutboundPolicy.from_settings(Settings(outbound_allow=("127.0.0.2", "[::1]", "Images.Local")))
    assert policy.allow == ("127.0.0.2", "[::1]", "Images.Local")
    assert policy.address_allowed(ipaddress.ip_address("::1"))
    assert policy.host_allowed("images.local") and not policy.host_allowed("127.0.0.2")
    assert OutboundPolicy() == OutboundPolicy(allow=())
    for bad in ("10.0.0.0/33", "fe80::zz", "host/path"):
        with pytest.raises(ValueError, match="allow-list entry"):
            OutboundPolicy(allow=(bad,))


# --- the exchange: pinned to the checked address -----------------------------------------------------------


async def exchange(
    handler: Handler,
    url: str,
    *,
    dns: FakeDns | None = None,
    policy: OutboundPolicy | None = None,
    **kwargs: Any,
) -> netguard.OutboundResponse:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await send(
            kwargs.pop("method", "GET"),
            url,
            policy=policy or OutboundPolicy(resolver=dns or FakeDns()),
            client=client,
            timeout_s=kwargs.pop("timeout_s", TIMEOUT_S),
            **kwargs,
        )


def recorder(
    responses: Callable[[httpx.Request], httpx.Response] | None = None,
) -> tuple[Handler, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        return responses(request) if responses else httpx.Response(200, content=b"ok")

    return handler, seen


@pytest.mark.asyncio
async def test_https_goes_to_the_ip_with_host_header_and_sni() -> None:
    handler, seen = recorder()
    response = await exchange(handler, "https://images.example:8443/a/b.png?x=1", dns=FakeDns())
    request = seen[0]
    assert str(request.url) == f"https://{PUBLIC_V4}:8443/a/b.png?x=1"
    assert request.headers["host"] == "images.example:8443"
    assert request.extensions["sni_hostname"] == "images.example"  # TLS verifies the certificate for the name
    assert request.headers["connection"] == "close"  # no pooled reuse across names sharing an address
    assert response.status_code == 200 and response.content == b"ok"
    assert str(response.url) == "https://images.example:8443/a/b.png?x=1" and response.address == PUBLIC_V4


@pytest.mark.asyncio
async def test_http_default_port_and_ipv6_address() -> None:
    handler, seen = recorder()
    await exchange(handler, "http://v6.example/p", dns=FakeDns({"v6.example": [PUBLIC_V6]}))
    request = seen[0]
    assert request.url.host == PUBLIC_V6 and request.url.port is None and request.url.scheme == "http"
    assert request.headers["host"] == "v6.example"
    assert "sni_hostname" not in request.extensions


@pytest.mark.asyncio
async def test_no_second_lookup_for_a_rebinding_name() -> None:
    """The name is resolved once; a second answer (here private) is never asked for, the checked IP is used."""
    answers = iter([[PUBLIC_V4], ["127.0.0.1"]])
    lookups = 0

    async def rebinding(_host: str, _port: int) -> list[str]:
        nonlocal lookups
        lookups += 1
        return next(answers)

    handler, seen = recorder()
    await exchange(handler, "http://rebind.example/x", policy=OutboundPolicy(resolver=rebinding))
    assert lookups == 1 and seen[0].url.host == PUBLIC_V4


@pytest.mark.asyncio
async def test_refused_before_any_connection_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """With httpx's real transport: a spy on the connect shows refused targets are never connected to, and
    that an allowed one is connected to by address (no lookup of the name by the transport)."""
    connects: list[tuple[str, int]] = []

    async def spy_connect(remote_host: str, remote_port: int, **_kwargs: Any) -> Any:
        connects.append((str(remote_host), int(remote_port)))
        raise OSError("connect blocked by the test")

    monkeypatch.setattr(anyio, "connect_tcp", spy_connect)
    dns = FakeDns({"evil.example": ["10.0.0.5"], "files.internal": ["127.0.0.1"]})
    policy = OutboundPolicy(allow=("files.internal",), resolver=dns)
    refused = [
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/",
        "http://evil.example/",
    ]
    async with netguard.make_client() as client:
        for url in refused:
            with pytest.raises(UrlNotAllowed):
                await send("GET", url, policy=policy, client=client, timeout_s=TIMEOUT_S)
        assert connects == []
        with pytest.raises(httpx.ConnectError):
            await send("GET", "http://files.internal:9/", policy=policy, client=client, timeout_s=TIMEOUT_S)
    assert connects == [("127.0.0.1", 9)]


# --- redirects -----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redirect_to_a_private_address_is_refused_before_it_is_requested() -> None:
    dns = FakeDns({"evil.example": ["10.0.0.5"]})

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://evil.example/steal"})

    handler, seen = recorder(respond)
    with pytest.raises(UrlNotAllowed) as info:
        await exchange(handler, "https://public.example/start", dns=dns)
    assert refused_details(info) == (
        "Redirect to http://evil.example/steal refused: Host 'evil.example' resolves to a private address"
    )
    assert [r.url.path for r in seen] == ["/start"]
    assert dns.lookups == [("public.example", 443), ("evil.example", 80)]  # each hop resolved once


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("http://127.0.0.1:8080/admin", "Address 127.0.0.1 is a loopback address"),
        ("http://[::1]/", "Address ::1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("file:///etc/passwd", "Only http and https URLs are allowed"),
    ],
)
async def test_redirect_targets_are_rechecked(location: str, fragment: str) -> None:
    handler, seen = recorder(lambda _r: httpx.Response(307, headers={"Location": location}))
    with pytest.raises(UrlNotAllowed) as info:
        await exchange(handler, "http://public.example/")
    details = refused_details(info)
    assert details.startswith("Redirect to ") and fragment in details
    assert len(seen) == 1


@pytest.mark.asyncio
async def test_redirect_credentials_are_not_shown() -> None:
    handler, _ = recorder(lambda _r: httpx.Response(302, headers={"Location": "http://user:secret@10.0.0.1/"}))
    with pytest.raises(UrlNotAllowed) as info:
        await exchange(handler, "http://public.example/")
    assert "secret" not in refused_details(info)


@pytest.mark.asyncio
async def test_relative_redirects_keep_the_name_and_are_limited() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        hop = int(request.url.path.strip("/") or 0)
        return httpx.Response(301, headers={"Location": f"/{hop + 1}"}) if hop < 3 else httpx.Response(200)

    handler, seen = recorder(respond)
    dns = FakeDns()
    response = await exchange(handler, "https://public.example/", dns=dns)
    assert response.redirects == 3 and str(response.url) == "https://public.example/3"
    assert {r.headers["host"] for r in seen} == {"public.example"}
    assert len(dns.lookups) == 4
    with pytest.raises(TooManyRedirects, match="more than 2 redirects"):
        await exchange(handler, "https://public.example/", max_redirects=2)
    with pytest.raises(TooManyRedirects, match="more than 0 redirects"):
        await exchange(handler, "https://public.example/", max_redirects=0)


@pytest.mark.asyncio
async def test_redirect_without_location() -> None:
    handler, _ = recorder(lambda _r: httpx.Response(302))
    with pytest.raises(BadRedirect, match="HTTP 302 without a Location header"):
        await exchange(handler, "https://public.example/")


@pytest.mark.asyncio
async def test_redirect_methods_bodies_and_credentials() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        targets = {
            "/303": "/307",
            "/307": "https://other.example/final",
        }
        if request.url.path in targets:
            return httpx.Response(int(request.url.path[1:]), headers={"Location": targets[request.url.path]})
        if request.url.path == "/post":
            return httpx.Response(307, headers={"Location": "/303"})
        return httpx.Response(204)

    handler, seen = recorder(respond)
    headers = {"Authorization": "Bearer t", "Content-Type": "application/json", "X-Signature": "s"}
    await exchange(handler, "https://public.example/post", method="POST", content=b"{}", headers=headers)
    assert [(r.method, r.url.path, r.content) for r in seen] == [
        ("POST", "/post", b"{}"),  # 307 keeps the method and the body
        ("POST", "/303", b"{}"),
        ("GET", "/307", b""),  # 303 turns it into a bodiless GET
        ("GET", "/final", b""),
    ]
    assert "content-type" not in seen[2].headers
    assert seen[2].headers["authorization"] == "Bearer t"  # same origin
    assert "authorization" not in seen[3].headers and seen[3].headers["host"] == "other.example"


# --- bodies and time -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_body_is_cut_while_streaming() -> None:
    chunks = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks
        while True:
            chunks += 1
            yield b"x" * 100

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    with pytest.raises(ResponseTooLarge) as info:
        await exchange(handler, "https://public.example/", stream_limit=1000)
    assert info.value.limit == 1000 and chunks == 11


@pytest.mark.asyncio
async def test_declared_length_over_the_limit_is_refused_unread() -> None:
    read = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read = True
        yield b"x"

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "5000"}, content=body())

    with pytest.raises(ResponseTooLarge):
        await exchange(handler, "https://public.example/", stream_limit=1000)
    assert not read
    response = await exchange(handler, "https://public.example/", stream_limit=1000, read_body=False)
    assert response.status_code == 200 and response.content == b"" and not read


@pytest.mark.asyncio
async def test_body_at_the_limit_and_status_passthrough() -> None:
    handler, _ = recorder(lambda _r: httpx.Response(500, content=b"x" * 1000))
    response = await exchange(handler, "https://public.example/", stream_limit=1000)
    assert response.status_code == 500 and not response.is_success and len(response.content) == 1000


@pytest.mark.asyncio
async def test_overall_deadline_includes_resolution() -> None:
    async def slow_dns(_host: str, _port: int) -> list[str]:
        await asyncio.sleep(30)
        return [PUBLIC_V4]

    handler, seen = recorder()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await exchange(handler, "https://slow.example/", policy=OutboundPolicy(resolver=slow_dns), timeout_s=0.05)
    assert time.monotonic() - started < 5 and seen == []


def test_make_client_does_not_follow_redirects_proxy_or_keep_cookies() -> None:
    async def check() -> None:
        async with netguard.make_client() as client:
            assert client.follow_redirects is False and client.trust_env is False
            handler, _ = recorder(lambda _r: httpx.Response(200, headers={"Set-Cookie": "s=1; Path=/"}))
            client._transport = httpx.MockTransport(handler)  # the same client, without a network
            await send(
                "GET",
                "http://public.example/",
                policy=OutboundPolicy(resolver=FakeDns()),
                client=client,
                timeout_s=TIMEOUT_S,
            )
            assert len(client.cookies.jar) == 0

    asyncio.run(check())


# --- content codings: decoded size capped as it is produced (issue 10, item 1) -------------------------------


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9)


@functools.cache
def _double_bomb() -> bytes:
    return _gzip(_gzip(bytes(BOMB_DECODED)))


def _coded(body: bytes, encoding: str | list[str] | None) -> Handler:
    headers: list[tuple[str, str]] = []
    for value in [encoding] if isinstance(encoding, str) else encoding or []:
        headers.append(("Content-Encoding", value))

    async def chunks() -> AsyncIterator[bytes]:  # streamed, so httpx reads (and decodes) nothing on its own
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, content=chunks())

    return handler


BOMB_DECODED = 64 * 1024 * 1024  # 64 MiB of zeros: ~64 kB gzipped, ~100 bytes gzipped twice


@pytest.mark.asyncio
async def test_a_gzip_bomb_is_cut_at_the_limit_of_decoded_bytes() -> None:
    import zlib

    bomb = _gzip(bytes(BOMB_DECODED))
    assert len(bomb) < 100_000
    decoded: list[int] = []
    real = netguard.BoundedDecoder._append

    def spy(self: netguard.BoundedDecoder, data: bytes) -> None:
        decoded.append(len(data))
        real(self, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(netguard.BoundedDecoder, "_append", spy)
        with pytest.raises(ResponseTooLarge):
            await exchange(_coded(bomb, "gzip"), "https://public.example/", stream_limit=100_000)
    # No call to zlib produced more than the limit + 1: the bomb never inflated in memory.
    assert max(decoded) <= 100_001 and sum(decoded) <= 100_001
    deflated = zlib.compress(bytes(BOMB_DECODED), 9)
    with pytest.raises(ResponseTooLarge):
        await exchange(_coded(deflated, "deflate"), "https://public.example/", stream_limit=100_000)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("encoding", "fragment"),
    [
        ("gzip, gzip", "stacked Content-Encoding 'gzip, gzip'"),
        (["gzip", "gzip"], "stacked Content-Encoding 'gzip, gzip'"),  # repeated headers stack too
        ("deflate, gzip", "stacked"),
        ("br", "Content-Encoding 'br' is not supported"),
        ("zstd", "not supported"),
        ("compress", "not supported"),
        ("x-evil", "not supported"),
    ],
)
async def test_codings_not_decoded_here_are_refused(encoding: str | list[str], fragment: str) -> None:
    body = _double_bomb()
    with pytest.raises(netguard.BadContentEncoding, match=fragment):
        await exchange(_coded(body, encoding), "https://public.example/", stream_limit=10_000)


@pytest.mark.asyncio
async def test_codings_decoded_here_give_the_original_bytes() -> None:
    import zlib

    data = b"an image, honestly " * 50
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw_deflate = raw.compress(data) + raw.flush()
    cases: list[tuple[bytes, str | list[str] | None]] = [
        (data, None),
        (data, "identity"),
        (_gzip(data), "gzip"),
        (_gzip(data), "x-gzip"),
        (_gzip(data), "identity, gzip"),
        (_gzip(data), ["identity", "GZIP"]),
        (_gzip(data[:300]) + _gzip(data[300:]), "gzip"),  # several members
        (zlib.compress(data), "deflate"),
        (raw_deflate, "deflate"),  # raw deflate, as some servers send
        (b"", "gzip"),
    ]
    for body, encoding in cases:
        response = await exchange(_coded(body, encoding), "https://public.example/", stream_limit=len(data))
        assert response.content == (data if body else b""), encoding


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "encoding", "fragment"),
    [
        (b"not gzip at all", "gzip", "corrupt gzip body"),
        (_gzip(b"x" * 1000)[:-12], "gzip", "truncated gzip body"),
        (b"\x78", "deflate", "truncated deflate body"),
        (__import__("zlib").compress(b"x" * 100) + b"more", "deflate", "data after the end"),
    ],
)
async def test_corrupt_or_truncated_compressed_bodies(body: bytes, encoding: str, fragment: str) -> None:
    with pytest.raises(netguard.BadContentEncoding, match=fragment):
        await exchange(_coded(body, encoding), "https://public.example/", stream_limit=10_000)


@pytest.mark.asyncio
async def test_the_raw_stream_is_capped_too() -> None:
    # Incompressible bytes in a valid-looking gzip stream: the wire bytes alone go over the limit.
    import os as _os

    body = _gzip(_os.urandom(50_000))
    with pytest.raises(ResponseTooLarge):
        await exchange(_coded(body, "gzip"), "https://public.example/", stream_limit=20_000)


# --- credentials in URLs, redirects into the allow-list (issue 10, item 9) ----------------------------------


@pytest.mark.asyncio
async def test_urls_with_credentials_are_refused_before_any_request() -> None:
    handler, seen = recorder()
    for url in ("http://user:pass@public.example/x.png", "https://user@public.example/", "http://:pw@1.1.1.1/"):
        with pytest.raises(UrlNotAllowed) as info:
            await exchange(handler, url)
        assert "credentials" in refused_details(info) and "pass" not in refused_details(info).replace("password", "")
    assert seen == []
    handler, seen = recorder(lambda r: httpx.Response(302, headers={"Location": "http://u:secret@public.example/"}))
    with pytest.raises(UrlNotAllowed) as info:
        await exchange(handler, "http://public.example/a")
    assert "secret" not in refused_details(info) and len(seen) == 1


def test_the_connect_url_never_carries_userinfo() -> None:
    target = netguard.ResolvedTarget(
        url=httpx.URL("http://u:p@public.example/x"), host="public.example", port=80, ip=PUBLIC_V4, addresses=()
    )
    assert target.connect_url.userinfo == b"" and str(target.connect_url) == f"http://{PUBLIC_V4}/x"


@pytest.mark.asyncio
async def test_a_public_host_may_not_redirect_into_the_allow_list() -> None:
    dns = FakeDns({"intranet.example": ["10.0.0.5"], "net.example": ["192.168.1.9"]})
    policy = OutboundPolicy(allow=("intranet.example", "192.168.1.0/24"), resolver=dns)
    for location in ("http://intranet.example/secret", "http://192.168.1.9/secret", "http://net.example/"):

        def respond(r: httpx.Request, loc: str = location) -> httpx.Response:
            if r.headers["host"] == "public.example":
                return httpx.Response(302, headers={"Location": loc})
            return httpx.Response(200, content=b"internal")

        handler, seen = recorder(respond)
        with pytest.raises(UrlNotAllowed) as info:
            await exchange(handler, "http://public.example/", policy=policy)
        assert "a public host may not redirect to an allow-listed internal host" in refused_details(info)
        assert [r.headers["host"] for r in seen] == ["public.example"]
    # Named directly, the allow-listed host is reachable, and so is its own redirect to another internal host.
    handler, seen = recorder(
        lambda r: (
            httpx.Response(302, headers={"Location": "http://net.example/b"})
            if r.headers["host"] == "intranet.example"
            else httpx.Response(200, content=b"internal")
        )
    )
    response = await exchange(handler, "http://intranet.example/a", policy=policy)
    assert response.content == b"internal" and [r.headers["host"] for r in seen] == ["intranet.example", "net.example"]
    # An internal host may redirect out to the public internet.
    handler, seen = recorder(
        lambda r: (
            httpx.Response(302, headers={"Location": "http://public.example/b"})
            if r.headers["host"] == "intranet.example"
            else httpx.Response(200, content=b"public")
        )
    )
    assert (await exchange(handler, "http://intranet.example/a", policy=policy)).content == b"public"


# --- DNS in its own bounded pool (issue 10, item 2) ----------------------------------------------------------


@pytest.mark.asyncio
async def test_dns_runs_in_its_own_pool_with_a_deadline_and_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    release = threading.Event()
    threads: set[str] = set()
    real = socket.getaddrinfo

    def silent(host: str, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        if host.endswith(".silent.test"):
            release.wait(30)
            raise socket.gaierror("released")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", silent)
    resolver = netguard.ThreadedResolver(threads=2, timeout_s=0.3, max_pending=3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(resolver(f"h{i}.silent.test", 80) for i in range(5)), return_exceptions=True)
        assert time.monotonic() - started < 3
        kinds = sorted(type(r).__name__ for r in results)
        assert kinds == ["DnsBusy", "DnsBusy", "HostNotResolved", "HostNotResolved", "HostNotResolved"], results
        # Abandoned running lookups hold their place until their thread returns; the queued one was withdrawn.
        assert resolver.pending == 2
        # asyncio's default executor is untouched: it still answers at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 1.0) == 42
        assert all(name.startswith("imagen-dns") for name in threads)
    finally:
        release.set()
    for _ in range(250):  # the released threads return within moments (5 s at most)
        if not resolver.pending:
            break
        await asyncio.sleep(0.02)  # a counter updated by threads: nothing to wait on
    assert resolver.pending == 0
    assert await resolver("localhost", 80)  # the pool serves again


def test_policy_from_settings_uses_the_configured_dns_pool() -> None:
    policy = OutboundPolicy.from_settings(Settings(outbound_dns_threads=3, outbound_dns_timeout_s=1.5))
    resolver = policy.resolver
    assert isinstance(resolver, netguard.ThreadedResolver)
    assert (resolver.threads, resolver.timeout_s, resolver.max_pending) == (3, 1.5, 12)
    assert (
        OutboundPolicy.from_settings(Settings(outbound_dns_threads=3, outbound_dns_timeout_s=1.5)).resolver is resolver
    )
