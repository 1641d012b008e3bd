"""Geodata: GEOIP / SRC-GEOIP, IP-ASN and GEOSITE lookups from mihomo's files.

- `Country.mmdb` / `geoip.metadb` (MaxMind DB, read with `maxminddb`):
  GEOIP's country of an address. Records are MaxMind's (`country.iso_code`),
  sing-geoip's (a bare code) or Meta-geoip0's (a list of codes), as mihomo
  reads them; codes compared lower case.
- `GeoIP.dat` (v2ray protobuf `GeoIPList`), with `geodata-mode: true`:
  GEOIP lists by name (`cn`, `private`, ...), loaded per list a rule names.
- `GeoLite2-ASN.mmdb` / `ASN.mmdb`: IP-ASN's `autonomous_system_number`.
- `GeoSite.dat` (v2ray protobuf `GeoSiteList`): GEOSITE lists, with
  `@attr` filters (every attribute named must be on the entry: mihomo's
  AttributeList). Only the list names are indexed at open (offsets into
  the file); a list's entries are decoded when a rule first names it.

No protobuf dependency: `_fields` reads the wire format (varints and
length-delimited fields are all these messages use).

Files are looked up in the geodata directory (the state dir, mihomo's home)
under mihomo's names; `appliance/geodata/update.py` downloads missing
ones from `geox-url`. A missing or unreadable file is logged once and
matches nothing: the appliance runs on without it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import maxminddb

from appliance.config.model import IPAddress

log = logging.getLogger(__name__)

# mihomo's file names, in the order it looks for them.
MMDB_NAMES = ("geoip.metadb", "Country.mmdb", "country.mmdb")
ASN_NAMES = ("GeoLite2-ASN.mmdb", "ASN.mmdb")
GEOIP_DAT_NAMES = ("GeoIP.dat", "geoip.dat")
GEOSITE_NAMES = ("GeoSite.dat", "geosite.dat")

_DOMAIN_KINDS = {0: "keyword", 1: "regex", 2: "domain", 3: "full"}


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("protobuf: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("protobuf: varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any, int]]:
    """(field number, wire type, value, offset of the value) of a message:
    varints as int, length-delimited as a memoryview."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("protobuf: truncated field")
            yield number, wire, buf[pos:pos + length], pos
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"protobuf: wire type {wire}")


def _index_lists(data: bytes) -> dict[str, tuple[int, int]]:
    """GeoSiteList / GeoIPList: list name (lower case) -> (offset, length)
    of its entry message. Reads only each entry's first field."""
    view = memoryview(data)
    out: dict[str, tuple[int, int]] = {}
    for number, wire, value, offset in _fields(view):
        if number != 1 or wire != 2:
            continue
        for n, w, v, _ in _fields(value):
            if n == 1 and w == 2:
                out.setdefault(bytes(v).decode("utf-8", "replace").lower(),
                               (offset, len(value)))
                break
    return out


class GeoSiteFile:
    """GeoSite.dat: list entries on demand. Raises OSError / ValueError at
    open for an unreadable or malformed file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data = path.read_bytes()
        self._index = _index_lists(self._data)
        self._cache: dict[tuple[str, tuple[str, ...]], list[tuple[str, str]]] = {}

    def codes(self) -> list[str]:
        return sorted(self._index)

    def entries(self, code: str, attrs: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        """(kind, value) of list `code` whose entries carry every attribute
        in `attrs`; kinds `full`, `domain`, `keyword`, `regex`."""
        key = (code.lower(), tuple(a.lower() for a in attrs))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        where = self._index.get(key[0])
        out: list[tuple[str, str]] = []
        if where is None:
            log.error("geosite: no list %r in %s", code, self.path)
        else:
            try:
                out = self._decode(where, key[1])
            except ValueError as err:
                log.error("geosite: list %r in %s is damaged: %s", code, self.path, err)
        self._cache[key] = out
        return out

    def _decode(self, where: tuple[int, int], attrs: tuple[str, ...]) -> list[tuple[str, str]]:
        """A GeoSite entry's domains (raises ValueError if damaged)."""
        out: list[tuple[str, str]] = []
        offset, length = where
        entry = memoryview(self._data)[offset:offset + length]
        for n, w, domain, _ in _fields(entry):
            if n != 2 or w != 2:
                continue
            kind, value, have = 0, "", set()
            for dn, dw, dv, _ in _fields(domain):
                if dn == 1 and dw == 0:
                    kind = dv
                elif dn == 2 and dw == 2:
                    value = bytes(dv).decode("utf-8", "replace")
                elif dn == 3 and dw == 2 and attrs:
                    for an, aw, av, _ in _fields(dv):
                        if an == 1 and aw == 2:
                            have.add(bytes(av).decode("utf-8", "replace").lower())
            if all(a in have for a in attrs) and kind in _DOMAIN_KINDS and value:
                out.append((_DOMAIN_KINDS[kind], value.lower() if kind != 1 else value))
        return out


class GeoIPDat:
    """GeoIP.dat: networks per list name, decoded per list on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data = path.read_bytes()
        self._index = _index_lists(self._data)
        self._tables: dict[str, list[tuple[int, int, int]]] = {}  # code -> (version, lo, hi)

    def networks(self, code: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        where = self._index.get(code.lower())
        if where is None:
            return []
        offset, length = where
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for n, w, cidr, _ in _fields(memoryview(self._data)[offset:offset + length]):
            if n != 2 or w != 2:
                continue
            ip, prefix = b"", 0
            for cn, cw, cv, _ in _fields(cidr):
                if cn == 1 and cw == 2:
                    ip = bytes(cv)
                elif cn == 2 and cw == 0:
                    prefix = cv
            try:
                out.append(ipaddress.ip_network((ipaddress.ip_address(ip), prefix), strict=False))
            except ValueError:
                continue
        return out


class Geodata:
    """The lookups the rule engine asks (`engine.GeoLookup`), over the
    files found in `directory`. `mode` is `geodata-mode` (GEOIP from
    GeoIP.dat instead of the mmdb)."""

    def __init__(self, directory: Path, *, mode: bool = False) -> None:
        self.directory = directory
        self.mode = mode
        self._country: Any = None
        self._asn: Any = None
        self._geosite: GeoSiteFile | None = None
        self._geoip_dat: GeoIPDat | None = None
        self._dat_index: dict[str, Any] = {}
        self._opened: set[str] = set()

    def find(self, names: Sequence[str]) -> Path | None:
        for name in names:
            path = self.directory / name
            if path.exists():
                return path
        return None

    def _open(self, what: str) -> None:
        if what in self._opened:
            return
        self._opened.add(what)
        names = {"mmdb": MMDB_NAMES, "asn": ASN_NAMES, "geoip": GEOIP_DAT_NAMES,
                 "geosite": GEOSITE_NAMES}[what]
        path = self.find(names)
        if path is None:
            log.error("geodata: no %s in %s (looked for %s)", what, self.directory,
                      ", ".join(names))
            return
        try:
            if what == "mmdb":
                self._country = maxminddb.open_database(str(path))
            elif what == "asn":
                self._asn = maxminddb.open_database(str(path))
            elif what == "geoip":
                self._geoip_dat = GeoIPDat(path)
            else:
                self._geosite = GeoSiteFile(path)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as err:
            log.error("geodata: cannot read %s: %s", path, err)
        else:
            log.info("geodata: %s from %s", what, path)

    def reopen(self) -> None:
        """Read the files again at next use (after a download)."""
        for db in (self._country, self._asn):
            if db is not None:
                db.close()
        self._country = self._asn = self._geosite = self._geoip_dat = None
        self._dat_index.clear()
        self._opened.clear()

    def close(self) -> None:
        self.reopen()

    # --- engine.GeoLookup ---------------------------------------------------

    def country(self, ip: IPAddress) -> str | None:
        for code in self.countries(ip):
            return code
        return None

    def countries(self, ip: IPAddress) -> Iterable[str]:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.mode:
            return self._dat_countries(ip)
        self._open("mmdb")
        if self._country is None:
            return ()
        record = self._country.get(ip)
        if record is None:
            return ()
        if isinstance(record, str):
            return (record.lower(),)
        if isinstance(record, list):
            return tuple(str(c).lower() for c in record)
        if isinstance(record, dict):
            code = (record.get("country") or {}).get("iso_code")
            return (str(code).lower(),) if code else ()
        return ()

    def want(self, code: str) -> None:
        """Load GeoIP.dat list `code` (geodata-mode) before it is matched."""
        if not self.mode or code in self._dat_index:
            return
        self._open("geoip")
        from appliance.rules.engine import CidrIndex  # the same prefix structure

        index = CidrIndex()
        if self._geoip_dat is not None:
            for net in self._geoip_dat.networks(code):
                index.add(net, 0)
        self._dat_index[code] = index

    def _dat_countries(self, ip: IPAddress) -> list[str]:
        return [code for code, index in self._dat_index.items() if index.best(ip, 1) == 0]

    def asn(self, ip: IPAddress) -> int | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        self._open("asn")
        if self._asn is None:
            return None
        record = self._asn.get(ip)
        if isinstance(record, dict):
            number = record.get("autonomous_system_number")
            return int(number) if number is not None else None
        return None

    def geosite(self, code: str, attrs: tuple[str, ...]) -> Sequence[tuple[str, str]]:
        self._open("geosite")
        if self._geosite is None:
            return ()
        return self._geosite.entries(code, attrs)
