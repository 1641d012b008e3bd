"""Domain names as the appliance sees them, and Clash/mihomo domain patterns.

The bottom layer for names: no imports from the rest of the package. The
config loader validates every name and pattern of a profile here
(`parse_name`, `pattern_is_valid`), and the DNS service builds its tables
from the same rules (`DomainTrie`, `DomainMatcher`, `name_from_labels`), so
a pattern the loader accepted is one the DNS service can use.

Used by `fake-ip-filter`, `hosts`, `nameserver-policy`, `proxies[].server`,
`sni` and the domain rules. Pattern forms follow mihomo's
`component/trie/domain.go`:

    example.com        the name itself, nothing else
    *.example.com      exactly one label before example.com (a.example.com)
    +.example.com      example.com and every name under it
    .example.com       every name under example.com, but not example.com
    time.*.com         `*` stands for exactly one label, anywhere

Matching is case-insensitive, a trailing dot is ignored (on patterns and on
names), and a name with an empty label (`a..b`) never matches.

The lookup walks a trie keyed by labels in reverse order (TLD first) and keeps
the set of trie nodes still alive after each label, so its cost is
O(labels x live nodes) whatever the number of patterns; live nodes stay few
(one per distinct `*` branch), and unlike mihomo's backtracking search there is
no exponential worst case on patterns full of `*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

_WILDCARD = "*"  # one label
_SUBDOMAINS = ""  # key under which `.example.com` hangs: one label or more
_PLUS = "+"  # `+.x` = `x` and `.x`

_HOSTNAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_*+.")


def normalize(name: str) -> str:
    """Lower-case `name` and drop one trailing dot: the form every table is keyed by."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def name_from_labels(labels: Iterable[bytes]) -> str | None:
    """The normalized text of a wire-format name, or None if a label holds a byte
    outside letters, digits, `-` and `_`.

    Such names (spaces, dots inside a label, raw UTF-8) cannot be handed to a
    proxy as a host name, so they are never given fake IPs: the handler sends
    them upstream. The fast path (wire.py) and the general path both call this,
    so they agree on which names are hostnames.
    """
    parts = []
    for label in labels:
        if not _HOSTNAME_BYTES.issuperset(label):
            return None
        parts.append(label.decode("ascii").lower())
    return ".".join(parts)


# One label of a host name once in ASCII (punycode for international names):
# letters, digits, `_` and `-`, at most 63 characters. A `-` at either end
# breaks the host-name rule (RFC 952/1123) but not DNS (RFC 2181 s11), and
# real names and rule lists have such labels (`fc-.cdn.bcebos.com`); mihomo
# takes any text there.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def _to_ascii(label: str) -> str:
    if label.isascii():
        return label
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"label {label!r} is not a valid internationalised name ({exc})") from None


def parse_name(text: str, *, pattern: bool = False) -> str:
    """The normalised form of a domain name as a config writes it: lower
    case, international labels in punycode, no trailing dot.

    With `pattern`, a domain pattern (`+.x`, `.x`, `*` labels; see above) is
    accepted too, and must also pass `pattern_is_valid`, so the DNS service's
    tries never refuse what the loader let through. Raises ValueError whose
    message is the reason, for a person (the loader adds the key path).
    """
    body = text.strip().lower()
    prefix = ""
    if pattern:
        if body.startswith("+."):
            prefix, body = "+.", body[2:]
        elif body.startswith("."):
            prefix, body = ".", body[1:]
    if body.endswith("."):
        body = body[:-1]
    if not body:
        raise ValueError("empty domain name")
    out: list[str] = []
    for label in body.split("."):
        if pattern and label == _WILDCARD:
            out.append(label)
            continue
        ascii_label = _to_ascii(label)
        if not _LABEL.fullmatch(ascii_label):
            hint = "" if pattern or _WILDCARD not in label else " (wildcards are not allowed here)"
            raise ValueError(f"invalid label {label!r} in domain name{hint}")
        out.append(ascii_label)
    name = ".".join(out)
    if len(name) > 253:
        raise ValueError("domain name longer than 253 characters")
    if pattern:
        why = pattern_is_valid(prefix + name)
        if why is not None:
            raise ValueError(why)
    return prefix + name


def pattern_is_valid(pattern: str) -> str | None:
    """Why `pattern` is not a usable domain pattern, or None when it is.

    For the config loader, which reports the reason with the key path.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        return "empty domain pattern"
    if ":" in pattern:
        return "geosite:/rule-set: style patterns are not supported; list domains"
    p = normalize(pattern)
    if not p:
        return "empty domain pattern"
    bad = sorted(set(p) - _PATTERN_CHARS)
    if bad:
        if any(ord(c) > 127 for c in bad):
            return "non-ASCII domain: write it in punycode (xn--...)"
        return f"invalid character {bad[0]!r} in domain pattern"
    if len(p) > 253:
        return "domain pattern longer than 253 characters"
    labels = p.split(".")
    if labels[0] == "" and len(labels) > 1:
        labels = labels[1:]  # `.example.com`
        if labels[0] == _PLUS:
            return "'.+' is not a pattern; use '+.example.com'"
    elif labels[0] == _PLUS:
        if len(labels) == 1:
            return "'+' needs a domain after it: '+.example.com'"
        labels = labels[1:]
    for label in labels:
        if label == "":
            return "empty label in domain pattern"
        if len(label) > 63:
            return f"label {label[:20]!r}... longer than 63 characters"
        if _PLUS in label:
            return "'+' is only allowed as the first label: '+.example.com'"
        if _WILDCARD in label and label != _WILDCARD:
            return "'*' must be a whole label: '*.example.com' or 'time.*.com'"
    return None


class _Node(Generic[T]):
    __slots__ = ("children", "rank", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        # Insertion index of the first pattern ending here (-1: none).
        self.rank = -1
        self.value: T | None = None


class DomainTrie(Generic[T]):
    """Patterns mapped to values; `first(name)` returns the value of the
    earliest-added pattern that matches (the config's order decides, as in
    mihomo's nameserver-policy). Raises ValueError on an invalid pattern.
    """

    def __init__(self, items: Iterable[tuple[str, T]] = ()) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0
        for pattern, value in items:
            self.add(pattern, value)

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: T) -> None:
        reason = pattern_is_valid(pattern)
        if reason is not None:
            raise ValueError(f"{pattern!r}: {reason}")
        labels = normalize(pattern).split(".")
        rank = self._count
        self._count += 1
        if labels[0] == _PLUS:
            self._insert(labels[1:], rank, value)
            labels[0] = _SUBDOMAINS
        self._insert(labels, rank, value)

    def _insert(self, labels: list[str], rank: int, value: T) -> None:
        node = self._root
        for label in reversed(labels):
            child = node.children.get(label)
            if child is None:
                child = node.children[label] = _Node()
            node = child
        if node.rank < 0:  # an earlier identical pattern keeps its place
            node.rank, node.value = rank, value

    def first(self, name: str) -> T | None:
        """Value of the earliest pattern matching `name`, None if none does."""
        best = self._best(name)
        return None if best is None else best.value

    def matches(self, name: str) -> bool:
        return self._best(name) is not None

    def _best(self, name: str) -> _Node[T] | None:
        if not self._count:
            return None
        labels = normalize(name).split(".")
        if "" in labels:
            return None
        best: _Node[T] | None = None
        live = [self._root]
        for label in reversed(labels):
            nxt = []
            for node in live:
                # `.example.com` matches when at least one label is left.
                sub = node.children.get(_SUBDOMAINS)
                if sub is not None and sub.rank >= 0 and (best is None or sub.rank < best.rank):
                    best = sub
                exact = node.children.get(label)
                if exact is not None:
                    nxt.append(exact)
                star = node.children.get(_WILDCARD)
                if star is not None:
                    nxt.append(star)
            if not nxt:
                break
            live = nxt
        else:
            for node in live:
                if node.rank >= 0 and (best is None or node.rank < best.rank):
                    best = node
        return best


class DomainMatcher:
    """A set of domain patterns: does a name match any of them?

    Built once from the config (invalid patterns raise ValueError; the loader
    has already rejected them with `pattern_is_valid`).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self._trie: DomainTrie[bool] = DomainTrie((p, True) for p in patterns)

    def __len__(self) -> int:
        return len(self._trie)

    def matches(self, name: str) -> bool:
        return self._trie.matches(name)
