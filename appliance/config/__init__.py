"""Configuration: the Clash/mihomo-compatible YAML profile plus `appliance:`.

`load_config(path)` / `parse_config(data)` return a validated, frozen
`Config` or raise `ConfigError` (key path, value, reason); `parse_rule(line)`
makes one typed `Rule` the same way (for a `Config` built in code). `effective_config`
and `format_effective` show the result with defaults filled in.
"""

from appliance.config.loader import (
    NO_VALUE,
    ConfigError,
    ConfigErrors,
    check_runnable,
    every_error,
    load_config,
    parse_config,
    parse_rule,
)
from appliance.config.model import (
    FAKE_IP_TTL,
    ApplianceConfig,
    Config,
    DnsConfig,
    DomainKeyword,
    DomainName,
    DomainPolicy,
    DomainSuffix,
    IPAddress,
    IPNetwork,
    Listen,
    MatchAll,
    Nameserver,
    NetworkKind,
    PortSet,
    ProxyConfig,
    ProxyGroupConfig,
    Rule,
    RulePayload,
    RuleType,
)
from appliance.config.render import effective_config, format_effective, format_ignored

__all__ = [
    "FAKE_IP_TTL",
    "NO_VALUE",
    "ApplianceConfig",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "DnsConfig",
    "DomainKeyword",
    "DomainName",
    "DomainPolicy",
    "DomainSuffix",
    "IPAddress",
    "IPNetwork",
    "Listen",
    "MatchAll",
    "Nameserver",
    "NetworkKind",
    "PortSet",
    "ProxyConfig",
    "ProxyGroupConfig",
    "Rule",
    "RulePayload",
    "RuleType",
    "check_runnable",
    "effective_config",
    "every_error",
    "format_effective",
    "format_ignored",
    "load_config",
    "parse_config",
    "parse_rule",
]
