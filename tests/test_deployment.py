"""A real deployment on loopback: a SuperLink and SuperNodes as separate processes over TLS with
SuperNode authentication, the SuperLink behind the Fleet-only gateway, devices that run only
operator-signed apps. First an attacker who holds the public address and ca.crt (as every device
does) tries to register its own node and to start its own app: both refused at the gateway. Then
an attacker with the Control API itself (a local account on the server) starts an unsigned app:
every device refuses it and nothing of it runs. Then the operator's signed run: three registered
devices join; an unregistered one is refused; one registered device is killed mid-round (after it
got the model) and the round completes without it. Then everything is stopped."""
import json
import sys
import time
from pathlib import Path

import pytest

from simulations.deploy.certs import make_node_key
from simulations.deploy.run_local import Deployment, export_digits_users

pytestmark = [pytest.mark.fault, pytest.mark.security]
ATTACK_APP = Path(__file__).parent / "attack_app"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    dep = Deployment(out, export_digits_users(out, 3), auth=True, intruders=1, rogue_executor=True,
                     faults={"supernode-2": "stall"})
    try:
        dep.start()
        attack = attack_attempts(dep, out)
        run = dep.launch("num-clients=3 min-clients=2 research-accuracy=false summary-level='bitmap' "
                         "round-timeout=400.0")
        got_model = out / "supernode-2" / "device" / "base.pt"
        deadline = time.time() + 240
        while not got_model.exists() and time.time() < deadline and run.poll() is None:
            time.sleep(0.5)
        assert got_model.exists(), "supernode-2 never received the base model"
        dep.kill("supernode-2")  # mid-round: it holds the model and is working on its reply
        report = dep.wait(run, timeout=500)
        intruder_exit = dep.procs["intruder-0"].poll()  # before stop(): did it give up by itself?
        # then a malicious SuperLink (as the devices see it) sends the operator's signed app under
        # a crafted fab_version that points Flower's import path at the attacker's own directory
        dep.replace_gateway([sys.executable, "-m", "tests.evil_link", "--attacker-dir", str(out / "attacker")],
                            name="evil-link")
        dep.wait(dep.launch("num-clients=2 min-clients=1 research-accuracy=false summary-level='bitmap' "
                            "round-timeout=120.0", name="evil-run"), timeout=300, name="evil-run")
    finally:
        dep.stop()
    return out, dep, report, intruder_exit, attack


def attack_attempts(dep, out) -> dict:
    node_key = make_node_key(out / "mallory", "node")  # the attacker's own SuperNode key
    res = {"register": dep.flwr("supernode", "register", str(node_key["public"]), federation="public"),
           "run_public": dep.flwr("run", str(ATTACK_APP), "--stream", federation="public")}
    # the Control API reached from the server itself, with an app nobody signed
    # and a ServerApp that reads the operator's signing key (on this account in this test's layout)
    res["run_local"] = dep.flwr("run", str(ATTACK_APP), "--stream", "-c",
                                f"steal='{dep.operator_key['private']}'", federation="deploy", timeout=240)
    return res


def test_attacker_with_the_public_address_cannot_register_a_node_or_start_a_run(deployment):
    out, dep, _, _, attack = deployment
    assert attack["register"].returncode != 0 and attack["run_public"].returncode != 0
    assert "403" in attack["register"].stdout + attack["register"].stderr
    assert dep.log("gateway").count("gateway: refused POST '/v1/control/") >= 2
    assert "No SuperNode found" not in dep.log("gateway")


def test_an_unsigned_run_started_on_the_server_runs_nowhere(deployment):
    """With the Control API (an account on the server), the attacker starts an unsigned app whose
    ServerApp reads the operator's signing key. Before: it ran with the SuperLink's file access,
    read the key, could sign its own app for every device. Now the ServerApp is refused unsigned,
    so nothing of it runs on the server, and no device is even asked."""
    out, dep, _, _, attack = deployment
    printed = attack["run_local"].stdout + attack["run_local"].stderr
    assert "ATTACK" not in printed, printed[-2000:]  # neither the key read nor any device's reply
    assert "app refused (unsigned)" in printed + dep.log("superlink"), printed[-2000:]
    assert not list(out.rglob("pwned.txt"))  # the attacker's ClientApp never wrote its file
    for i in range(3):
        assert "app refused (unsigned)" not in dep.log(f"supernode-{i}-exec")  # no device got its task at all
    assert "app signed by fp-" in dep.log("supernode-0-exec")  # the operator's app did run


def test_a_malicious_superlinks_crafted_fab_version_imports_nothing(deployment):
    """The signature does not cover the Run's fields, and Flower imports the ClientApp from a path
    built from fab_version: the device checks they are the signed FAB's own before installing."""
    out, dep, _, _, _ = deployment
    assert list((out / "attacker").glob("x.*/evil.py"))  # the attacker prepared its directory
    for i in (0, 1):
        assert "app refused (run-mismatch)" in dep.log(f"supernode-{i}-exec")
    assert not list(out.rglob("evil-imported.txt"))  # its code was never imported


def test_a_rogue_executor_on_a_device_never_gets_a_task(deployment):
    """Any local process could start Flower's plain executor against a SuperNode's runtime API, take
    its tasks and run an unsigned app. The SuperNode and the guarded executor share a secret now."""
    out, dep, report, _, _ = deployment
    rogue = dep.log("rogue-exec")
    assert "Start `flwr-clientapp`" not in rogue and "flwr-clientapp" not in rogue.replace("flower-superexec", "")
    assert "SuperExec authentication failed" in dep.log("supernode-0")  # it tried, and the SuperNode said no
    assert "supernode-0" in {c["id"] for c in report["clients"]}  # its guarded executor took the task


def test_round_completes_over_tls_without_the_device_that_disconnected(deployment):
    out, dep, report, _, _ = deployment
    assert {c["id"] for c in report["clients"]} == {"supernode-0", "supernode-1"}
    assert all(c["sparsity"] > 0.3 and c["upload_bytes"] > 0 for c in report["clients"])
    assert "accuracy_base" not in report["clients"][0]  # a real device has no labels
    assert len(report["failed"]) == 1 and not report["rejected"]
    assert report["failed"][0]["kind"] in ("node-unavailable", "no-reply")
    assert report["rounds"][0]["incidents"]["failed"] == {report["failed"][0]["kind"]: 1}
    assert f"https://127.0.0.1:{dep.port}" in dep.log("superlink")
    assert f"127.0.0.1:{dep.public_port}" in dep.procs["supernode-0"].args  # devices reach only the gateway
    assert "root-certificates" in (out / "flwr-home" / "config.toml").read_text()


def test_unregistered_supernode_is_refused(deployment):
    _, dep, report, intruder_exit, _ = deployment
    assert intruder_exit not in (None, 0)  # it exited on its own: the SuperLink would not let it in
    assert "Failed to activate SuperNode" in dep.log("intruder-0")
    assert "No SuperNode found with the given public key" in dep.log("superlink")
    assert "intruder-0" not in {c["id"] for c in report["clients"]}


def test_devices_keep_their_models_and_processes_are_stopped(deployment):
    out, dep, _, _, _ = deployment
    for i in range(2):
        assert (out / f"supernode-{i}" / "device" / "personal.pt").stat().st_size > 1000
        assert (out / f"supernode-{i}" / "device" / "base.pt").exists()
    assert not (out / "supernode-2" / "device" / "personal.pt").exists()  # killed before it finished
    assert not list(out.rglob(".*.tmp"))  # no half-written file anywhere
    assert all(p.poll() is not None for p in dep.procs.values())
    assert json.loads((out / "server" / "report.json").read_text())["analysis"]["similarity_method"] == "exact (bitmap)"
