"""Configuration: the Clash/mihomo-compatible YAML profile plus `appliance:`.

`load_config(path)` / `parse_config(data)` return a validated, frozen
`Config` or raise `ConfigError` (key path, value, reason). `effective_config`
and `format_effective` show the result with defaults filled in.
"""

from appliance.config.loader import (
    NO_VALUE,
    ConfigError,
    check_runnable,
    load_config,
    parse_config,
)
from appliance.config.model import (
    FAKE_IP_TTL,
    ApplianceConfig,
    Config,
    DnsConfig,
    DomainPolicy,
    IPAddress,
    IPNetwork,
    Listen,
    Nameserver,
    ProxyConfig,
    ProxyGroupConfig,
    Rule,
)
from appliance.config.render import effective_config, format_effective, format_ignored

__all__ = [
    "FAKE_IP_TTL",
    "NO_VALUE",
    "ApplianceConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "DomainPolicy",
    "IPAddress",
    "IPNetwork",
    "Listen",
    "Nameserver",
    "ProxyConfig",
    "ProxyGroupConfig",
    "Rule",
    "check_runnable",
    "effective_config",
    "format_effective",
    "format_ignored",
    "load_config",
    "parse_config",
]
