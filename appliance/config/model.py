"""The typed configuration: what `mirage check` validates and every service reads.

Frozen dataclasses, built only by `appliance.config.loader.load_config`, which
rejects bad values with the key path. Nothing downstream re-checks a value.
Defaults follow mihomo where mihomo has one (fake-ip-range 198.18.0.1/16,
fake-IP TTL 1 s, routing-mark unset).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.common import TlsOptions, TransportOptions

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# mihomo answers fake IPs with TTL 1: a client that caches longer keeps using
# an old fake IP, which the pool still maps (see fakeip/pool.py).
FAKE_IP_TTL = 1

# mihomo's default `fake-ip-range: 198.18.0.1/16` (host bits allowed there).
DEFAULT_FAKE_IP_RANGE = ipaddress.IPv4Network("198.18.0.0/16")


@dataclass(frozen=True)
class Listen:
    """A host:port to bind. `host` is an IP literal (v4 or v6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Nameserver:
    """One upstream resolver, parsed from a Clash `nameserver` entry.

    Forms accepted: `https://host[:port]/path` (DoH, RFC 8484),
    `tls://host[:port]` (DNS over TLS, RFC 7858, port 853), `udp://ip[:port]`,
    `tcp://ip[:port]`, and a bare `ip[:port]` (UDP). After `#`, mihomo's
    fragment: `&`-separated, a bare word names the proxy or group the
    queries go through (`proxy`; `DIRECT` and `RULES` too), `key=value`
    are options (`method=GET` for DoH, `skip-cert-verify=true` for DoH and
    DoT: `params`). Forms Mirage does not implement (`quic://`, `dhcp://`,
    `system`, `rcode://`) are skipped at load and reported as ignored. For
    DoH and DoT, `host` may be a name (bootstrapped through
    `default-nameserver`, or handed to the proxy unresolved) or an IP
    literal (its certificate must carry the IP).
    """

    scheme: Literal["https", "tls", "udp", "tcp"]
    host: str
    port: int
    path: str = "/dns-query"
    # Original text from the config, for logs and `mirage check`.
    text: str = ""
    # The `#Name` of the entry: the outbound its queries go through (a
    # proxy, a group, DIRECT, or RULES: whatever the rules pick for the
    # server's address). None: straight from the gateway, marked.
    proxy: str | None = None
    # The fragment's `key=value` options (lower-case keys) Mirage uses.
    params: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "https":
            return f"https://{host}:{self.port}{self.path}"
        return f"{self.scheme}://{host}:{self.port}"

    def param(self, key: str) -> str | None:
        return next((v for k, v in self.params if k == key), None)

    @property
    def skip_cert_verify(self) -> bool:
        return (self.param("skip-cert-verify") or "").lower() == "true"


@dataclass(frozen=True)
class DomainPolicy:
    """A `nameserver-policy` entry: names matching `pattern` use
    `nameservers`. `pattern` is a domain pattern, `geosite:CODE` (one
    geosite list) or `rule-set:NAME` (one domain or classical
    rule-provider); a comma list in the profile became one entry each."""

    pattern: str
    nameservers: tuple[Nameserver, ...]


@dataclass(frozen=True)
class FallbackFilter:
    """`dns.fallback-filter` (mihomo's defaults): when the `fallback`
    servers' answer is taken over `nameserver`'s (appliance/dns/policy.py).
    `geoip`: an answer address outside `geoip_code`'s country (and not a
    LAN address) falls back; `ipcidr`: an answer address inside one falls
    back; `domain`/`geosite`: names asked of `fallback` alone."""

    geoip: bool = True
    geoip_code: str = "cn"
    ipcidr: tuple[IPNetwork, ...] = ()
    domain: tuple[str, ...] = ()
    geosite: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsConfig:
    enable: bool = True
    listen: Listen = field(default_factory=lambda: Listen("0.0.0.0", 53))
    ipv6: bool = False
    enhanced_mode: Literal["fake-ip", "redir-host", "normal"] = "fake-ip"
    fake_ip_range: ipaddress.IPv4Network = DEFAULT_FAKE_IP_RANGE
    fake_ip_range6: ipaddress.IPv6Network | None = None
    # Domain patterns, `geosite:CODE` and `rule-set:NAME` entries
    # (blacklist/whitelist modes).
    fake_ip_filter: tuple[str, ...] = ()
    fake_ip_filter_mode: Literal["blacklist", "whitelist", "rule"] = "blacklist"
    # `fake-ip-filter-mode: rule`: rules whose target is `fake-ip` or
    # `real-ip`; the first match decides, no match means fake-ip.
    fake_ip_filter_rules: tuple[Rule, ...] = ()
    default_nameserver: tuple[Nameserver, ...] = ()
    nameserver: tuple[Nameserver, ...] = ()
    nameserver_policy: tuple[DomainPolicy, ...] = ()
    fallback: tuple[Nameserver, ...] = ()
    fallback_filter: FallbackFilter = field(default_factory=FallbackFilter)
    # Who resolves the proxies' own server names (empty: `nameserver`).
    proxy_server_nameserver: tuple[Nameserver, ...] = ()
    # Who resolves DIRECT's destinations (empty: `nameserver` with its
    # policy); with `direct_follow_policy`, nameserver-policy first.
    direct_nameserver: tuple[Nameserver, ...] = ()
    direct_follow_policy: bool = False
    # `respect-rules`: connections to `nameserver`/`fallback`/policy servers
    # without a `#Name` go where the rules send the server's address.
    respect_rules: bool = False
    # Name (lower case, no trailing dot) -> addresses. Answered locally.
    hosts: tuple[tuple[str, tuple[IPAddress, ...]], ...] = ()
    # Mirage extensions (Clash has no such keys; they live under `dns:` since
    # they only matter to the resolver): private CA bundle for DoH servers,
    # per-query upstream deadline, cache size.
    ca_file: Path | None = None
    upstream_timeout: float = 2.0
    cache_size: int = 4096
    # Repeated A/AAAA queries for mapped names answered on tc ingress of the
    # LAN interfaces (appliance/capture/ebpf/answer.py) where the program
    # loads; false: every query reaches the DNS service.
    kernel_answers: bool = True


@dataclass(frozen=True)
class ProxyConfig:
    """One entry of `proxies`. `type` selects which optional fields matter:
    socks5/http use the flat fields below; a protocol registered in
    appliance/config/loader/protocols/ carries its own keys in `options`
    and its TLS and transport layers in `tls_options` / `transport`."""

    name: str
    type: str
    server: str = ""
    port: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    skip_cert_verify: bool = False
    sni: str | None = None
    udp: bool = False
    # socks5/http: connections to the server kept open for the next flows
    # (the loader's default is 2 without tls, 0 with it).
    preconnect: int = 0
    options: ProtocolOptions | None = None
    tls_options: TlsOptions | None = None
    transport: TransportOptions | None = None
    # `dialer-proxy`: the proxy or group this proxy's own connections go
    # through (None: straight to the server, marked).
    dialer_proxy: str | None = None
    # `ip-version` for the server's own address: dual, ipv4, ipv6,
    # ipv4-prefer, ipv6-prefer.
    ip_version: str = "dual"


# mihomo's C.DefaultTestURL: what groups and providers probe by default.
DEFAULT_TEST_URL = "https://www.gstatic.com/generate_204"

GroupType = Literal["select", "url-test", "fallback", "load-balance", "relay"]
LoadBalanceStrategy = Literal["consistent-hashing", "round-robin", "sticky-sessions"]


@dataclass(frozen=True)
class HealthCheckConfig:
    """How a group (or a proxy provider's `health-check`) probes its
    members: an HTTP GET of `url` through each, every `interval` seconds
    (0: only on demand), at most `timeout` seconds each; `lazy` skips a
    round when no flow used the group since the last; `expected_status`
    as ranges (empty: any status); `max_failed_times` failed connects in a
    row start a round early (appliance/outbound/health.py)."""

    enable: bool = True
    url: str = DEFAULT_TEST_URL
    interval: float = 0.0
    timeout: float = 5.0
    lazy: bool = True
    expected_status: tuple[tuple[int, int], ...] = ()
    max_failed_times: int = 5


@dataclass(frozen=True)
class MemberFilter:
    """Which proxies a group takes from its providers and include-all
    lists: `filter` (regexes, one of which must match the name; mihomo
    splits the key at backticks), then `exclude_filter` and `exclude_type`
    (Clash type names, case-insensitive) remove members."""

    filter: tuple[str, ...] = ()
    exclude_filter: str | None = None
    exclude_type: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProxyGroupConfig:
    """One entry of `proxy-groups`, as mihomo runs it: `proxies` are the
    members named in the file (after include-all-proxies and the filters),
    `use` the proxy providers whose proxies follow them (include-all-
    providers adds every provider). `health` is the probe of url-test,
    fallback and load-balance (interval 300 s by default as in mihomo);
    `tolerance` (ms) keeps a url-test group on its member until another is
    that much faster; `strategy` is load-balance's."""

    name: str
    type: GroupType
    proxies: tuple[str, ...]
    use: tuple[str, ...] = ()
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    tolerance: int = 0
    strategy: LoadBalanceStrategy = "consistent-hashing"
    filter: MemberFilter = field(default_factory=MemberFilter)
    disable_udp: bool = False
    hidden: bool = False
    icon: str = ""


@dataclass(frozen=True)
class ProviderOverride:
    """A proxy provider's `override`: values set on every proxy it yields
    (None: the proxy's own), and its names changed by `additional-prefix`,
    `additional-suffix` and `proxy-name` (regex, replacement) pairs."""

    skip_cert_verify: bool | None = None
    udp: bool | None = None
    dialer_proxy: str | None = None
    ip_version: str | None = None
    additional_prefix: str = ""
    additional_suffix: str = ""
    proxy_name: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProxyProviderConfig:
    """One entry of `proxy-providers` (appliance/providers/proxies.py runs
    it): `http` fetches `url` every `interval` seconds (0: at start only)
    through the outbound `proxy` (DIRECT by default) and caches it at
    `path` (a boot without network uses that copy); `file` reads `path`;
    `inline` has its proxies in `payload`. Its proxies pass `filter` and
    `override`, then the normal proxy loader; `health` probes them for
    the groups that use it. `size_limit`: bytes (0: no limit)."""

    name: str
    type: Literal["http", "file", "inline"]
    url: str | None = None
    path: Path | None = None
    interval: float = 0.0
    proxy: str | None = None
    size_limit: int = 0
    header: tuple[tuple[str, str], ...] = ()
    health: HealthCheckConfig = field(default_factory=lambda: HealthCheckConfig(enable=False))
    filter: MemberFilter = field(default_factory=MemberFilter)
    override: ProviderOverride = field(default_factory=ProviderOverride)
    payload: tuple[object, ...] = ()


# --- rules -----------------------------------------------------------------
# A rule's payload is parsed once, by the loader, into what it is; the rule
# engine (appliance/rules/engine.py) compiles these values as they are.

RuleType = Literal[
    "DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "DOMAIN-WILDCARD", "DOMAIN-REGEX",
    "GEOSITE", "GEOIP", "SRC-GEOIP", "IP-ASN", "SRC-IP-ASN",
    "IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR", "IP-SUFFIX", "SRC-IP-SUFFIX",
    "DST-PORT", "SRC-PORT", "IN-PORT", "IN-TYPE", "IN-USER", "IN-NAME",
    "NETWORK", "DSCP", "UID", "RULE-SET", "AND", "OR", "NOT", "SUB-RULE",
    "PROCESS-NAME", "PROCESS-PATH", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX",
    "PROCESS-NAME-WILDCARD", "PROCESS-PATH-WILDCARD", "MATCH",
]  # fmt: skip

# Rule types that look at the process that opened a connection: they have no
# meaning for a LAN device's flow and never match (said once at load).
PROCESS_RULE_TYPES = frozenset({
    "PROCESS-NAME", "PROCESS-PATH", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX",
    "PROCESS-NAME-WILDCARD", "PROCESS-PATH-WILDCARD",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class DomainName:
    """DOMAIN: exactly this name (lower case, punycode, no trailing dot)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class DomainSuffix:
    """DOMAIN-SUFFIX: this name and every name under it (normalised as
    `DomainName`; Clash's leading `.` is already gone: it means the same)."""

    suffix: str

    def __str__(self) -> str:
        return self.suffix


@dataclass(frozen=True, slots=True)
class DomainKeyword:
    """DOMAIN-KEYWORD: every name that contains this text (lower case, no
    whitespace, never empty)."""

    keyword: str

    def __str__(self) -> str:
        return self.keyword


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """DOMAIN-WILDCARD (`*` any run of characters, `?` one character, the
    whole name) or DOMAIN-REGEX (a regular expression searched in the name,
    case-insensitive): the loader compiled it once, so it is valid."""

    pattern: str

    def __str__(self) -> str:
        return self.pattern


@dataclass(frozen=True, slots=True)
class GeoCode:
    """GEOIP / SRC-GEOIP: a country code (`cn`, lower case as mihomo
    compares it) or `lan` (private, loopback, link-local, unspecified and
    multicast addresses); GEOSITE: a geosite list
    (`cn`, lower case) with its `@attr` filter (`google@cn`: only entries
    with attribute `cn`; `!` before an attribute negates it)."""

    code: str
    attrs: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.code + "".join(f"@{a}" for a in self.attrs)


@dataclass(frozen=True, slots=True)
class Asn:
    """IP-ASN / SRC-IP-ASN: an autonomous system number."""

    number: int

    def __str__(self) -> str:
        return str(self.number)


@dataclass(frozen=True, slots=True)
class IpSuffix:
    """IP-SUFFIX / SRC-IP-SUFFIX: addresses whose last `bits` bits equal
    those of `address` (mihomo's `8.8.8.8/24`: the last 24 bits)."""

    address: IPAddress
    bits: int

    def __str__(self) -> str:
        return f"{self.address}/{self.bits}"


@dataclass(frozen=True, slots=True)
class PortSet:
    """DST-PORT / SRC-PORT / IN-PORT: the ports in any of these inclusive
    ranges (each 1 <= lo <= hi <= 65535, in the order written)."""

    ranges: tuple[tuple[int, int], ...]

    def __str__(self) -> str:
        # mihomo's spelling: `80/443/8000-9000`.
        return "/".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class IntRanges:
    """DSCP (0..63) / UID: values in any of these inclusive ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __str__(self) -> str:
        return "/".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class NameSet:
    """IN-TYPE (inbound kinds, upper case: `SOCKS5`, `HTTP`, `TPROXY`, ...),
    IN-USER (proxy-port user names), IN-NAME (listener names): any of these."""

    names: tuple[str, ...]

    def __str__(self) -> str:
        return "/".join(self.names)


@dataclass(frozen=True, slots=True)
class NetworkKind:
    """NETWORK: the flow's transport."""

    name: Literal["tcp", "udp"]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class RuleSetName:
    """RULE-SET: the `rule-providers` entry of that name (the loader checked
    it exists)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class LogicRules:
    """AND / OR / NOT: the rules combined (targets unused, ""); NOT has one."""

    rules: tuple[Rule, ...]

    def __str__(self) -> str:
        return "(" + ",".join(f"({r.line()})" for r in self.rules) + ")"


@dataclass(frozen=True, slots=True)
class SubRuleCall:
    """SUB-RULE: when `condition` matches, the `sub-rules` list named by the
    rule's target decides (its first matching rule's target); when none of
    that list matches, matching goes on after the SUB-RULE line."""

    condition: Rule

    def __str__(self) -> str:
        return f"({self.condition.line()})"


@dataclass(frozen=True, slots=True)
class ProcessMatch:
    """PROCESS-*: kept for `mirage check`; never matches a LAN flow."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class MatchAll:
    """MATCH (Clash Premium's FINAL): every flow."""

    def __str__(self) -> str:
        return ""


RulePayload = (
    DomainName
    | DomainSuffix
    | DomainKeyword
    | DomainPattern
    | GeoCode
    | Asn
    | ipaddress.IPv4Network
    | ipaddress.IPv6Network
    | IpSuffix
    | PortSet
    | IntRanges
    | NameSet
    | NetworkKind
    | RuleSetName
    | LogicRules
    | SubRuleCall
    | ProcessMatch
    | MatchAll
)

_NETS = (ipaddress.IPv4Network, ipaddress.IPv6Network)
# What payload each rule type carries: IP-CIDR and SRC-IP-CIDR take either
# family (host bits already masked off), IP-CIDR6 only IPv6.
RULE_PAYLOADS: dict[str, type | tuple[type, ...]] = {
    "DOMAIN": DomainName,
    "DOMAIN-SUFFIX": DomainSuffix,
    "DOMAIN-KEYWORD": DomainKeyword,
    "DOMAIN-WILDCARD": DomainPattern,
    "DOMAIN-REGEX": DomainPattern,
    "GEOSITE": GeoCode,
    "GEOIP": GeoCode,
    "SRC-GEOIP": GeoCode,
    "IP-ASN": Asn,
    "SRC-IP-ASN": Asn,
    "IP-CIDR": _NETS,
    "IP-CIDR6": ipaddress.IPv6Network,
    "SRC-IP-CIDR": _NETS,
    "IP-SUFFIX": IpSuffix,
    "SRC-IP-SUFFIX": IpSuffix,
    "DST-PORT": PortSet,
    "SRC-PORT": PortSet,
    "IN-PORT": PortSet,
    "IN-TYPE": NameSet,
    "IN-USER": NameSet,
    "IN-NAME": NameSet,
    "NETWORK": NetworkKind,
    "DSCP": IntRanges,
    "UID": IntRanges,
    "RULE-SET": RuleSetName,
    "AND": LogicRules,
    "OR": LogicRules,
    "NOT": LogicRules,
    "SUB-RULE": SubRuleCall,
    "MATCH": MatchAll,
    **{t: ProcessMatch for t in PROCESS_RULE_TYPES},
}


@dataclass(frozen=True)
class Rule:
    """One line of `rules` (or of a `sub-rules` list, a classical rule-set,
    or inside a logic rule): `TYPE,VALUE,TARGET[,no-resolve][,src]` or
    `MATCH,TARGET`.

    `type` is the Clash keyword, `payload` the value parsed into what it is,
    `target` the name of a proxy, group, DIRECT or REJECT (the loader checked
    it exists; for SUB-RULE the `sub-rules` list; "" inside a logic rule or
    a rule-set). `no_resolve`: an IP rule never resolves a flow's name to
    match (mihomo's `no-resolve`); `src`: GEOIP/IP-ASN/IP-CIDR/IP-SUFFIX/
    RULE-SET look at the client's address instead (mihomo's `src`, which
    implies no-resolve). A payload of the wrong kind for `type` is a
    programming error: TypeError at construction.
    """

    type: RuleType
    payload: RulePayload
    target: str
    no_resolve: bool = False
    src: bool = False

    def __post_init__(self) -> None:
        expected = RULE_PAYLOADS.get(self.type)
        if expected is None or not isinstance(self.payload, expected):
            raise TypeError(f"a {self.type} rule cannot carry {self.payload!r}")

    @property
    def value(self) -> str:
        """The payload in Clash spelling ("" for MATCH): for `mirage check`,
        the control API and messages."""
        return str(self.payload)

    def line(self) -> str:
        """`TYPE,VALUE[,TARGET][,options]` as a profile would write it."""
        parts = [self.type] + ([self.value] if self.type != "MATCH" else [])
        if self.target:
            parts.append(self.target)
        if self.no_resolve and not self.src:
            parts.append("no-resolve")
        if self.src and not self.type.startswith("SRC-"):
            parts.append("src")
        return ",".join(parts)


# --- rule-providers and geodata ------------------------------------------------


@dataclass(frozen=True)
class RuleProviderConfig:
    """One entry of `rule-providers` (mihomo's names and defaults).

    `type`: `http` (download `url`, cache at `path`: by default
    `<state-dir>/rules/<md5 of url>`), `file` (`path`) or `inline`
    (`payload`). `behavior` says what each entry is (a domain pattern, a
    CIDR, a classical rule line without target) and `format` how the file
    spells them (`yaml`: a `payload:` list; `text`: one per line; `mrs`:
    mihomo's binary format, domain and ipcidr only). `interval` seconds
    between refreshes (0: never), `proxy` the outbound downloads go
    through, `size-limit` bytes (0: no limit)."""

    name: str
    type: Literal["http", "file", "inline"]
    behavior: Literal["domain", "ipcidr", "classical"]
    format: Literal["yaml", "text", "mrs"] = "yaml"
    url: str | None = None
    path: Path | None = None
    interval: float = 0.0
    proxy: str | None = None
    size_limit: int = 0
    payload: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


# mihomo's default `geox-url` (config/config.go).
GEOX_DEFAULTS = {
    "geoip": "https://github.com/MetaCubeX/meta-rules-dat/releases/download/latest/geoip.dat",
    "geosite": "https://github.com/MetaCubeX/meta-rules-dat/releases/download/latest/geosite.dat",
    "mmdb": "https://github.com/MetaCubeX/meta-rules-dat/releases/download/latest/geoip.metadb",
    "asn": "https://github.com/MetaCubeX/meta-rules-dat/releases/download/latest/GeoLite2-ASN.mmdb",
}


@dataclass(frozen=True)
class GeodataConfig:
    """Where GEOIP, IP-ASN and GEOSITE look things up (appliance/geodata/).

    Files live in `dir` (default: the state dir) under mihomo's names
    (`geoip.metadb` or `Country.mmdb`, `GeoIP.dat`, `GeoSite.dat`,
    `GeoLite2-ASN.mmdb` or `ASN.mmdb`); a missing one is downloaded from its
    `geox-url` when a rule needs it. `geodata-mode: true` reads GEOIP from
    GeoIP.dat instead of the mmdb. `geo-auto-update` re-downloads every
    `geo-update-interval` hours. `geodata-loader` and `geosite-matcher`
    choose mihomo's in-memory structures: accepted, Mirage has its own."""

    mode: bool = False
    loader: Literal["memconservative", "standard"] = "memconservative"
    matcher: Literal["succinct", "mph", "hybrid"] = "succinct"
    auto_update: bool = False
    update_interval: float = 24.0  # hours
    urls: tuple[tuple[str, str], ...] = tuple(GEOX_DEFAULTS.items())
    dir: Path | None = None
    proxy: str | None = None  # outbound for the downloads (None: DIRECT)

    def url(self, kind: str) -> str:
        return dict(self.urls).get(kind, GEOX_DEFAULTS[kind])


@dataclass(frozen=True)
class LimitsConfig:
    """`appliance.limits`: each LAN client's fair share (appliance/limits.py).

    A client is an IPv4 address or an IPv6 /64. Defaults are far above what
    a household's devices use and a fraction of the whole, so that one
    client (a flood, a runaway app, a compromised device) cannot take what
    the others need. Over its share a client is refused at once (reset,
    dropped or SERVFAIL) and counted; the others go on.
    """

    # Transparent TCP flows + UDP sessions one client holds at once (each
    # costs one or two descriptors and ~20 KB). At most half of flows_total.
    flows_per_client: int = 1024
    # All clients together; None: what half the memory and the descriptor
    # limit pay for (appliance.limits.total_flows).
    flows_total: int | None = None
    # Connections one client holds to the proxy ports (mixed/socks/http).
    proxy_connections_per_client: int = 256
    # DNS queries of one client waiting on the upstream resolver (of the
    # 1024 the DNS service lets wait at once).
    dns_upstream_per_client: int = 128
    # DNS-over-TCP connections one client holds (of 256 in all).
    dns_tcp_per_client: int = 32
    # New fake-IP mappings one client may cause, per second and in a burst.
    fake_ip_rate_per_client: float = 50.0
    fake_ip_burst_per_client: int = 500


@dataclass(frozen=True)
class ApplianceConfig:
    """Settings only an appliance has (the brief's `appliance:` block)."""

    lan: tuple[str, ...] = ()
    redirect: Literal["nftables", "ebpf", "auto"] = "nftables"
    dns_hijack: bool = True
    bypass: tuple[IPNetwork, ...] = ()
    state_dir: Path = Path("/var/lib/mirage")
    # Seconds between batched writes of the fake-IP store: the most a crash
    # (kill -9, power loss) can lose is the mappings made in one interval.
    store_flush_interval: float = 1.0
    # Policy routing table for TPROXY'd traffic (fwmark -> local route).
    route_table: int = 233
    # fwmark that capture rules set on packets to be delivered locally.
    capture_mark: int = 0x233
    # TCP splice timeouts, seconds.
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    # Once one direction of a flow has ended (FIN), the flow ends when
    # nothing moved for this long: a peer that vanished mid-flow (a
    # blackholed proxy) does not hold it for the whole idle timeout.
    half_close_timeout: float = 30.0
    # UDP sessions: seconds a session may stay silent (port 53: at most 10),
    # and how many live at once (the least recently active is evicted).
    udp_timeout: float = 60.0
    udp_max_sessions: int = 8192
    # Kernel fast path for fake IPs whose route is DIRECT by domain alone
    # (appliance/capture/offload.py): nftables DNAT after the first flow.
    offload_direct: bool = False
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Refuse encrypted DNS from LAN clients (DoT/DoQ on 853 to anywhere,
    # DoH on 443 to well-known resolvers plus `encrypted_dns_resolvers`) and
    # answer Firefox's canary NXDOMAIN, so clients fall back to plain DNS,
    # which Mirage answers (capture/spec.py, nft/mirage.nft).
    block_encrypted_dns: bool = False
    encrypted_dns_resolvers: tuple[IPNetwork, ...] = ()
    # Host header names the control API answers besides IP literals and
    # localhost (its DNS rebinding guard): the gateway's own DNS names.
    controller_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class CorsConfig:
    """`external-controller-cors`, as mihomo reads it: the origins a
    dashboard page may call the API from ("*": any), and whether a page on
    the public Internet may reach this private address (Chrome's Private
    Network Access preflight). Applied only when a secret is set."""

    allow_origins: tuple[str, ...] = ("*",)
    allow_private_network: bool = True


@dataclass(frozen=True)
class ControllerConfig:
    """The control API's settings besides its address and secret.

    `ui`: `external-ui`, the directory served at /ui (relative paths are
    relative to the config file); `ui_name`: `external-ui-name`, a
    subdirectory of it; `ui_url`: `external-ui-url`, where a dashboard
    archive comes from: offline, only a local zip path or a file:// URL
    (unpacked into `ui` at start when `ui` has no index.html)."""

    ui: Path | None = None
    ui_name: str = ""
    ui_url: str = ""
    cors: CorsConfig = field(default_factory=CorsConfig)


TunnelMode = Literal["rule", "global", "direct"]
TUNNEL_MODES: tuple[TunnelMode, ...] = ("rule", "global", "direct")


# Why a key or item of a profile was left out (the groups `mirage check`
# prints): "gateway" keys have no meaning on a gateway (tun, listeners, a
# proxy's interface-name); "unimplemented" ones Mirage does not do yet;
# "unknown" keys neither mihomo nor Mirage knows (mihomo ignores them too);
# "legacy" keys are Clash spellings mihomo no longer reads; "anchor" keys
# only hold YAML anchors; "skipped" items (a proxy, group or rule) are left
# out whole; "mode" notes say what runs instead of what was asked.
IgnoredKind = Literal["gateway", "unimplemented", "unknown", "legacy", "anchor", "skipped",
                      "mode"]


@dataclass(frozen=True)
class LoadNote:
    """One thing the loader left out or changed, with its key path and why.
    `note` never holds a secret value (the loader's redaction applies)."""

    path: str
    kind: IgnoredKind
    note: str = ""
    # The ConfigError behind a skipped item (a proxy with a value mihomo
    # loads but Mirage cannot use), for code that wants its path and reason.
    error: Exception | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SkippedOutbound:
    """A proxy or group of the profile that Mirage cannot use, and why (a
    sentence: "a snell proxy, which Mirage does not implement (...)").
    Groups drop it from their members; a rule that names it sends its flows
    to COMPATIBLE, as mihomo does with a group left without a proxy
    (appliance/outbound/build.py): DIRECT."""

    name: str
    kind: Literal["proxy", "group"]
    reason: str


@dataclass(frozen=True)
class Config:
    # mihomo's `mode`: `rule` (the rules decide), `global` (every flow to the
    # GLOBAL group's selection), `direct` (every flow DIRECT). The API's
    # PATCH /configs switches it live; a reload goes back to the file's.
    mode: TunnelMode = "rule"
    mixed_port: int | None = None
    # The other proxy ports (Clash `socks-port`, and `port` for HTTP) and who
    # may use them: `authentication: ["user:pass", ...]` (empty: no auth),
    # `allow-lan` (false: loopback only; true by default here, unlike Clash,
    # since serving the LAN is an appliance's job) and `bind-address` ("*":
    # every address of appliance.lan; never the WAN side, see
    # appliance/gateway/proxyport/).
    socks_port: int | None = None
    http_port: int | None = None
    authentication: tuple[tuple[str, str], ...] = ()
    allow_lan: bool = True
    bind_address: str = "*"
    tproxy_port: int | None = None
    routing_mark: int | None = None
    ipv6: bool = False
    log_level: Literal["debug", "info", "warning", "error", "silent"] = "info"
    external_controller: Listen | None = None
    secret: str = ""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    store_fake_ip: bool = False  # profile.store-fake-ip
    # profile.store-selected: group choices kept in the state dir across
    # restarts (appliance/outbound/selections.py); on by default as in mihomo.
    store_selected: bool = True
    dns: DnsConfig = field(default_factory=DnsConfig)
    proxies: tuple[ProxyConfig, ...] = ()
    proxy_groups: tuple[ProxyGroupConfig, ...] = ()
    proxy_providers: tuple[ProxyProviderConfig, ...] = ()
    rules: tuple[Rule, ...] = ()
    # `sub-rules`: named rule lists that SUB-RULE lines hand flows to.
    sub_rules: tuple[tuple[str, tuple[Rule, ...]], ...] = ()
    rule_providers: tuple[RuleProviderConfig, ...] = ()
    geodata: GeodataConfig = field(default_factory=GeodataConfig)
    appliance: ApplianceConfig = field(default_factory=ApplianceConfig)
    # Clash keys (dotted paths), rule types and proxies present in the file
    # that Mirage does not implement: reported once at load, never an error
    # (so real Clash profiles load).
    ignored_keys: tuple[str, ...] = ()
    # Proxies and groups left out (file order, proxies first): what the
    # routing summary of `mirage check` reports (appliance/config/summary.py).
    skipped: tuple[SkippedOutbound, ...] = ()
    # The same, structured (kind and note apart) for the grouped report;
    # not part of what the configuration *is* (equality ignores it).
    load_notes: tuple[LoadNote, ...] = field(default=(), compare=False)
    source: Path | None = None

    @property
    def fake_range6(self) -> ipaddress.IPv6Network | None:
        """The IPv6 fake range in effect, decided here and nowhere else: only
        when the gateway carries IPv6 (`ipv6`, which also turns on the v6
        capture) *and* the DNS answers AAAA (`dns.ipv6`). Otherwise a fake
        AAAA would point at an address no rule captures, and a v6 fake range
        captured with no v6 fake IP handed out would only cost rules."""
        if self.ipv6 and self.dns.ipv6:
            return self.dns.fake_ip_range6
        return None

    @property
    def hijacks_dns(self) -> bool:
        """Whether the capture takes port-53 traffic to any resolver, decided
        here for both capture backends: `appliance.dns-hijack` asks for it,
        and only a running DNS service (`dns.enable`) can answer it."""
        return self.appliance.dns_hijack and self.dns.enable

    @property
    def proxy_ports(self) -> tuple[tuple[str, int], ...]:
        """The proxy listeners in use as (Clash key, port), in this order:
        `mixed-port` (SOCKS5 and HTTP), `socks-port`, `port` (HTTP); empty
        when there are none (Clash's port 0 is off too). What the loader
        checks for port clashes and the proxy-port service opens."""
        keyed = (("mixed-port", self.mixed_port), ("socks-port", self.socks_port),
                 ("port", self.http_port))  # fmt: skip
        return tuple((key, port) for key, port in keyed if port)
