"""Print the Vagrant lab upstream's servers as JSON, rendered by the namespace lab's code.

Run on the Ansible controller by lab-upstream.yml with the project's Python:

    python lab_upstream_specs.py STATE_DIR PKI_DIR

STATE_DIR is where the files live on the upstream VM (/var/lib/mirage-lab);
PKI_DIR is a directory on the controller that keeps the lab CA and server
certificate across runs (made once with appliance.lab.certs, the namespace
lab's own helper). The output holds, for each server, the argv to run in the
foreground and the files it needs, exactly as appliance.lab.servers renders
them for `mirage lab up`: the two labs serve the same configuration.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from appliance.lab import servers
from appliance.lab.certs import make_ca_and_cert
from appliance.lab.topology import load_topology


def main(state_dir: Path, pki_dir: Path) -> int:
    topo = load_topology()
    if not (pki_dir / "server.pem").exists():
        make_ca_and_cert(pki_dir, *servers.tls_subjects(topo))
    tls = state_dir / "tls"
    specs = servers.server_specs(topo, state_dir, tls / "server.pem", tls / "server.key")
    users = []
    for socks in topo.socks:
        if socks.username and socks.password:
            # A fixed salt: the same hash every run, so Ansible changes nothing.
            hashed = subprocess.run(
                ["openssl", "passwd", "-6", "-salt", "mirage-lab", "-stdin"],
                input=socks.password, capture_output=True, text=True, check=True, timeout=30,
            ).stdout.strip()
            users.append({"name": socks.username, "password": hashed})
    out = {
        "pki": {
            "ca": str(pki_dir / "ca.pem"),
            "cert": str(pki_dir / "server.pem"),
            "key": str(pki_dir / "server.key"),
        },
        "tls_dir": str(tls),
        "big_path": str(state_dir / "big.bin"),
        "big_bytes": topo.web.big_bytes,
        "users": users,
        "honest_resolver": str(topo.honest_resolver.address),
        "servers": [
            {
                "name": spec.name,
                "command": shlex.join(spec.argv),
                "files": [{"path": str(p), "content": c} for p, c in spec.files.items()],
                "dirs": [str(d) for d in spec.dirs],
                "nobody_files": [str(p) for p in spec.nobody_files],
            }
            for spec in specs
        ],
    }
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
