"""The YAML file -> plain data, the way mihomo reads it.

mihomo reads profiles with Go's yaml.v3, which follows YAML 1.2 where
PyYAML follows YAML 1.1; each difference below was checked against
`mihomo -t` (tests/unit/test_yaml_go.py, tests/integration/test_check_report.py):

* plain `yes`, `no`, `on`, `off`, `y`, `n` are strings (PyYAML: booleans),
  so a proxy named `yes` is one; only `true`/`false` (any case form of
  them yaml.v3 knows) are booleans. (Where mihomo decodes into a Go bool
  field, yaml.v3 still takes `yes`/`on`: `scalars.as_bool` does the same.)
* `1:20` is a string (PyYAML: 80, a base-60 number); `0o17` is 15 (PyYAML:
  a string); `1e3` is a number (PyYAML: a string); `0755` stays octal and
  `1_000` stays 1000 in both;
* `=` is a string (PyYAML: an error);
* a tag yaml.v3 does not know (`!<str> 123456`, which subconverter writes
  before passwords, or any `!custom`) leaves the value as the string it
  reads (PyYAML: an error); `!!binary` gives the decoded text, not bytes;
* only the first document of a file is read (PyYAML: an error when there
  are more), as yaml.Unmarshal does.

* a tab between tokens on a line (`key:<TAB>value`, `value<TAB># note`,
  a trailing tab) is white space (PyYAML: an error); yaml.v3 (scannerc.go,
  yaml_parser_scan_to_next_token) eats tabs in flow context, after a value
  indicator `:` and after any token that ends a simple key, but not at the
  start of a line (indentation) nor right after `-` or `?`: those stay errors.

Both refuse duplicate keys, tabs for indentation, and `?` or `:` inside an
unquoted URL in a flow mapping (`{url: http://a/b?x=1}`): those stay
YAML errors, with line and column. `<<: *anchor` merges work, and top-level
keys that only hold anchors are found so the loader can report them as such.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any

import yaml

from appliance.config.loader.errors import NO_VALUE, ConfigError
from appliance.config.loader.top import IGNORED_TOP_LEVEL, TOP_LEVEL_KEYS


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, as Go's yaml.v3 (and so
    mihomo) does: silently keeping the last one hides mistakes. It also notes
    which nodes carry an `&anchor`, see `anchor_holders`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchored: set[int] = set()
        # The last token fetched was `:`: a tab may follow it (yaml.v3).
        self._after_value = False

    def fetch_value(self) -> None:
        super().fetch_value()
        self._after_value = True

    def scan_to_next_token(self) -> None:
        """PyYAML's loop (scanner.py), with yaml.v3's rule for tabs: one is
        white space in flow context, after `:`, or where no simple key may
        start (after a scalar, an anchor, a tag); elsewhere (indentation,
        after `-` or `?`) it is left to fail as a token."""
        after_value, self._after_value = self._after_value, False
        if self.index == 0 and self.peek() == "\uFEFF":
            self.forward()
        while True:
            while self.peek() == " " or (
                self.peek() == "\t"
                and (self.flow_level or not self.allow_simple_key or after_value)
            ):
                self.forward()
            if self.peek() == "#":
                while self.peek() not in "\0\r\n\x85\u2028\u2029":
                    self.forward()
            if not self.scan_line_break():  # type: ignore[no-untyped-call]
                return
            after_value = False
            if not self.flow_level:
                self.allow_simple_key = True

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:
        node = super().compose_scalar_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node

    def compose_sequence_node(self, anchor: Any) -> yaml.SequenceNode:
        node = super().compose_sequence_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node


def anchor_holders(loader: _UniqueKeyLoader, root: yaml.Node | None) -> list[str]:
    """Top-level keys that exist only to hold a YAML anchor.

    mihomo ignores unknown top-level keys, and profiles use that to keep
    shared fragments (`p: &p {type: http, interval: 86400}`) reused by
    `<<: *p` elsewhere. Mirage reports them apart from unknown keys: a non-Clash
    top-level key whose whole value (or each of whose entries) is anchored:
    that is such a holder. Other unknown keys are ignored too, as unknown.
    """
    if not isinstance(root, yaml.MappingNode):
        return []
    known = set(TOP_LEVEL_KEYS) | set(IGNORED_TOP_LEVEL)
    return [
        key.value
        for key, value in root.value
        if isinstance(key, yaml.ScalarNode)
        and isinstance(key.value, str)
        and key.value not in known
        and (id(value) in loader.anchored or _holds_anchors(loader, value))
    ]


def _holds_anchors(loader: _UniqueKeyLoader, node: yaml.Node) -> bool:
    """A mapping or list whose every entry is anchored (`rule-anchor:
    {domain: &d {...}, ip: &i {...}}`): a holder of fragments too."""
    if isinstance(node, yaml.MappingNode):
        children = [value for _, value in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        return False
    return bool(children) and all(id(child) in loader.anchored for child in children)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only keys written in this mapping count: a key that overrides one
    # pulled in by a `<<: *anchor` merge is the point of merging.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

# --- yaml.v3's plain scalars (resolve.go), replacing PyYAML's YAML 1.1 set ---

_NUMBER_TAG = "tag:mirage,2026:go-number"
_NUMBER = re.compile(
    r"""^[-+]?(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+
    |[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$""", re.X)
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INT64 = range(-(1 << 63), 1 << 64)  # ParseInt, then ParseUint


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64) (then ParseUint), as yaml.v3 calls it
    on a plain scalar with its underscores removed."""
    sign, body = (text[0], text[1:]) if text[:1] in "+-" else ("", text)
    bases = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}
    try:
        if body[:2] in bases:
            value = int(body[2:], bases[body[:2]])
        elif len(body) > 1 and body[0] == "0":
            value = int(body, 8)  # YAML 1.1 octal, kept by yaml.v3
        else:
            value = int(body, 10)
    except ValueError:
        return None
    value = -value if sign == "-" else value
    return value if value in _INT64 else None


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node))
    plain = text.replace("_", "")
    value = _go_int(plain)
    if value is not None:
        return value
    lower = plain.lower()
    if lower.lstrip("+-") == ".inf":
        return float("-inf") if lower.startswith("-") else float("inf")
    if lower == ".nan":
        return float("nan")
    if _GO_FLOAT.fullmatch(plain):
        return float(plain)
    return text


def _construct_binary(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    # yaml.v3 decodes !!binary into a Go string: the bytes, as text.
    try:
        data = base64.b64decode(str(loader.construct_scalar(node)))
    except (binascii.Error, ValueError):
        raise yaml.constructor.ConstructorError(
            None, None, "!!binary: not base64", node.start_mark) from None
    return data.decode("utf-8", "surrogateescape")


def _construct_unknown_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """A tag yaml.v3 does not resolve (`!<str>`, `!custom`): the value as
    if untagged, a scalar as its string (resolve.go returns it unresolved)."""
    if isinstance(node, yaml.MappingNode):
        return _construct_mapping(loader, node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.ScalarNode)
    return str(loader.construct_scalar(node))


_UniqueKeyLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool",
     re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:null",
     re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"]),
    # Before numbers, as in yaml.v3: `2001-12-14` is a date, not a number.
    ("tag:yaml.org,2002:timestamp", yaml.resolver.Resolver.yaml_implicit_resolvers["2"][-1][1],
     list("0123456789")),
    (_NUMBER_TAG, _NUMBER, list("-+0123456789.")),
):  # fmt: skip
    _UniqueKeyLoader.add_implicit_resolver(_tag, _pattern, _first)
_UniqueKeyLoader.add_constructor(_NUMBER_TAG, _construct_number)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:binary", _construct_binary)
_UniqueKeyLoader.add_constructor(None, _construct_unknown_tag)


def _describe(exc: yaml.YAMLError) -> str:
    """The YAML error without PyYAML's snippet of the offending line (that
    line may be `password: ...`): what went wrong and where."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    parts = []
    if exc.context:
        parts.append(exc.context + _where(exc.context_mark))
    if exc.problem:
        parts.append(exc.problem + _where(exc.problem_mark))
    return "; ".join(parts) or type(exc).__name__


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def read_yaml(source: Path) -> tuple[Any, list[str]]:
    """The document at `source` and its anchor-holding top-level keys.

    Raises ConfigError (path `<file>`) for an unreadable file, a YAML syntax
    error (the reason carries line and column) or nesting too deep.
    """
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", str(source), f"cannot read: {exc}") from None
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)
        # The first document only, as yaml.Unmarshal (what follows a `---`
        # is never parsed, so it cannot be an error either).
        root = loader.get_node() if loader.check_node() else None
        data = loader.construct_document(root) if root is not None else None
        holders = anchor_holders(loader, root)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", NO_VALUE, f"{source}: invalid YAML: {_describe(exc)}") \
            from None
    except RecursionError:
        raise ConfigError("<file>", NO_VALUE, f"{source}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, holders
