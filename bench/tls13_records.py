"""The TLS 1.3 client under REALITY (appliance/proto/tls13.py) beside
Python's ssl (OpenSSL) as the client, in one run, without sockets: both
talk to the same OpenSSL server over memory BIOs.

Prints, per client: handshakes/s (the client's and server's work both,
the same server for both rows), and download MB/s (the server writes
16 KiB records, the client decrypts them: a flow's download direction),
and the ratio of this client to OpenSSL's. Bounded: COUNT handshakes and
MEGABYTES of data per row.

    python bench/tls13_records.py [--handshakes N] [--megabytes M]
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.proto.tls13 import Tls13Client

CHUNK = 1 << 14


def server_context(d: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(d / "c.pem", d / "k.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


class Pair:
    """An OpenSSL server and one client (ours or OpenSSL's), handshaken."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext | None) -> None:
        self.s_in, self.s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        if client_ctx is None:
            self.ours: Tls13Client | None = Tls13Client("bench.test")
            self.s_in.write(self.ours.start())
            self._server_step()
            self.ours.receive_data(self.s_out.read())
            self.ours.next_record()
            self.s_in.write(self.ours.data_to_send())
            self.server.do_handshake()
        else:
            self.ours = None
            self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="bench.test")
            while True:
                try:
                    self.client.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.s_in.write(self.c_out.read())
                    self._server_step()
                    self.c_in.write(self.s_out.read())
            self.s_in.write(self.c_out.read())
            self.server.do_handshake()

    def _server_step(self) -> None:
        try:
            self.server.do_handshake()
        except ssl.SSLWantReadError:
            pass

    def download(self, total: int) -> float:
        """Seconds for the client to decrypt `total` bytes the server sent."""
        block = b"x" * CHUNK
        got = 0
        spent = 0.0
        while got < total:
            for _ in range(64):
                self.server.write(block)
            wire = self.s_out.read()
            t0 = time.perf_counter()
            if self.ours is not None:
                self.ours.receive_data(wire)
                while record := self.ours.next_record():
                    got += len(record)
            else:
                self.c_in.write(wire)
                try:
                    while piece := self.client.read(1 << 18):
                        got += len(piece)
                except ssl.SSLWantReadError:
                    pass
            spent += time.perf_counter() - t0
        return spent


def row(name: str, make: Callable[[], Pair], handshakes: int,
        megabytes: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(handshakes):
        make()
    hs = handshakes / (time.perf_counter() - t0)
    seconds = make().download(megabytes << 20)
    mbs = megabytes / seconds
    print(f"{name:28} {hs:10.0f} handshakes/s {mbs:10.0f} MB/s download")
    return hs, mbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--megabytes", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        server, client = server_context(Path(d))
        base = row("OpenSSL client (baseline)", lambda: Pair(server, client), args.handshakes,
                   args.megabytes)
        ours = row("tls13.py client", lambda: Pair(server, None), args.handshakes,
                   args.megabytes)
    print(f"ratio (tls13.py / OpenSSL): handshakes {ours[0] / base[0]:.2f}x, "
          f"download {ours[1] / base[1]:.2f}x")


if __name__ == "__main__":
    main()
