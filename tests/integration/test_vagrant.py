"""The Vagrant lab: its Vagrantfile validates, and its machines are the topology's.

No VM is started (CI has no hypervisor). What is checked:
- `vagrant validate` passes (Debian's vagrant; with vagrant-libvirt installed,
  the libvirt provider's settings, where the lab's networks are, too);
- the machine table the Vagrantfile builds (vagrant/lab.rb, loaded by Ruby)
  has the topology file's machines, interfaces and addresses, one
  point-to-point network per topology link;
- each machine's generated network script, run in a throwaway network
  namespace on a NIC with the machine's MAC, leaves exactly the topology's
  interface names, addresses and routes (read back with `ip -j`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
TOPOLOGY = REPO / "appliance/lab/topology.yaml"

pytestmark = pytest.mark.skipif(not shutil.which("ruby"), reason="needs ruby (Debian's vagrant)")


def topology() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(TOPOLOGY.read_text())
    return data


def machines() -> list[dict[str, Any]]:
    """The Vagrantfile's machine table, as lab.rb builds it (JSON from Ruby)."""
    proc = subprocess.run(["ruby", str(VAGRANT_DIR / "lab.rb"), str(TOPOLOGY)],
                          capture_output=True, text=True, timeout=60, check=True)
    table: list[dict[str, Any]] = json.loads(proc.stdout)
    return table


def network_script(name: str) -> str:
    proc = subprocess.run(
        ["ruby", "-r", str(VAGRANT_DIR / "lab.rb"), "-e",
         f'puts MirageLab.machines(ARGV[0]).find {{ |m| m.name == "{name}" }}.network_script',
         str(TOPOLOGY)],
        capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


@pytest.fixture
def vagrant_env(tmp_path: Path) -> dict[str, str]:
    """Vagrant's home and its .vagrant directory in a temporary place."""
    env = dict(os.environ)
    env.update(VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
    return env


@pytest.mark.skipif(not shutil.which("vagrant"), reason="needs vagrant (Debian package)")
def test_vagrantfile_validates(vagrant_env: dict[str, str]) -> None:
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR,
                          env=vagrant_env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


@pytest.mark.skipif(not shutil.which("vagrant"), reason="needs vagrant (Debian package)")
def test_vagrantfile_validates_with_libvirt_provider(vagrant_env: dict[str, str]) -> None:
    plugins = subprocess.run(["vagrant", "plugin", "list"], env=vagrant_env,
                             capture_output=True, text=True, timeout=120, check=False)
    if "vagrant-libvirt" not in plugins.stdout:
        pytest.skip("needs vagrant-libvirt (Debian package) to validate provider settings")
    proc = subprocess.run(["vagrant", "validate"], cwd=VAGRANT_DIR,
                          env={**vagrant_env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vagrant_provisions_existing_playbooks() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert '"ansible/lab.yml"' in text
    assert (REPO / "ansible/lab.yml").is_file()
    lab = yaml.safe_load((REPO / "ansible/lab.yml").read_text())
    imported = {p["ansible.builtin.import_playbook"] for p in lab
                if "ansible.builtin.import_playbook" in p}
    assert imported == {"lab-upstream.yml", "site.yml"}


def test_machines_are_the_topology_nodes() -> None:
    topo = topology()
    table = {m["name"]: m for m in machines()}
    assert set(table) == set(topo["nodes"])
    for name, node in topo["nodes"].items():
        nics = {n["name"]: n for n in table[name]["nics"]}
        assert set(nics) == set(node["interfaces"])
        for iface, spec in node["interfaces"].items():
            assert nics[iface]["addresses"] == spec["addresses"], (name, iface)
        assert table[name]["gateway4"] == node.get("gateway4")
        assert table[name]["gateway6"] == node.get("gateway6")
    # The LAN device's resolver is the topology's (the poisoned ISP one).
    assert table["client"]["resolver"] == topo["nodes"]["client"]["resolver"]


def test_each_link_is_one_point_to_point_network() -> None:
    topo = topology()
    nics = {f'{m["name"]}:{n["name"]}': n for m in machines() for n in m["nics"]}
    macs = [n["mac"] for n in nics.values()]
    assert len(set(macs)) == len(macs)
    networks = set()
    for a, b in topo["links"]:
        assert nics[a]["link"] == nics[b]["link"]
        assert nics[a]["peer"] == b and nics[b]["peer"] == a
        # libvirt UDP tunnel: each end sends to the other's local port.
        assert nics[a]["local_port"] == nics[b]["peer_port"]
        assert nics[b]["local_port"] == nics[a]["peer_port"]
        networks.add(nics[a]["link"])
    assert len(networks) == len(topo["links"])


def test_groups_put_each_playbook_on_its_machine() -> None:
    groups = {m["name"]: m["groups"] for m in machines()}
    assert groups == {"client": ["lab_clients"], "gateway": ["mirage_gateways"],
                      "upstream": ["lab_upstreams"]}
    inventory = yaml.safe_load((REPO / "ansible/inventories/lab/hosts.yml").read_text())
    children = inventory["all"]["children"]
    for name, names in groups.items():
        for group in names:
            assert name in children[group]["hosts"]


# --- The network scripts, run for real in network namespaces ---------------


def ip(ns: str, *args: str) -> Any:
    proc = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                          timeout=30, check=True)
    return json.loads(proc.stdout or "[]")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"dep-vg-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("node", ["client", "gateway", "upstream"])
def test_network_script_builds_the_topology(node: str, netns: str, tmp_path: Path) -> None:
    machine = next(m for m in machines() if m["name"] == node)
    topo = topology()
    # NICs as Vagrant would attach them: generic names, the table's MACs.
    # (A veth pair each: the peer, up, gives the NIC its carrier.)
    for i, nic in enumerate(machine["nics"]):
        subprocess.run(["ip", "-n", netns, "link", "add", f"eth{i + 1}", "address", nic["mac"],
                        "type", "veth", "peer", "name", f"peer{i + 1}"], check=True, timeout=30)
        subprocess.run(["ip", "-n", netns, "link", "set", f"peer{i + 1}", "up"],
                       check=True, timeout=30)
    script = tmp_path / "net.sh"
    script.write_text(network_script(node))
    env = {**os.environ, "LAB_ROOT": str(tmp_path / "root")}
    for _ in range(2):  # Vagrant runs it on every `up`: a second run must succeed
        proc = subprocess.run(["ip", "netns", "exec", netns, "bash", str(script)], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr

    links = {link["ifname"]: link for link in ip(netns, "link")}
    for iface, spec in topo["nodes"][node]["interfaces"].items():
        assert iface in links, links.keys()
        have = {f'{a["local"]}/{a["prefixlen"]}' for a in ip(netns, "addr", "show", "dev", iface)[0]
                ["addr_info"] if a.get("scope") == "global"}
        want = {str(ipaddress.ip_interface(a)) for a in spec["addresses"]}
        assert have == want, (iface, have, want)
        link_file = tmp_path / f"root/etc/systemd/network/10-mirage-lab-{iface}.link"
        assert f"Name={iface}" in link_file.read_text()

    routes4 = {r["dst"]: r.get("gateway") for r in ip(netns, "-4", "route")}
    gateway4 = topo["nodes"][node].get("gateway4")
    if node == "client":
        assert routes4["default"] == gateway4
        resolv = (tmp_path / "root/etc/resolv.conf").read_text()
        assert resolv == f'nameserver {topo["nodes"]["client"]["resolver"]}\n'
    elif node == "upstream":
        # Back to the LAN through the gateway; nothing else through it.
        assert routes4["192.168.56.0/24"] == gateway4
        assert "default" not in routes4
    else:
        assert all(gw is None for gw in routes4.values())


def test_upstream_servers_render_from_the_namespace_lab_code(tmp_path: Path) -> None:
    """lab-upstream.yml's first play: the namespace lab's code renders the
    upstream's servers (the same configuration in both labs)."""
    python = REPO / ".venv/bin/python"
    if not python.exists():
        pytest.skip("needs the project's virtualenv (scripts/setup.sh)")
    proc = subprocess.run(
        [str(python), str(REPO / "ansible/files/lab_upstream_specs.py"), "/var/lib/mirage-lab",
         str(tmp_path / "pki")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    names = {s["name"] for s in out["servers"]}
    topo = topology()
    socks = {s["name"] for s in topo["socks"]}
    assert names == {"dnsmasq", "unbound", "nginx", "tinyproxy", *socks}
    assert out["honest_resolver"] == topo["honest-resolver"]["address"]
    nginx = next(s for s in out["servers"] if s["name"] == "nginx")
    for vhost in topo["web"]["vhosts"]:
        assert vhost["marker"] in nginx["files"][0]["content"]
    for key in ("ca", "cert", "key"):
        assert Path(out["pki"][key]).is_file()
    # The PKI is kept: a second render leaves the certificate as it was.
    before = Path(out["pki"]["cert"]).read_bytes()
    subprocess.run(proc.args, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                   timeout=120, check=True)
    assert Path(out["pki"]["cert"]).read_bytes() == before
