"""A private CA and one server certificate for the lab's TLS servers (DoH, Trojan).

Made with the openssl CLI (Debian's `openssl` package), so the lab needs no
Python crypto library and the files are exactly what a person would make by
hand. The server certificate carries every given IP and name in its
subjectAltName: clients verify a DoH server given by IP literal against an
`IP:` entry, and one given by name against a `DNS:` entry.

Owns only the files it writes under `dir`. Fails with `CertError` (carrying
openssl's stderr) when openssl is missing or refuses the input.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Lab certificates outlive any test run but not a forgotten lab for long.
_DAYS = 30


class CertError(Exception):
    """openssl failed (missing binary, bad name or address)."""


@dataclass(frozen=True)
class CertPaths:
    """Where the PEM files are. `ca_cert` is what clients trust (`dns.ca_file`,
    `SSL_CERT_FILE`); `cert`/`key` are what the server presents."""

    ca_key: Path
    ca_cert: Path
    key: Path
    cert: Path


def _openssl(*args: str | Path) -> None:
    try:
        subprocess.run(
            ["openssl", *map(str, args)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError as exc:
        raise CertError("openssl not found (apt-get install openssl)") from exc
    except subprocess.CalledProcessError as exc:
        raise CertError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from exc


def subject_alt_name(ips: list[str], names: list[str]) -> str:
    """The subjectAltName value: `IP:a,IP:b,DNS:x`. Rejects non-IP `ips`
    (ValueError) so a name never lands in an IP entry by mistake."""
    entries = [f"IP:{ipaddress.ip_address(ip)}" for ip in ips]
    entries += [f"DNS:{name.rstrip('.')}" for name in names]
    if not entries:
        raise ValueError("a server certificate needs at least one IP or name")
    return ",".join(entries)


def make_ca_and_cert(dir: Path, ips: list[str], names: list[str]) -> CertPaths:
    """Create a CA and a server certificate for `ips` and `names` signed by it.

    Writes ca.key, ca.pem, server.key, server.pem (keys mode 0600) into `dir`
    (created if missing), overwriting earlier files. EC P-256 keys: fast to
    make, accepted by unbound, OpenSSL and Python's ssl module.
    """
    dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        ca_key=dir / "ca.key",
        ca_cert=dir / "ca.pem",
        key=dir / "server.key",
        cert=dir / "server.pem",
    )
    san = subject_alt_name(ips, names)
    common_name = names[0] if names else ips[0]
    csr = dir / "server.csr"
    ext = dir / "server.ext"
    ext.write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", paths.ca_key, "-out", paths.ca_cert,
        "-days", str(_DAYS), "-subj", "/CN=Mirage lab CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _openssl(
        "req", "-new", *ec, "-keyout", paths.key, "-out", csr,
        "-subj", f"/CN={common_name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", paths.ca_cert, "-CAkey", paths.ca_key,
        "-CAcreateserial", "-out", paths.cert, "-days", str(_DAYS), "-extfile", ext,
    )  # fmt: skip
    for key in (paths.ca_key, paths.key):
        key.chmod(0o600)
    csr.unlink()
    return paths
