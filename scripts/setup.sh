#!/bin/bash
# Prepare a fresh Debian 12 machine for `make test` and `make demo`:
# Debian packages (real servers for the lab, bcc, nftables bindings), the
# kernel-headers link bcc needs, and the project's virtualenv.
# Idempotent: a second run installs nothing and says so briefly.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
    python3-venv python3-bpfcc chromium python3-nftables python3-yaml nftables iproute2
    unbound dnsmasq-base nginx-light dante-server tinyproxy shadowsocks-libev trojan v2ray
    simple-obfs shadowsocks-v2ray-plugin microsocks wireguard-tools wireguard-go openssh-server
    bind9-dnsutils dnsperf iperf3 wrk curl openssl sqlite3 bpftool stunnel4 redsocks
    linux-headers-amd64
    ansible ansible-lint debootstrap vagrant vagrant-libvirt
)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps package install scripts from starting the servers on
    # the host: the lab starts its own copies inside namespaces.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles C at load time against /lib/modules/$(uname -r)/build. Kernels
# without a headers package (this VM's 6.18) get Debian's linux-headers-amd64
# linked in: the tc program uses only UAPI headers, which these cover.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
    if [ -n "$hdr" ] && [ -n "$common" ]; then
        mkdir -p "$kdir"
        ln -sfn "$hdr" "$kdir/build"
        ln -sfn "$common" "$kdir/source"
        echo "setup: kernel $(uname -r) has no headers; linked $hdr as $kdir/build (bcc needs it)"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import appliance, trio, dnslib, httpx, h2, pyroute2, pytest_trio, pytest_timeout, hypothesis, aioquic, hypercorn, starlette, prometheus_client, bcrypt" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi
