"""Self-signed certificate authority and a server certificate for a SuperLink, for TLS on the
Fleet and Control links, and SuperNode authentication keys (EC P-384, OpenSSH format: the private
key stays on the device, the public key is registered with `flwr supernode register`). For
production use certificates from your own CA.

    python -m simulations.deploy.certs DIR --host server.example.org   # CA + server certificate, once
    python -m simulations.deploy.certs DIR --node-key phone-1           # a device key; the CA is untouched

A CA that exists is never replaced (the running SuperLink and gateway hold it): `--renew` asks for
a new one, and a node key that exists is never overwritten.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
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


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulations.deploy.certs",
        description="Make a test CA and the SuperLink's TLS certificate (ca.crt, server.pem, server.key), "
                    "or with --node-key only SuperNode key pairs, in DIR.")
    p.add_argument("out", metavar="DIR", help="folder for the certificates and keys (created if missing)")
    p.add_argument("--host", action="append",
                   help="a host name or IP address the devices use to reach the server; repeat for several "
                        "(127.0.0.1 and localhost are always covered: the operator's flwr reaches the SuperLink there)")
    p.add_argument("--node-key", action="append", default=[], metavar="NAME",
                   help="make only the SuperNode key pair DIR/NAME and DIR/NAME.pub; the CA is not touched")
    p.add_argument("--renew", action="store_true",
                   help="replace an existing CA and server certificate (restart the SuperLink and gateway after)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    try:
        if a.node_key:
            if a.host or a.renew:
                raise ValueError("--node-key makes device keys only; make the CA and server certificate "
                                 "in a separate call")
            for name in a.node_key:
                if not NODE_NAME.fullmatch(name):
                    raise ValueError(f"node key name '{name}' must be letters, digits, '.', '_' or '-'")
                if (out / name).exists() or (out / f"{name}.pub").exists():
                    raise ValueError(f"{out / name} exists; a node key is never overwritten (pick another name)")
            out.mkdir(parents=True, exist_ok=True)
            for name in a.node_key:
                for k, v in make_node_key(out, name).items():
                    print(f"{name} {k}: {v}")
            return 0
        if (out / "ca.crt").exists() and not a.renew:
            raise ValueError(f"{out / 'ca.crt'} exists; the running SuperLink and gateway use it. "
                             f"--renew replaces it (then restart both), --node-key NAME makes a device key")
        out.mkdir(parents=True, exist_ok=True)
        hosts = tuple(dict.fromkeys([*(a.host or []), "127.0.0.1", "localhost"]))  # flwr on the server: loopback
        for k, v in make_certs(out, hosts).items():
            print(f"{k}: {v}")
        return 0
    except (ValueError, OSError) as exc:
        print(f"certs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
