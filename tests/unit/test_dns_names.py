"""Domain patterns: mihomo semantics, validation, and the trie against a
brute-force reference on generated inputs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.names import (
    DomainMatcher,
    DomainTrie,
    name_from_labels,
    normalize,
    pattern_is_valid,
)

CASES = [
    # pattern, name, matches
    ("example.com", "example.com", True),
    ("example.com", "www.example.com", False),
    ("example.com", "EXAMPLE.com.", True),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("+.example.com", "example.com", True),
    ("+.example.com", "a.example.com", True),
    ("+.example.com", "a.b.c.example.com", True),
    ("+.example.com", "badexample.com", False),
    (".example.com", "example.com", False),
    (".example.com", "a.example.com", True),
    (".example.com", "a.b.example.com", True),
    ("time.*.com", "time.apple.com", True),
    ("time.*.com", "time.com", False),
    ("time.*.com", "time.a.b.com", False),
    ("time.*.com", "ntp.apple.com", False),
    ("*", "localhost", True),
    ("*", "a.lan", False),
    ("+.lan", "nas.lan", True),
    ("+.lan", "lan", True),
    ("example.com.", "example.com", True),
    ("Example.COM", "example.com", True),
    ("example.com", "a..example.com", False),
    ("+.example.com", "", False),
    ("+.example.com", ".", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), CASES)
def test_mihomo_semantics(pattern: str, name: str, expected: bool) -> None:
    assert DomainMatcher([pattern]).matches(name) is expected


def test_many_patterns_and_empty() -> None:
    m = DomainMatcher(
        ["*.lan", "+.msftconnecttest.com", "time.*.com", ".local", "stun.l.google.com"]
    )
    assert len(m) == 5
    assert m.matches("nas.lan")
    assert m.matches("www.msftconnecttest.com")
    assert m.matches("printer.local")
    assert m.matches("stun.l.google.com")
    assert not m.matches("google.com")
    assert not m.matches("local")
    assert not DomainMatcher([]).matches("example.com")


def test_first_pattern_in_order_wins() -> None:
    trie = DomainTrie([("+.example.com", "a"), ("www.example.com", "b"), ("*.com", "c")])
    assert trie.first("www.example.com") == "a"
    assert trie.first("x.com") == "c"
    assert trie.first("org") is None
    # A repeated pattern keeps its first value.
    assert DomainTrie([("x.com", 1), ("x.com", 2)]).first("x.com") == 1


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("example.com", None),
        ("+.example.com", None),
        (".example.com", None),
        ("*.example.com", None),
        ("time.*.com", None),
        ("*", None),
        ("under_score.lan", None),
        ("", "empty"),
        ("   ", "empty"),
        (".", "empty"),
        ("+", "needs a domain"),
        (".+.example.com", "'.+'"),
        ("a.+.com", "first label"),
        ("a*.com", "whole label"),
        ("a..com", "empty label"),
        ("geosite:cn", "geosite"),
        ("bücher.de", "punycode"),
        ("a b.com", "invalid character"),
        ("x" * 64 + ".com", "63"),
        ("a." * 127 + "com", "253"),
    ],
)
def test_pattern_is_valid(pattern: str, reason: str | None) -> None:
    got = pattern_is_valid(pattern)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got
        with pytest.raises(ValueError):
            DomainMatcher([pattern])


def test_name_from_labels() -> None:
    assert name_from_labels([b"WWW", b"Example", b"com"]) == "www.example.com"
    assert name_from_labels([]) == ""
    assert name_from_labels([b"a b"]) is None
    assert name_from_labels([b"a.b"]) is None
    assert name_from_labels(["é".encode()]) is None
    assert normalize("A.B.") == "a.b"


def _regex(pattern: str) -> re.Pattern[str]:
    """An independent reading of the pattern forms, as a regular expression."""
    p = normalize(pattern)
    label = r"[^.]+"
    if p.startswith("+."):
        body, prefix = p[2:], rf"(?:{label}\.)*"
    elif p.startswith("."):
        body, prefix = p[1:], rf"(?:{label}\.)+"
    else:
        body, prefix = p, ""
    parts = [label if x == "*" else re.escape(x) for x in body.split(".")]
    return re.compile(prefix + r"\.".join(parts))


LABELS = st.sampled_from(["a", "b", "com", "x", "*"])
PATTERNS = st.builds(
    lambda pre, labels: pre + ".".join(labels),
    st.sampled_from(["", "+.", "."]),
    st.lists(LABELS, min_size=1, max_size=4),
)
NAMES = st.lists(st.sampled_from(["a", "b", "com", "x", "y"]), min_size=1, max_size=6).map(".".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(PATTERNS, min_size=1, max_size=6), NAMES)
def test_trie_agrees_with_regex_reference(patterns: list[str], name: str) -> None:
    expected = any(_regex(p).fullmatch(name) for p in patterns)
    assert DomainMatcher(patterns).matches(name) is expected
