"""The YAML file -> plain data, the way mihomo reads it.

Duplicate keys are refused (Go's yaml.v3 does too), `<<: *anchor` merges
work, and top-level keys that only hold an anchor are found so the loader
can report them ignored instead of unknown.
"""

from __future__ import annotations

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
        root = loader.get_single_node()
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
