"""The routing summary `mirage check` ends with: what a loaded profile will
do to traffic, in terms a person can act on.

- how many proxies, groups, rules and providers loaded;
- which proxies were skipped, grouped by reason ("a vless proxy with
  reality-opts (REALITY is not supported): 3 proxies (a, b, c)"), and which
  groups were skipped with them (every member skipped, a relay that lost a
  hop);
- which rules end on an outbound Mirage cannot use, as runs of consecutive
  rules with the same target, and what that does: the flows go to
  COMPATIBLE, which sends them DIRECT, as mihomo does with a group left
  without a proxy (appliance/outbound/groups.py CompatibleOutbound);
- which groups take their members only from proxy providers, and so hold
  COMPATIBLE (DIRECT) until a provider has proxies: at start a provider's
  proxies come from its cache file (`path`) if one exists, else it is empty
  until its first download succeeds (mihomo does the same);
- which groups have no member at all (include-all found nothing): they
  hold COMPATIBLE (DIRECT) for good;
- which rule providers match nothing until downloaded, and rules that never
  match a LAN device's flow (PROCESS-*).

Sans-I/O: `summarize` reads a `Config` and the set of providers whose cache
file exists (the caller looks); `RoutingSummary.as_data()` is what
`mirage check --json` prints and `lines()` the text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.model import (
    PROCESS_RULE_TYPES,
    Config,
    LogicRules,
    Rule,
    RuleSetName,
    SubRuleCall,
)

COMPATIBLE_EFFECT = ("their flows go to COMPATIBLE, which sends them DIRECT "
                     "(as mihomo does with a group that has no proxy)")
# Names listed in a text line before "and N more" (JSON lists them all).
NAMES_SHOWN = 5


@dataclass(frozen=True)
class SkippedReason:
    """Proxies (or groups) skipped for one reason, in file order."""

    reason: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class DeadEnd:
    """Consecutive rules of one list (`rules`, `sub-rules.NAME`) whose
    target is an outbound Mirage skipped. `first`/`last` are indices in
    that list; `types` counts the rule types in the run."""

    where: str
    first: int
    last: int
    target: str
    why: str
    types: tuple[tuple[str, int], ...]

    @property
    def span(self) -> str:
        """`rules[3]` or `rules[3..9]`: key-path spelling of the run."""
        if self.first == self.last:
            return f"{self.where}[{self.first}]"
        return f"{self.where}[{self.first}..{self.last}]"


@dataclass(frozen=True)
class ProviderCopy:
    """What a proxy provider's copy at hand (cache file, file, inline
    payload) yields now: the proxies Mirage can use, those it skips with
    why, or the reason the copy yields nothing (`error`)."""

    proxies: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class ProviderState:
    """A proxy or rule provider at start: `kind` is proxy or rule, `type`
    http/file/inline; `ready` whether it has something before any download
    (inline payload, or a cache/file that exists); `used_by` the groups
    (proxy providers) or the number of rules (rule providers) using it."""

    name: str
    kind: str
    type: str
    path: str | None
    ready: bool
    used_by: tuple[str, ...]
    rules: int = 0
    copy: ProviderCopy | None = None


@dataclass(frozen=True)
class ProviderOnlyGroup:
    """A group whose members all come from proxy providers (nothing usable
    named in the file), and how many rules send flows to it."""

    name: str
    providers: tuple[str, ...]
    ready: bool
    rules: int


@dataclass(frozen=True)
class RoutingSummary:
    counts: tuple[tuple[str, int], ...]
    skipped_proxies: tuple[SkippedReason, ...]
    skipped_groups: tuple[SkippedReason, ...]
    dead_ends: tuple[DeadEnd, ...]
    providers: tuple[ProviderState, ...]
    provider_only_groups: tuple[ProviderOnlyGroup, ...]
    # Groups with no member at all (include-all found no proxy, no
    # provider): (name, rules that name them).
    empty_groups: tuple[tuple[str, int], ...]
    never_match: tuple[tuple[str, int], ...]
    final: str
    ignored: int

    def as_data(self) -> dict[str, Any]:
        """Plain data (what `mirage check --json` prints under `summary`)."""
        return {
            "counts": dict(self.counts),
            "skipped-proxies": [{"reason": s.reason, "count": len(s.names),
                                 "names": list(s.names)} for s in self.skipped_proxies],
            "skipped-groups": [{"reason": s.reason, "names": list(s.names)}
                               for s in self.skipped_groups],
            "dead-ends": [{"rules": d.span, "count": d.last - d.first + 1,
                           "types": dict(d.types), "target": d.target, "why": d.why,
                           "effect": COMPATIBLE_EFFECT} for d in self.dead_ends],
            "providers": [{"name": p.name, "kind": p.kind, "type": p.type, "path": p.path,
                           "ready": p.ready, "used-by": list(p.used_by),
                           **({"rules": p.rules} if p.kind == "rule" else {}),
                           **({"copy": _copy_data(p.copy)} if p.copy is not None else {})}
                          for p in self.providers],
            "provider-only-groups": [{"name": g.name, "providers": list(g.providers),
                                      "ready": g.ready, "rules": g.rules}
                                     for g in self.provider_only_groups],
            "empty-groups": [{"name": n, "rules": r} for n, r in self.empty_groups],
            "never-match": dict(self.never_match),
            "final": self.final,
            "ignored-keys": self.ignored,
        }

    def lines(self) -> list[str]:
        """The summary as sentences, one per line (no trailing newlines)."""
        c = dict(self.counts)
        out = [
            f"loaded: {c['proxies']} proxies ({c['proxies-skipped']} skipped), "
            f"{c['groups']} groups ({c['groups-skipped']} skipped), {c['rules']} rules"
            + (f" (+{c['sub-rules']} in sub-rules)" if c["sub-rules"] else "")
            + f", {c['proxy-providers']} proxy providers, {c['rule-providers']} rule providers"
        ]
        for s in self.skipped_proxies:
            out.append(f"skipped, {s.reason}: {_count(len(s.names), 'proxy', 'proxies')} "
                       f"({_names(s.names)})")
        for s in self.skipped_groups:
            out.append(f"skipped, {s.reason}: {_count(len(s.names), 'group', 'groups')} "
                       f"({_names(s.names)})")
        for d in self.dead_ends:
            kinds = ", ".join(f"{n} {t}" for t, n in d.types)
            out.append(f"{d.span} ({kinds}) send to {d.target!r}, {d.why}: {COMPATIBLE_EFFECT}")
        for p in self.providers:
            if p.copy is None:
                continue
            if p.copy.error is not None:
                out.append(f"proxy provider {p.name!r}: its copy at hand yields nothing "
                           f"({p.copy.error})")
            else:
                out.append(f"proxy provider {p.name!r}: its copy at hand has "
                           f"{_count(p.copy.proxies, 'proxy', 'proxies')} Mirage uses")
            for reason in _grouped(p.copy.skipped):
                out.append(f"proxy provider {p.name!r} skips, {reason.reason}: "
                           f"{_count(len(reason.names), 'proxy', 'proxies')} "
                           f"({_names(reason.names)})")
        waiting_groups: dict[tuple[str, ...], list[ProviderOnlyGroup]] = {}
        for g in self.provider_only_groups:
            if not g.ready:
                waiting_groups.setdefault(g.providers, []).append(g)
        for providers, groups in waiting_groups.items():
            rules = sum(g.rules for g in groups)
            used = f"; {_count(rules, 'rule sends', 'rules send')} flows to them" if rules else ""
            out.append(f"{_count(len(groups), 'group', 'groups')} "
                       f"({_names(g.name for g in groups)}) "
                       f"{'takes its' if len(groups) == 1 else 'take their'} members only from "
                       f"{_names(providers)}, with no usable proxy at hand: COMPATIBLE "
                       f"(DIRECT) until a download brings one{used}")
        if self.empty_groups:
            rules = sum(r for _, r in self.empty_groups)
            used = f"; {_count(rules, 'rule sends', 'rules send')} flows to them" if rules else ""
            out.append(f"{_count(len(self.empty_groups), 'group', 'groups')} "
                       f"({_names(n for n, _ in self.empty_groups)}) "
                       f"{'has' if len(self.empty_groups) == 1 else 'have'} no member (no proxy "
                       f"named or included, no provider): COMPATIBLE (DIRECT){used}")
        waiting = [p for p in self.providers if p.kind == "rule" and not p.ready and p.rules]
        if waiting:
            out.append(f"rule providers not yet downloaded ({_names([p.name for p in waiting])}):"
                       f" their {sum(p.rules for p in waiting)} RULE-SET rules match nothing "
                       "until the first download succeeds")
        for rtype, n in self.never_match:
            out.append(f"{_count(n, f'{rtype} rule', f'{rtype} rules')} never match: a LAN "
                       "device's flow has no process on the gateway")
        out.append(f"everything else: {self.final}")
        if self.ignored:
            out.append(f"{self.ignored} keys or items ignored (listed above)")
        return out


def _copy_data(c: ProviderCopy) -> dict[str, Any]:
    return {"proxies": c.proxies,
            "skipped": [{"reason": r.reason, "count": len(r.names), "names": list(r.names)}
                        for r in _grouped(c.skipped)],
            "error": c.error}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _names(names: Iterable[str]) -> str:
    listed = list(names)
    shown = ", ".join(listed[:NAMES_SHOWN])
    more = len(listed) - NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _grouped(items: Iterable[tuple[str, str]]) -> tuple[SkippedReason, ...]:
    by_reason: dict[str, list[str]] = {}
    for name, reason in items:
        by_reason.setdefault(reason, []).append(name)
    ordered = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))  # stable: file order ties
    return tuple(SkippedReason(reason, tuple(names)) for reason, names in ordered)


def _dead_ends(where: str, rules: Iterable[Rule], why: dict[str, str]) -> list[DeadEnd]:
    runs: list[DeadEnd] = []
    current: list[tuple[int, Rule]] = []

    def close() -> None:
        if current:
            target = current[0][1].target
            types = Counter(r.type for _, r in current)
            runs.append(DeadEnd(where, current[0][0], current[-1][0], target, why[target],
                                tuple(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))))
            current.clear()

    for i, rule in enumerate(rules):
        dead = rule.type != "SUB-RULE" and rule.target in why
        if current and (not dead or rule.target != current[0][1].target):
            close()
        if dead:
            current.append((i, rule))
    close()
    return runs


def _path_text(path: Path | None, base: Path | None) -> str | None:
    if path is None:
        return None
    if base is not None:
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)


def summarize(cfg: Config, cached: Collection[str] = (),
              copies: Mapping[str, ProviderCopy] | None = None) -> RoutingSummary:
    """The routing summary of `cfg`. `cached` names the rule providers whose
    file exists now; `copies` what each proxy provider's copy at hand
    yields (absent: no copy). The caller looks and parses."""
    copies = copies or {}
    why = {s.name: s.reason for s in cfg.skipped}
    skipped_proxies = _grouped((s.name, s.reason) for s in cfg.skipped if s.kind == "proxy")
    skipped_groups = _grouped((s.name, s.reason) for s in cfg.skipped if s.kind == "group")

    all_rules = list(cfg.rules) + [r for _, rs in cfg.sub_rules for r in rs]
    dead = _dead_ends("rules", cfg.rules, why)
    for name, rs in cfg.sub_rules:
        dead += _dead_ends(f"sub-rules.{name}", rs, why)

    targeted = Counter(r.target for r in all_rules if r.type != "SUB-RULE")
    base = cfg.source.parent if cfg.source is not None else None
    users: dict[str, list[str]] = {}
    for g in cfg.proxy_groups:
        for u in g.use:
            users.setdefault(u, []).append(g.name)
    providers: list[ProviderState] = []
    ready: dict[str, bool] = {}
    for p in cfg.proxy_providers:
        copy = copies.get(p.name)
        ready[p.name] = copy is not None and copy.proxies > 0
        providers.append(ProviderState(p.name, "proxy", p.type, _path_text(p.path, base),
                                       ready[p.name], tuple(users.get(p.name, ())),
                                       copy=copy))
    rule_sets = Counter(_rule_set_names(all_rules))
    for rp in cfg.rule_providers:
        providers.append(ProviderState(
            rp.name, "rule", rp.type, _path_text(rp.path, base),
            bool(rp.payload) if rp.type == "inline" else rp.name in cached, (),
            rules=rule_sets.get(rp.name, 0)))

    provider_only = tuple(
        ProviderOnlyGroup(g.name, g.use, any(ready.get(u, False) for u in g.use),
                          targeted.get(g.name, 0))
        for g in cfg.proxy_groups if g.use and not g.proxies)
    empty = tuple((g.name, targeted.get(g.name, 0)) for g in cfg.proxy_groups
                  if not g.use and not g.proxies)

    never = Counter(r.type for r in all_rules if r.type in PROCESS_RULE_TYPES)
    last = cfg.rules[-1] if cfg.rules else None
    if last is None or last.type != "MATCH":
        final = "no MATCH rule: flows no rule matches go DIRECT"
    elif last.target in why:
        final = f"MATCH -> {last.target!r} ({why[last.target]}): COMPATIBLE (DIRECT)"
    else:
        final = f"MATCH -> {last.target!r}"

    counts = (
        ("proxies", len(cfg.proxies)),
        ("proxies-skipped", sum(1 for s in cfg.skipped if s.kind == "proxy")),
        ("groups", len(cfg.proxy_groups)),
        ("groups-skipped", sum(1 for s in cfg.skipped if s.kind == "group")),
        ("rules", len(cfg.rules)),
        ("sub-rules", sum(len(rs) for _, rs in cfg.sub_rules)),
        ("proxy-providers", len(cfg.proxy_providers)),
        ("rule-providers", len(cfg.rule_providers)),
    )
    return RoutingSummary(
        counts=counts,
        skipped_proxies=skipped_proxies,
        skipped_groups=skipped_groups,
        dead_ends=tuple(dead),
        providers=tuple(providers),
        provider_only_groups=provider_only,
        empty_groups=empty,
        never_match=tuple(sorted(never.items())),
        final=final,
        ignored=len(cfg.ignored_keys),
    )


def _rule_set_names(rules: Iterable[Rule]) -> Iterable[str]:
    """Every RULE-SET provider name the rules use, inside logic rules and
    SUB-RULE conditions too."""
    for r in rules:
        if isinstance(r.payload, RuleSetName):
            yield r.payload.name
        elif isinstance(r.payload, LogicRules):
            yield from _rule_set_names(r.payload.rules)
        elif isinstance(r.payload, SubRuleCall):
            yield from _rule_set_names((r.payload.condition,))
