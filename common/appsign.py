"""Operator-signed apps: a device runs only a Flower app (FAB) whose every file the operator signed.

Why our own: Flower 1.42 verifies apps on a SuperNode (`--trusted-entities`) only when the
SuperLink fetched them from Flower Hub; a FAB sent with `flwr run .` carries no verification, so
with trusted entities set a device refuses every local app, the operator's included. Here the
operator signs the app's file set with an Ed25519 key (`fineprune sign-app`), the signature travels
inside the FAB as one more JSON file, and the device's ClientApp launcher (client/guard.py) checks
it against the operator's public key before Flower installs or imports anything from the FAB.

What is signed: the sorted lines "path,sha256" of every file in the FAB except Flower's own
manifest (.info/CONTENT) and the signature file. The device recomputes them from the zip entries
it would extract, so a file added, removed or changed anywhere in the FAB fails verification.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.io import atomic_write_bytes

SIGNATURE_FILE = "fineprune-signature.json"  # .json: Flower's FAB builder includes it
FLOWER_MANIFEST = ".info/CONTENT"
MAX_FAB_BYTES = 64 << 20  # Flower's own FAB limit is smaller; never inflate more than this
MAX_FILES = 10_000


class AppSignatureError(ValueError):
    """An app that must not run on this device; `kind` says why (for logs and tests)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"app refused ({kind}): {detail}")
        self.kind = kind


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fp-" + hashlib.sha256(raw).hexdigest()[:16]


def make_signing_key(out: str | Path, name: str = "operator") -> dict[str, Path]:
    """An Ed25519 key pair: NAME (private, OpenSSH, 0600 from its first byte) and NAME.pub."""
    out = Path(out)
    key = ed25519.Ed25519PrivateKey.generate()
    paths = {"private": out / name, "public": out / f"{name}.pub"}
    atomic_write_bytes(paths["private"], key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        private=True)
    atomic_write_bytes(paths["public"], key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return paths


def load_public_keys(path: str | Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """The trusted keys: a file of OpenSSH Ed25519 public keys, one per line (# comments)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trusted keys file {path} does not exist")
    keys = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            k = serialization.load_ssh_public_key(line.encode())
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not an OpenSSH public key ({exc})") from None
        if not isinstance(k, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}:{n}: not an Ed25519 key (app signing uses Ed25519)")
        keys[key_id(k)] = k
    if not keys:
        raise ValueError(f"{path} holds no public key")
    return keys


def _manifest(files: dict[str, bytes]) -> bytes:
    lines = sorted(f"{p},{hashlib.sha256(b).hexdigest()}" for p, b in files.items())
    return ("\n".join(lines) + "\n").encode()


def _fab_files(fab: bytes) -> dict[str, bytes]:
    """Every file Flower would extract from the FAB, read with bounded inflation."""
    if len(fab) > MAX_FAB_BYTES:
        raise AppSignatureError("too-large", f"FAB of {len(fab)} bytes")
    try:
        z = zipfile.ZipFile(io.BytesIO(fab))
        infos = z.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise AppSignatureError("not-a-fab", str(exc)) from None
    if len(infos) > MAX_FILES or sum(i.file_size for i in infos) > MAX_FAB_BYTES:
        raise AppSignatureError("too-large", f"{len(infos)} files, {sum(i.file_size for i in infos)} bytes inflated")
    files = {}
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename
        if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
            raise AppSignatureError("bad-path", name)
        if name in files:
            raise AppSignatureError("duplicate-file", name)  # which copy would be extracted?
        files[name] = z.read(info)
    return files


def sign_app(app_dir: str | Path, private_key: str | Path, out_dir: str | Path) -> dict:
    """Build the app's FAB with Flower's builder (so its include/exclude rules decide the files),
    then write those files plus the signature to `out_dir`, the app to `flwr run`."""
    from flwr.cli.build import build_fab_from_disk

    key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{private_key} is not an Ed25519 private key")
    files = {p: b for p, b in _fab_files(build_fab_from_disk(Path(app_dir).resolve())).items()
             if p not in (FLOWER_MANIFEST, SIGNATURE_FILE)}
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    for p, b in files.items():
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / p, b)
    signature = key.sign(_manifest(files))
    kid = key_id(key.public_key())
    atomic_write_bytes(out / SIGNATURE_FILE, json.dumps(
        {"key_id": kid, "files": len(files),
         "signature": base64.b64encode(signature).decode()}, indent=2).encode())
    return {"app": str(out), "key_id": kid, "files": len(files)}


def verify_fab(fab: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]) -> str:
    """The key id that signed this FAB, or AppSignatureError. Nothing from the FAB is executed."""
    files = _fab_files(fab)
    raw = files.pop(SIGNATURE_FILE, None)
    files.pop(FLOWER_MANIFEST, None)
    if raw is None:
        raise AppSignatureError("unsigned", f"the app carries no {SIGNATURE_FILE}")
    try:
        sig = json.loads(raw[:4096])
        kid, signature = str(sig["key_id"]), base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise AppSignatureError("bad-signature-file", str(exc)[:200]) from None
    if kid not in trusted:
        raise AppSignatureError("untrusted-key", f"signed by {kid[:40]!r}, not a key this device trusts")
    try:
        trusted[kid].verify(signature, _manifest(files))
    except InvalidSignature:
        raise AppSignatureError("bad-signature", "the files are not the ones the operator signed") from None
    return kid
