"""Self-signed certificate authority and a server certificate for a SuperLink, for TLS on the
Fleet and Control links, and SuperNode authentication keys (EC P-384, OpenSSH format: the private
key stays on the device, the public key is registered with `flwr supernode register`). For
production use certificates from your own CA.

    python -m simulations.deploy.certs DIR [--host 127.0.0.1] [--node-key NAME ...]
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from common.io import atomic_write_bytes


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_certs(out: str | Path, hosts=("127.0.0.1", "localhost"), days: int = 365) -> dict[str, Path]:
    """Writes ca.crt, server.pem, server.key under out; returns their paths."""
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fineprune test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = _key()
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    atomic_write_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["key"], _pem_key(key), private=True)  # 0600 from its first byte
    return paths


def make_node_key(out: str | Path, name: str) -> dict[str, Path]:
    """A SuperNode's authentication key pair: NAME (private, OpenSSH, mode 600) and NAME.pub."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    paths = {"private": out / name, "public": out / f"{name}.pub"}
    atomic_write_bytes(paths["private"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                           serialization.NoEncryption()), private=True)
    atomic_write_bytes(paths["public"], key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--host", action="append", help="host name or IP the SuperLink is reached at")
    p.add_argument("--node-key", action="append", default=[], help="also make a SuperNode key pair of this name")
    a = p.parse_args()
    for k, v in make_certs(a.out, tuple(a.host or ("127.0.0.1", "localhost"))).items():
        print(f"{k}: {v}")
    for name in a.node_key:
        for k, v in make_node_key(a.out, name).items():
            print(f"{name} {k}: {v}")
