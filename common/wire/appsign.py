"""Operator-signed apps: a device runs only a Flower app (FAB) whose every file the operator signed.

Why our own: Flower 1.42 verifies apps on a SuperNode (`--trusted-entities`) only when the
SuperLink fetched them from Flower Hub; a FAB sent with `flwr run .` carries no verification, so
with trusted entities set a device refuses every local app, the operator's included. Here the
operator signs the app's file set with an Ed25519 key (`fineprune sign-app`), the signature travels
inside the FAB as one more JSON file, and the device's ClientApp launcher (client/guard.py) checks
it against the operator's public key before Flower installs or imports anything from the FAB.

What is signed: the sorted lines "path,sha256" of every file in the FAB except Flower's own
manifest (.info/CONTENT) and the signature file, and the signing's serial number (its time in
microseconds). The device recomputes the lines from the zip entries it would extract, so a file
added, removed or changed anywhere in the FAB fails verification; it keeps the newest serial it
ran per app, so a replayed older signing of an app the operator re-signed is refused.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import time
import tomllib
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
MAX_SIGNATURE_BYTES = 1024  # sign_app's signature file is about 200 bytes
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # a publisher, app name or version: no path in it


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


def _fab_files(fab: bytes, directories: bool = True) -> dict[str, bytes]:
    """Every file Flower would extract from the FAB, read with bounded inflation; `directories`
    False: a directory entry (extracted, never signed) refuses the FAB."""
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
            if not directories:
                raise AppSignatureError("unsigned-entry", f"directory entry {info.filename[:80]!r}: nothing signs it")
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

    try:
        key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
    except (TypeError, ValueError) as exc:  # a passphrase-protected key is a TypeError
        raise ValueError(f"{private_key} is not an unencrypted OpenSSH private key "
                         f"({str(exc).splitlines()[0][:120]}); fineprune keygen makes one") from None
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
    serial = time.time_ns() // 1000  # microseconds: later signings of the operator's apps sign a larger one
    signature = key.sign(_signed_bytes(files, serial))
    kid = key_id(key.public_key())
    atomic_write_bytes(out / SIGNATURE_FILE, json.dumps(
        {"key_id": kid, "files": len(files), "serial": serial,
         "signature": base64.b64encode(signature).decode()}, indent=2).encode())
    return {"app": str(out), "key_id": kid, "files": len(files), "serial": serial}


def _signed_bytes(files: dict[str, bytes], serial: int) -> bytes:
    """What the operator's key signs: the files and the signing's serial number."""
    return _manifest(files) + f"serial:{serial}\n".encode()


def verify_fab(fab: bytes, trusted: dict[str, ed25519.Ed25519PublicKey], seen: "SerialStore | None" = None) -> str:
    """The key id that signed this FAB, or AppSignatureError. Nothing from the FAB is executed.
    Every byte that would be installed is signed: no directory entries of its own, Flower's
    manifest lists exactly the signed files, and the signature file is the three fields sign_app
    writes, nothing more."""
    files = _fab_files(fab, directories=False)
    raw = files.pop(SIGNATURE_FILE, None)
    manifest = files.pop(FLOWER_MANIFEST, None)
    if raw is None:
        raise AppSignatureError("unsigned", f"the app carries no {SIGNATURE_FILE}")
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise AppSignatureError("bad-signature-file", f"{len(raw)} bytes, more than a signature takes")
    try:
        sig = json.loads(raw)
        if not isinstance(sig, dict) or set(sig) != {"key_id", "files", "serial", "signature"}:
            raise ValueError("not exactly key_id, files, serial and signature")
        kid, signature = str(sig["key_id"]), base64.b64decode(sig["signature"], validate=True)
        serial = sig["serial"]
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 1 << 63:
            raise ValueError("serial is not a signing number")
    except (ValueError, KeyError, TypeError) as exc:
        raise AppSignatureError("bad-signature-file", str(exc)[:200]) from None
    if manifest is not None and _listed(manifest) - set(files) - {SIGNATURE_FILE}:
        raise AppSignatureError("unsigned-entry", "Flower's manifest lists files the operator did not sign")
    if kid not in trusted:
        raise AppSignatureError("untrusted-key", f"signed by {kid[:40]!r}, not a key this device trusts")
    try:
        trusted[kid].verify(signature, _signed_bytes(files, serial))
    except InvalidSignature:
        raise AppSignatureError("bad-signature", "the files are not the ones the operator signed") from None
    if seen is not None:
        seen.check_and_record(kid, fab_identity(fab)[0], serial)
    return kid


class SerialStore:
    """The newest signing this device has run, per operator key and app: an older signed FAB of
    the same app (a replay of a version the operator replaced) is refused. Kept in one small JSON
    file on the device, written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def check_and_record(self, kid: str, fab_id: str, serial: int) -> None:
        data = self._load()
        key = f"{kid} {fab_id}"
        newest = data.get(key, -1)
        if isinstance(newest, int) and serial < newest:
            raise AppSignatureError("replayed", f"{fab_id} signed at serial {serial}, older than the {newest} this "
                                                "device already ran: the operator replaced it")
        if serial != newest:
            data[key] = serial
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(data, indent=1).encode(), private=True)


def _listed(manifest: bytes) -> set:
    """The paths Flower's .info/CONTENT lists (lines "path,hash,size")."""
    return {line.split(",", 1)[0] for line in manifest.decode("utf-8", "replace").splitlines() if line.strip()}


def fab_identity(fab: bytes) -> tuple[str, str]:
    """(fab_id, version) as the FAB's own pyproject.toml names them (publisher/name): what a device
    may install and import the app under. AppSignatureError if they are not plain names."""
    raw = _fab_files(fab).get("pyproject.toml")
    try:
        cfg = tomllib.loads(raw.decode()) if raw is not None else None
        publisher, name = cfg["tool"]["flwr"]["app"]["publisher"], cfg["project"]["name"]
        version = cfg["project"]["version"]
    except (TypeError, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise AppSignatureError("bad-metadata", "the app's pyproject.toml names no publisher, name and version") from None
    for v in (publisher, name, version):
        if not isinstance(v, str) or not NAME.fullmatch(v):
            raise AppSignatureError("bad-metadata", f"{str(v)[:60]!r} is not a plain name")
    return f"{publisher}/{name}", version


def check_run_binding(fab: bytes, fab_hash: str, fab_id: str, fab_version: str) -> None:
    """The run's fields that Flower builds the install and import path from must be the verified
    FAB's own: its hash, and the id and version its signed pyproject.toml gives. A SuperLink that
    sends a genuinely signed FAB with fab_version '<v>.<hash>/../../<dir>' would otherwise make the
    device import code from a directory the attacker prepared."""
    if fab_hash != hashlib.sha256(fab).hexdigest():
        raise AppSignatureError("run-mismatch", "the run's FAB hash is not the hash of the FAB received")
    want = fab_identity(fab)
    if (fab_id, fab_version) != want:
        raise AppSignatureError("run-mismatch", f"the run names app {str(fab_id)[:80]!r} version "
                                                f"{str(fab_version)[:80]!r}, the signed app is {want[0]!r} {want[1]!r}")


def verified_install(install, trusted: dict, seen: "SerialStore", who: str, binding=None):
    """Flower's install_from_fab, preceded by the checks: the operator's signature, `binding()`
    (raises AppSignatureError where the run's fields are not the FAB's own; None: Flower builds
    the path from the FAB's own metadata) and no replay of an older signing (`seen`). A refused
    app is never unpacked; one line on stderr says why, under `who`."""
    import sys

    def install_verified(fab_file, *args, **kwargs):
        data = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            # one verification; a genuine signing's serial is recorded even where the run's fields
            # then prove crafted (it is the operator's, and an older one stays refused either way)
            kid = verify_fab(data, trusted, seen)
            if binding is not None:
                binding(data)
        except AppSignatureError as exc:
            print(f"{who}: {exc}; nothing from it was installed or run", file=sys.stderr, flush=True)
            raise
        print(f"{who}: app signed by {kid}, running it", file=sys.stderr, flush=True)
        return install(fab_file, *args, **kwargs)
    return install_verified


def hand_down_trust(parser, keys_path: str, state_path: str, keys_env: str, state_env: str) -> None:
    """A guarded executor's start: its trusted keys are checked now, not at the first run (one
    line and exit 2 if unusable), then the keys' file and the serial store's path go to the
    processes it launches through the environment, where trusted_keys_from_env reads them."""
    import os

    try:
        load_public_keys(keys_path)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    os.environ[keys_env] = os.path.abspath(keys_path)
    os.environ[state_env] = os.path.abspath(os.path.expanduser(state_path))


def trusted_keys_from_env(env: str, who: str) -> dict:
    """The operator's public keys from the file an environment variable names (set by the guarded
    executor that launched this process), or SystemExit: no keys, no app."""
    import os

    path = os.environ.get(env)
    if not path:
        raise SystemExit(f"{who}: error: {env} is not set; refusing to run any app")
    try:
        return load_public_keys(path)
    except ValueError as exc:
        raise SystemExit(f"{who}: error: {exc}") from None
