"""Rules as mihomo's API names them (appliance/rules/names.py): the type
and the payload a dashboard shows in `/connections` and `/rules`. The
logic payloads are the ones mihomo itself showed in the differential lab
test (tests/integration/test_differential.py)."""

from __future__ import annotations

import pytest

from appliance.config import parse_rule
from appliance.rules.names import rule_payload, rule_type


@pytest.mark.parametrize(("line", "shown"), [
    ("DOMAIN-SUFFIX,alpha.test,X", ("DomainSuffix", "alpha.test")),
    ("IP-CIDR,192.0.2.0/24,X,no-resolve", ("IPCIDR", "192.0.2.0/24")),
    ("DOMAIN-WILDCARD,*.wild?.test,X", ("DomainWildcard", "*.wild?.test")),
    ("AND,((DOMAIN-SUFFIX,logic.diff.test),(DST-PORT,18443)),X",
     ("AND", "((DomainSuffix,logic.diff.test) && (DstPort,18443))")),
    ("OR,((DOMAIN,or1.diff.test),(DOMAIN,or2.diff.test)),X",
     ("OR", "((Domain,or1.diff.test) || (Domain,or2.diff.test))")),
    ("NOT,((DST-PORT,18000-18999)),X", ("NOT", "(!(DstPort,18000-18999))")),
    # Nested: each part is (Type,its own payload), as mihomo's Logic.Payload.
    ("AND,((OR,((DOMAIN,a.test),(DOMAIN,b.test))),(NETWORK,udp)),X",
     ("AND", "((OR,((Domain,a.test) || (Domain,b.test))) && (Network,udp))")),
    ("MATCH,X", ("Match", "")),
])
def test_rule_as_mihomo_shows_it(line: str, shown: tuple[str, str]) -> None:
    rule = parse_rule(line)
    assert (rule_type(rule.type), rule_payload(rule)) == shown
