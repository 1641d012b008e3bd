"""Dropping to the runtime capabilities (appliance/privileges.py), checked
in a child process (the test runner keeps its own) and read back from
/proc/self/status, which the kernel writes, not the code under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI is root)")

CHILD = textwrap.dedent("""
    import json, os, socket, sys
    from appliance import privileges
    dropped = privileges.drop_to_runtime(ebpf=sys.argv[1] == "ebpf")
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    eff = int(status["CapEff"], 16)
    bnd = int(status["CapBnd"], 16)
    amb = int(status["CapAmb"], 16)
    # What the runtime set must still allow: a marked, transparent socket.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 255)
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    s.close()
    # What it must no longer allow: reading a file only another user may read.
    try:
        open(sys.argv[2]).read()
        dac = "allowed"
    except PermissionError:
        dac = "refused"
    print(json.dumps({"dropped": dropped, "eff": eff, "bnd": bnd, "amb": amb, "dac": dac}))
""")


@pytest.mark.parametrize("backend", ["nftables", "ebpf"])
def test_runtime_set_only(backend: str, tmp_path: os.PathLike[str]) -> None:
    secret = os.path.join(tmp_path, "secret")
    with open(secret, "w") as f:
        f.write("x")
    os.chown(secret, 12345, 12345)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    r = subprocess.run([sys.executable, "-c", CHILD, backend, secret],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = (1 << 10) | (1 << 12) | (1 << 13) | ((1 << 39) if backend == "ebpf" else 0)
    assert out["eff"] == want
    assert out["bnd"] == want
    # CAP_NET_ADMIN stays ambient: the helper Mirage may start later
    # (wireguard-go) holds it too, as a non-root user.
    assert out["amb"] == 1 << 12
    assert out["dac"] == "refused"
    assert "CAP_SYS_ADMIN" in out["dropped"] and "CAP_DAC_OVERRIDE" in out["dropped"]
