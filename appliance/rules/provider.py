"""Rule-provider content: bytes in one of mihomo's three formats -> the
`ProviderRules` the engine compiles (appliance/rules/engine.py), and back
to mrs for tests. No I/O: appliance/rules/providers.py fetches and swaps.

Formats (mihomo's rules/provider/provider.go `rulesParse`):

- `yaml`: a mapping with a `payload:` (or `rules:`) list of strings;
- `text`: one entry per line; blank lines and lines starting with `#` or
  `//` are skipped;
- `mrs`: mihomo's binary format (rules/provider/mrs_reader.go): a zstd
  stream of `MRS\\x01`, one behaviour byte (0 domain, 1 ipcidr), the entry
  count (int64 big-endian), a reserved block (int64 length + bytes), then
  for domain a succinct trie (component/trie/domain_set_bin.go: version 1,
  then the `leaves` and `labelBitmap` uint64 arrays and the `labels` bytes,
  each as int64 length + data; LOUDS encoding of the reversed names) and
  for ipcidr sorted ranges (component/cidr/ipcidr_set_bin.go: version 1,
  int64 count, then from/to as 16-byte addresses).

Entries by behaviour: `domain` a mihomo domain pattern (`example.com`,
`+.example.com`, `.example.com`, `*.example.com`), `ipcidr` a network,
`classical` a rule line without target. An entry that does not parse is
skipped and counted, as mihomo does (a warning each there); content with
nothing usable and not empty is refused (ValueError), so the last good
copy stays.
"""

from __future__ import annotations

import io
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
import zstandard

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.rules import parse_payload_rule
from appliance.rules.engine import IPNet, ProviderRules

Behavior = Literal["domain", "ipcidr", "classical"]
Format = Literal["yaml", "text", "mrs"]

MRS_MAGIC = b"MRS\x01"
_BEHAVIOR_BYTE = {"domain": 0, "ipcidr": 1, "classical": 2}
# A decompressed mrs larger than this is refused (a zstd bomb).
MRS_MAX_BYTES = 512 << 20

# libyaml's loader when PyYAML was built with it: ~10x faster on big lists.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Parsed:
    """What parsing gave: the content and how many entries were skipped."""

    content: ProviderRules
    skipped: int


def parse_provider(data: bytes, behavior: Behavior, fmt: Format) -> Parsed:
    """Raises ValueError for content that is not in `fmt` at all."""
    if fmt == "mrs":
        return Parsed(read_mrs(data, behavior), 0)
    entries = _yaml_entries(data) if fmt == "yaml" else _text_entries(data)
    return from_entries(entries, behavior)


def from_entries(entries: Iterable[str], behavior: Behavior) -> Parsed:
    """Inline `payload:` entries, or the lines of a yaml/text file."""
    domains: list[str] = []
    networks: list[IPNet] = []
    rules = []
    skipped = 0
    total = 0
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        total += 1
        if behavior == "domain":
            if _valid_domain_pattern(entry):
                domains.append(entry.lower())
            else:
                skipped += 1
        elif behavior == "ipcidr":
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                skipped += 1
        else:
            try:
                rules.append(parse_payload_rule(entry, "payload"))
            except ConfigError:
                skipped += 1
    if total and skipped == total:
        raise ValueError(f"none of its {total} {behavior} entries is usable")
    return Parsed(ProviderRules(behavior, tuple(domains), tuple(networks), tuple(rules)),
                  skipped)


def _valid_domain_pattern(entry: str) -> bool:
    """mihomo's trie.ValidAndSplitDomain (plus: no `/`, no spaces)."""
    if "/" in entry or entry.endswith(".") or any(c.isspace() for c in entry):
        return False
    parts = entry.split(".")
    if len(parts) == 1:
        return parts[0] != ""
    return all(parts[1:])


def _yaml_entries(data: bytes) -> list[str]:
    try:
        doc = yaml.load(data, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ValueError(f"not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ValueError("expected a mapping with a payload: list")
    items = doc.get("payload", doc.get("rules"))
    if items is None:
        raise ValueError("no payload: list")
    if not isinstance(items, list):
        raise ValueError("payload: is not a list")
    return [str(i) for i in items if i is not None]


def _text_entries(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "//")):
            continue
        out.append(line)
    return out


# --- mrs -----------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("mrs: truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int64(self) -> int:
        value: int = struct.unpack(">q", self.take(8))[0]
        return value

    def length(self) -> int:
        n = self.int64()
        if n < 1 or n > len(self.data):
            raise ValueError("mrs: length is invalid")
        return n


def read_mrs(data: bytes, behavior: Behavior) -> ProviderRules:
    """A mihomo .mrs file. Raises ValueError."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as stream:
            raw = stream.read(MRS_MAX_BYTES + 1)
    except zstandard.ZstdError as err:
        raise ValueError(f"mrs: not zstd ({err})") from None
    if len(raw) > MRS_MAX_BYTES:
        raise ValueError("mrs: larger than 512 MiB decompressed")
    r = _Reader(raw)
    if r.take(4) != MRS_MAGIC:
        raise ValueError("mrs: invalid magic bytes")
    got = r.take(1)[0]
    if got != _BEHAVIOR_BYTE[behavior]:
        raise ValueError(f"mrs: behavior byte {got}, the provider says {behavior}")
    r.int64()  # count: what the writer counted; the content says it again
    extra = r.int64()
    if extra < 0:
        raise ValueError("mrs: length is invalid")
    r.take(extra)
    if r.take(1) != b"\x01":
        raise ValueError("mrs: unknown set version")
    if behavior == "domain":
        return ProviderRules("domain", domains=tuple(_read_domain_set(r)))
    if behavior == "ipcidr":
        return ProviderRules("ipcidr", networks=tuple(_read_cidr_set(r)))
    raise ValueError("mrs: classical rule-sets have no mrs form")


def _read_domain_set(r: _Reader) -> list[str]:
    n = r.length()
    leaves = struct.unpack(f">{n}Q", r.take(8 * n))
    n = r.length()
    bitmap = struct.unpack(f">{n}Q", r.take(8 * n))
    labels = r.take(r.length())
    keys = _louds_keys(leaves, bitmap, labels)
    # mihomo's trie stores `+.x` as the keys `x` and `+.x` (`+` a label
    # matching any run of labels); `.x` as `+.x` alone (below x only).
    present = set(keys)
    out = []
    for k in keys:
        if k.startswith("+."):
            out.append(k if k[2:] in present else k[1:])
        elif "+." + k not in present:
            out.append(k)
    return out


def _louds_keys(leaves: Sequence[int], bitmap: Sequence[int], labels: bytes) -> list[str]:
    """Every key of a LOUDS trie (component/trie/domain_set.go): node i's
    child labels are a run of 0 bits ended by a 1 in `labelBitmap`, nodes
    numbered breadth first; `leaves` bit i marks a key ending at node i.
    Keys are stored reversed."""
    def bit(words: Sequence[int], i: int) -> int:
        w = i >> 6
        return (words[w] >> (i & 63)) & 1 if w < len(words) else 0

    total_bits = len(bitmap) * 64
    parent = [-1]
    label_of = [0]
    node = 0
    label_index = 0
    pos = 0
    while node < len(parent) and pos < total_bits:
        if bit(bitmap, pos):
            node += 1
        else:
            if label_index >= len(labels):
                raise ValueError("mrs: labels shorter than the bitmap says")
            parent.append(node)
            label_of.append(labels[label_index])
            label_index += 1
        pos += 1
    keys = []
    for i in range(len(parent)):
        if bit(leaves, i):
            chars = []
            j = i
            while j > 0:
                chars.append(label_of[j])
                j = parent[j]
            # chars are the reversed key read back from the leaf: the name itself
            keys.append(bytes(chars).decode("utf-8", errors="replace"))
    return keys


def _read_cidr_set(r: _Reader) -> list[IPNet]:
    n = r.length()
    out: list[IPNet] = []
    for _ in range(n):
        lo = _unmap(ipaddress.IPv6Address(r.take(16)))
        hi = _unmap(ipaddress.IPv6Address(r.take(16)))
        if lo.version != hi.version or int(lo) > int(hi):
            raise ValueError("mrs: bad address range")
        out.extend(ipaddress.summarize_address_range(lo, hi))
    return out


def _unmap(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ip.ipv4_mapped or ip


def write_mrs(behavior: Behavior, entries: Sequence[str]) -> bytes:
    """An mrs file as mihomo's `convert-ruleset` writes it (for tests and
    tools): domain patterns or networks."""
    if behavior == "domain":
        keys: set[str] = set()
        for e in entries:
            e = e.lower()
            if e.startswith("+."):
                keys.update((e, e[2:]))  # mihomo's trie stores the name too
            elif e.startswith("."):
                keys.add("+" + e)  # below only: `+.x` without `x`
            else:
                keys.add(e)
        body = b"\x01" + _louds_bytes(sorted(k[::-1] for k in keys))
        count = len(entries)
    elif behavior == "ipcidr":
        ranges = _merged_ranges(ipaddress.ip_network(e, strict=False) for e in entries)
        body = b"\x01" + struct.pack(">q", len(ranges))
        for lo, hi in ranges:
            body += _as16(lo) + _as16(hi)
        count = len(entries)
    else:
        raise ValueError("classical rule-sets have no mrs form")
    plain = MRS_MAGIC + bytes([_BEHAVIOR_BYTE[behavior]]) + struct.pack(">qq", count, 0) + body
    return zstandard.ZstdCompressor(level=19).compress(plain)


def _as16(ip: Address) -> bytes:
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _merged_ranges(nets: Iterable[IPNet]) -> list[tuple[Address, Address]]:
    spans = sorted((n.version, int(n.network_address), int(n.broadcast_address)) for n in nets)
    merged: list[list[int]] = []
    for v, lo, hi in spans:
        if merged and merged[-1][0] == v and lo <= merged[-1][2] + 1:
            merged[-1][2] = max(merged[-1][2], hi)
        else:
            merged.append([v, lo, hi])
    out: list[tuple[Address, Address]] = []
    for version, lo, hi in merged:
        if version == 4:
            out.append((ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)))
        else:
            out.append((ipaddress.IPv6Address(lo), ipaddress.IPv6Address(hi)))
    return out


def _louds_bytes(keys: list[str]) -> bytes:
    """component/trie/domain_set.go NewDomainSet, serialised."""
    leaves: list[int] = []
    bitmap: list[int] = []
    labels = bytearray()

    def set_bit(words: list[int], i: int) -> None:
        while i >> 6 >= len(words):
            words.append(0)
        words[i >> 6] |= 1 << (i & 63)

    raw = [k.encode() for k in keys]
    queue = [(0, len(raw), 0)]
    label_index = 0
    i = 0
    while i < len(queue):
        s, e, col = queue[i]
        if col == len(raw[s]):
            s += 1
            set_bit(leaves, i)
        j = s
        while j < e:
            frm = j
            while j < e and raw[j][col] == raw[frm][col]:
                j += 1
            queue.append((frm, j, col + 1))
            labels.append(raw[frm][col])
            label_index += 1  # a 0 bit
        set_bit(bitmap, label_index)
        label_index += 1
        i += 1
    # setBit with v=0 still grows the array in Go: cover every bit index used
    while (label_index - 1) >> 6 >= len(bitmap):
        bitmap.append(0)
    out = struct.pack(">q", len(leaves)) + struct.pack(f">{len(leaves)}Q", *leaves)
    out += struct.pack(">q", len(bitmap)) + struct.pack(f">{len(bitmap)}Q", *bitmap)
    out += struct.pack(">q", len(labels)) + bytes(labels)
    return out
