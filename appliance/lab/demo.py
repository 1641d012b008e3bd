"""`mirage lab demo`: the brief's story, end to end, on the namespace lab.

1. Without Mirage: the client asks its ISP resolver (poisoned) and lands on
   the wrong site.
2. With `mirage run` on the gateway: the same client, unchanged, gets a fake
   IP; its connection is captured, mapped back to the name and sent to the
   right site through SOCKS5 (dante logs a domain-name request), HTTP CONNECT
   (tinyproxy) or DIRECT.
3. `dig @<poisoned resolver>` is hijacked to a fake IP; a raw TCP request to a
   fake IP reaches the domain behind it (the reverse mapping); a filtered
   name gets its real address; the control API shows the real answer next to
   the mapping.
4. Mirage stops; its table and rules are gone; the lab is torn down.

Each step prints what was run and what came back, and whether it is what
the story expects. Exit 0 only if every step did.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

FAKE_RE = re.compile(r"^198\.18\.\d+\.\d+$")


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.failures = 0

    def say(self, text: str) -> None:
        print(text, flush=True)

    def step(self, title: str, node: str, argv: Sequence[str],
             expect: Callable[[str], bool], why: str, label: str | None = None) -> str:
        result = self.lab.exec(node, argv, timeout=20)
        out = (result.stdout.strip() or result.stderr.strip()).splitlines()
        shown = " ".join(line.strip() for line in out)[:100] if out else "(nothing)"
        ok = result.returncode == 0 and expect(result.stdout)
        self.failures += not ok
        self.say(f"  [{node}] $ {label or ' '.join(argv)}")
        self.say(f"      -> {shown}")
        self.say(f"      {'ok' if ok else 'UNEXPECTED'}: {why}")
        return result.stdout

    def run(self) -> int:
        lab = self.lab
        poisoned = str(lab.topology.poisoned_resolver.address)
        self.say("== 1. Without Mirage: the client's ISP resolver is poisoned ==")
        self.step("poisoned A", "client", ["dig", "+short", "www.alpha.test"],
                  lambda o: o.strip() == "192.168.57.12",
                  "the ISP resolver answers gamma's address for www.alpha.test")
        self.step("wrong site", "client", ["curl", "-s", "-m", "5", "http://www.alpha.test/"],
                  lambda o: "MARKER-GAMMA" in o,
                  "so the browser lands on the wrong site")

        self.say("\n== 2. Mirage on the gateway (nothing changes on the client) ==")
        mirage = MirageRun(lab, lab_config(lab))
        mirage.start()
        try:
            self.with_mirage(poisoned)
        finally:
            code = mirage.stop()
            self.say(f"\n== 4. mirage run stopped (SIGTERM, exit {code}) ==")
            self.step("no table", "gateway", ["nft", "list", "tables"],
                      lambda o: "mirage" not in o, "Mirage's nftables table is gone")
            self.step("no rule", "gateway", ["ip", "rule", "show"],
                      lambda o: "fwmark 0x233" not in o, "and so is its policy-routing rule")
        return self.failures

    def with_mirage(self, poisoned: str) -> None:
        lab = self.lab
        self.step("fake A", "client", ["dig", "+short", "www.alpha.test"],
                  lambda o: bool(FAKE_RE.match(o.strip())),
                  "the same query now gets a fake IP from 198.18.0.0/16 (TTL 1)")
        before = lab.dante_log.read_text() if lab.dante_log.exists() else ""
        self.step("right site", "client", ["curl", "-s", "-m", "5", "http://www.alpha.test/"],
                  lambda o: "MARKER-ALPHA" in o,
                  "the connection to the fake IP reaches the right site via SOCKS5")
        after = lab.dante_log.read_text() if lab.dante_log.exists() else ""
        new = after[len(before):]
        named = "www.alpha.test" in new
        self.failures += not named
        self.say(f"      {'ok' if named else 'UNEXPECTED'}: dante's log shows it was asked "
                 "for the name www.alpha.test, not an address (RFC 3089 step 5)")
        self.step("http connect", "client", ["curl", "-s", "-m", "5", "http://www.beta.test/"],
                  lambda o: "MARKER-BETA" in o, "www.beta.test goes through tinyproxy (CONNECT)")
        self.step("direct", "client", ["curl", "-s", "-m", "5", "http://www.gamma.test/"],
                  lambda o: "MARKER-GAMMA" in o,
                  "www.gamma.test goes DIRECT (resolved over DoH by the gateway)")

        self.say("\n== 3. Hijack, reverse mapping, filter, and the real answer ==")
        out = self.step("hijack", "client", ["dig", "+short", f"@{poisoned}", "www.beta.test"],
                        lambda o: bool(FAKE_RE.match(o.strip())),
                        f"a query sent to {poisoned} itself is answered by Mirage")
        fake = out.strip()
        raw = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{fake or '198.18.0.2'}',80),timeout=5)\n"
            "s.sendall(b'GET / HTTP/1.0\\r\\nHost: www.beta.test\\r\\n\\r\\n')\n"
            "d=b''\n"
            "while (c:=s.recv(4096)): d+=c\n"
            "print(d.decode(errors='replace').split('\\r\\n\\r\\n',1)[-1])\n"
        )
        self.step("raw tcp", "client", [sys.executable, "-c", raw],
                  lambda o: "MARKER-BETA" in o,
                  f"a raw TCP request to {fake} reaches www.beta.test (reverse mapping)",
                  label=f"python3 -c '<connect {fake}:80, send GET / Host: www.beta.test>'")
        self.step("filtered", "client", ["dig", "+short", "time.ntp.test"],
                  lambda o: o.strip() == "192.168.57.123",
                  "time.ntp.test is in fake-ip-filter: its real address, over DoH")
        self.step("mx", "client", ["dig", "+short", "MX", "alpha.test"],
                  lambda o: "mail.alpha.test" in o, "other query types pass through to DoH")
        resolved = self.step(
            "resolve", "gateway",
            [sys.executable, "-m", "appliance", "resolve", "-c",
             str(lab.state_dir / "mirage.yaml"), "www.alpha.test", "--json"],
            lambda o: '"192.168.57.10"' in o or "192.168.57.10" in o,
            "`mirage resolve` shows the real upstream answer next to the fake IP",
            label="mirage resolve www.alpha.test")
        try:
            data = json.loads(resolved)
            self.say(f"      mapping {data.get('mapping')} <- real "
                     f"{[a['data'] for a in data.get('upstream', {}).get('answers', [])]}")
        except ValueError:
            pass


def run_demo(prefix: str = "mirage") -> int:
    lab = Lab(prefix)
    print(f"Building the lab ({', '.join(lab.namespaces)}) ...", flush=True)
    lab.up()
    try:
        failures = Demo(lab).run()
    finally:
        lab.down()
        print("Lab torn down.", flush=True)
    print(f"\nDemo {'passed' if not failures else f'had {failures} unexpected results'}.")
    return 0 if not failures else 1
