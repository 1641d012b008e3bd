"""How mihomo names a rule in its API: the rule's type (constant/rule.go
`RuleType.String`) and its payload (`Rule.Payload`), so that a flow's
`rule` and `rulePayload` in `/connections` read as mihomo's do. No I/O.
"""

from __future__ import annotations

from appliance.config.model import LogicRules, Rule

# mihomo's rule type names, by profile keyword.
RULE_TYPES = {
    "DOMAIN": "Domain", "DOMAIN-SUFFIX": "DomainSuffix", "DOMAIN-KEYWORD": "DomainKeyword",
    "DOMAIN-REGEX": "DomainRegex", "GEOSITE": "GeoSite", "GEOIP": "GeoIP",
    "SRC-GEOIP": "SrcGeoIP", "IP-ASN": "IPASN", "SRC-IP-ASN": "SrcIPASN",
    "IP-CIDR": "IPCIDR", "IP-CIDR6": "IPCIDR", "SRC-IP-CIDR": "SrcIPCIDR",
    "IP-SUFFIX": "IPSuffix", "SRC-IP-SUFFIX": "SrcIPSuffix", "SRC-PORT": "SrcPort",
    "DST-PORT": "DstPort", "IN-PORT": "InPort", "IN-USER": "InUser", "IN-NAME": "InName",
    "IN-TYPE": "InType", "PROCESS-NAME": "ProcessName", "PROCESS-PATH": "ProcessPath",
    "PROCESS-NAME-REGEX": "ProcessNameRegex", "PROCESS-PATH-REGEX": "ProcessPathRegex",
    "MATCH": "Match", "RULE-SET": "RuleSet", "NETWORK": "Network", "DSCP": "DSCP",
    "UID": "Uid", "SUB-RULE": "SubRules", "AND": "AND", "OR": "OR", "NOT": "NOT",
}  # fmt: skip


def rule_type(keyword: str) -> str:
    """A profile's rule keyword as mihomo's API names the type."""
    if keyword in RULE_TYPES:
        return RULE_TYPES[keyword]
    return "".join(part.title() for part in keyword.split("-"))


def rule_payload(rule: Rule) -> str:
    """`rule`'s payload as mihomo shows it. A logic rule is rebuilt from its
    parts (rules/logic/logic.go `Payload`): `(!(Type,payload))` for NOT,
    `((Type,payload) || (...))` for OR, `&&` for AND; anything else is the
    payload in Clash spelling."""
    payload = rule.payload
    if not isinstance(payload, LogicRules):
        return rule.value
    parts = [f"({rule_type(r.type)},{rule_payload(r)})" for r in payload.rules]
    if rule.type == "NOT":
        return f"(!{parts[0]})"
    return "(" + (" || " if rule.type == "OR" else " && ").join(parts) + ")"
