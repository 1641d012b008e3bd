"""The fuzz budget: every parser that hostile input reaches, under hypothesis.

- the DNS handler and wire code: any bytes, and structured near-valid
  messages (odd counts, long labels, pointers, EDNS, cut short or with a byte
  flipped): `handle` never raises and never crashes inside (no SERVFAIL from
  a bug), and every reply is a well-formed message answering the query's ID;
- the SOCKS5 server core: any bytes in any chunking end in an event, a
  Socks5Error, or a wait for more — nothing else;
- the HTTP proxy request parser: a request or HttpConnectError;
- the config loader: random YAML structures (Clash's keys, wrong types,
  junk) end in a Config or a ConfigError, never another exception.

Bounded so `make test` stays fast (`mirage-budget` profile). `make fuzz`
runs the same properties with the `mirage-fuzz` profile (many more
examples): MIRAGE_FUZZ_PROFILE=mirage-fuzz. Every crash found becomes a
regression test at the bottom of this file.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import ConfigError
from appliance.config.loader import load_config, parse_config
from appliance.config.model import Config, DnsConfig
from appliance.dns import wire
from appliance.dns.handler import DnsHandler, ProblemLog, UpstreamQuery
from appliance.fakeip.pool import FakeIPPool
from appliance.proto import http_connect
from appliance.proto import socks5 as s5

settings.register_profile(
    "mirage-budget", max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("mirage-smoke", max_examples=10, deadline=None)
settings.register_profile(
    "mirage-fuzz", max_examples=20_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = os.environ.get("MIRAGE_FUZZ_PROFILE", "mirage-budget")
fuzz = settings(settings.get_profile(PROFILE))


# -- DNS --------------------------------------------------------------------------

DNS = DnsConfig(
    ipv6=True,
    fake_ip_range=IPv4Network("198.18.0.0/24"),  # small: recycling is reached too
    fake_ip_range6=IPv6Network("fd00:18::/120"),
    fake_ip_filter=("+.lan", "*.filtered.test"),
    hosts=(("router.lan", (ip_address("192.168.1.1"),)),
           ("v6only.test", (ip_address("fd00::1"),))),
)

label = st.one_of(
    st.sampled_from([b"www", b"example", b"com", b"lan", b"router", b"in-addr", b"arpa",
                     b"198", b"18", b"0", b"1", b"filtered", b"test", b"xn--bcher-kva"]),
    st.binary(min_size=1, max_size=70),
)


@st.composite
def wire_name(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(label, max_size=6))
    out = b"".join(bytes([min(len(p), 0xFF)]) + p for p in parts)
    ending = draw(st.sampled_from(["root", "root", "root", "pointer", "long", "none"]))
    if ending == "root":
        return out + b"\0"
    if ending == "pointer":
        return out + struct.pack("!H", 0xC000 | draw(st.integers(0, 80)))
    if ending == "long":
        return out + b"".join(b"\x3f" + b"x" * 63 for _ in range(5)) + b"\0"
    return out


qtypes = st.one_of(st.sampled_from([1, 28, 12, 255, 64, 65, 15, 16, 6, 41]),
                   st.integers(0, 0xFFFF))


@st.composite
def dns_message(draw: st.DrawFn) -> bytes:
    flags = draw(st.one_of(st.just(0x0100), st.integers(0, 0xFFFF)))
    questions = draw(st.lists(st.tuples(wire_name(), qtypes, st.sampled_from([1, 1, 3, 255])),
                              min_size=0, max_size=2))
    body = b"".join(n + struct.pack("!HH", t, c) for n, t, c in questions)
    ar = 0
    if draw(st.booleans()):
        ar = 1
        options = draw(st.binary(max_size=12))
        ttl = draw(st.sampled_from([0, 0x8000, 0x00010000, 0x01000000]))
        body += b"\0" + struct.pack("!HHIH", 41, draw(st.integers(0, 0xFFFF)), ttl,
                                    len(options)) + options
    counts = [len(questions), 0, 0, ar]
    if draw(st.integers(0, 4)) == 0:
        counts = draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))
    data = struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)), flags, *counts) + body
    mutation = draw(st.sampled_from(["none", "none", "cut", "flip"]))
    if mutation == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


class Strict(ProblemLog):
    """A problem log that turns a handler crash into a test failure."""

    def crash(self, reason: str, data: bytes) -> None:
        raise AssertionError(f"{reason} on {data.hex()}")


def handler(fast: bool) -> DnsHandler:
    pool = FakeIPPool(DNS.fake_ip_range, DNS.fake_ip_range6)
    return DnsHandler(DNS, pool, fast_path=fast, problems=Strict())


def check_dns(handler: DnsHandler, data: bytes) -> None:
    result = handler.handle(data)
    if isinstance(result, UpstreamQuery):
        for reply in (None, _echo(result)):
            out = result.finish(reply)
            _well_formed(out, data)
        return
    assert isinstance(result, bytes)
    if result:
        _well_formed(result, data)


def _echo(uq: UpstreamQuery) -> DNSRecord:
    """A plausible upstream reply: the request answered with nothing."""
    return uq.request.reply()


def _well_formed(reply: bytes, query: bytes) -> None:
    assert len(reply) >= 12 and reply[:2] == query[:2]
    assert reply[2] & 0x80  # QR
    if len(reply) > 12:
        DNSRecord.parse(reply)
    assert wire.malformed(reply) is None


@fuzz
@given(st.binary(max_size=300))
def test_dns_any_bytes(data: bytes) -> None:
    for fast in (True, False):
        check_dns(handler(fast), data)


@fuzz
@given(dns_message())
def test_dns_structured_messages(data: bytes) -> None:
    for fast in (True, False):
        check_dns(handler(fast), data)


@fuzz
@given(dns_message())
def test_dns_wire_helpers_never_raise(data: bytes) -> None:
    wire.malformed(data)
    wire.parse_query(data)
    wire.udp_limit(data)
    out = wire.truncate(data, 64)
    assert len(out) <= max(64, 12) or len(data) <= 64
    wire.error_reply(data, wire.RCODE_SERVFAIL)


# -- SOCKS5 server core ---------------------------------------------------------------


@st.composite
def socks5_stream(draw: st.DrawFn) -> list[bytes]:
    host = draw(st.one_of(st.just("example.com"), st.just("198.18.0.1"), st.just("::1")))
    good = (s5.encode_greeting(bytes([0, 2])) + s5.encode_userpass("u", "p")
            + s5.encode_request(draw(st.sampled_from([1, 3, 2, 9])), host, 443))
    data = draw(st.one_of(st.binary(max_size=80), st.just(good)))
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    chunks, last = [], 0
    for cut in cuts:
        chunks.append(data[last:cut])
        last = cut
    chunks.append(data[last:])
    return [c for c in chunks if c] or [b""]


@fuzz
@given(socks5_stream(), st.booleans())
def test_socks5_server_core(chunks: list[bytes], auth: bool) -> None:
    server = s5.Socks5Server(require_auth=auth)
    try:
        for chunk in chunks:
            event = server.receive_data(chunk)
            if isinstance(event, s5.AuthRequest):
                event = server.auth_result(event.username == "u")
            if isinstance(event, s5.Request):
                server.reply(0)
            server.data_to_send()
    except s5.Socks5Error:
        pass


# -- HTTP proxy request parser ------------------------------------------------------------

http_head = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda method, target, headers, tail: (
            method + b" " + target + b" HTTP/1.1\r\n" + headers + b"\r\n" + tail
        ),
        st.sampled_from([b"CONNECT", b"GET", b"POST", b"\x00", b"get"]),
        st.one_of(st.sampled_from([b"example.com:443", b"[::1]:80", b"http://a.test/x",
                                   b"http://u@a.test/", b"https://a.test/", b"a.test:99999",
                                   b"[::1", b"http://[::1]:8080/"]), st.binary(max_size=40)),
        st.lists(st.one_of(st.just(b"Host: a.test"), st.just(b"Proxy-Authorization: Basic !!"),
                           st.binary(max_size=30)), max_size=4).map(
            lambda hs: b"".join(h + b"\r\n" for h in hs)),
        st.binary(max_size=10),
    ),
)


@fuzz
@given(http_head)
def test_http_proxy_request_parser(data: bytes) -> None:
    try:
        parsed = http_connect.parse_request(data, max_head=256)
    except http_connect.HttpConnectError as err:
        assert err.status in (400, 431)
        return
    if parsed is not None:
        request, end = parsed
        assert 0 < end <= len(data)
        request.credentials()
        assert 0 <= request.port <= 65535


# -- config loader -------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
    st.sampled_from(["", "DIRECT", "REJECT", "198.18.0.0/16", "127.0.0.1:53", "0.0.0.0:7890",
                     "fake-ip", "redir-host", "https://1.1.1.1/dns-query", "+.lan",
                     "DOMAIN-SUFFIX,a.test,DIRECT", "MATCH,DIRECT", "socks5", "http", "ss",
                     "select", "url-test", "br-lan", "nftables", "ebpf", "::/0", "info"]),
    st.text(max_size=12),
)
KEYS = ["mixed-port", "tproxy-port", "socks-port", "port", "routing-mark", "ipv6", "log-level",
        "external-controller", "secret", "profile", "store-fake-ip", "dns", "enable", "listen",
        "enhanced-mode", "fake-ip-range", "fake-ip-range6", "fake-ip-filter", "nameserver",
        "default-nameserver", "nameserver-policy", "hosts", "proxies", "proxy-groups", "rules",
        "name", "type", "server", "proxies", "appliance", "lan", "redirect", "dns-hijack",
        "bypass", "state-dir", "store-flush-interval", "offload-direct", "password", "cipher",
        "username", "tls", "upstream-timeout", "fake-ip-filter-mode", "preconnect"]


def yaml_values(depth: int = 3) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                            max_size=5),
        ),
        max_leaves=20,
    )


config_docs = st.dictionaries(st.sampled_from(KEYS), yaml_values(), max_size=8)


@fuzz
@given(st.one_of(config_docs, yaml_values()))
def test_config_loader_structures(data: Any) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@fuzz
@given(st.one_of(config_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                 st.text(max_size=200)))
def test_config_loader_files(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


# -- `make fuzz` ------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("MIRAGE_FUZZ_PROFILE") is not None,
                    reason="already running under make fuzz")
def test_make_fuzz_smoke() -> None:
    """`make fuzz` runs these properties under its profile (here the tiny
    smoke profile; `-o setup`: the environment is already set up)."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    run = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "fuzz", "FUZZ_PROFILE=mirage-smoke",
         f"PY={sys.executable}"],
        cwd=root, capture_output=True, text=True, timeout=240, env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "test_make_fuzz_smoke" not in run.stdout


# -- regressions found by fuzzing -----------------------------------------------------------

REGRESSIONS: list[bytes] = [
    # A label of 64 bytes: dnslib parsed it, the name got a fake IP, and the
    # reply failed to pack (SERVFAIL with a traceback per packet).
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
]


@pytest.mark.parametrize("data", REGRESSIONS)
def test_dns_regressions(data: bytes) -> None:
    for fast in (True, False):
        check_dns(handler(fast), data)
