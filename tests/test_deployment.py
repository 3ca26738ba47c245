"""A real deployment on loopback: a SuperLink and SuperNodes as separate processes over TLS with
SuperNode authentication. Three registered devices join; an unregistered one is refused; one
registered device is killed mid-round (after it got the model) and the round completes without
it. Then everything is stopped."""
import json
import time

import pytest

from simulations.deploy.run_local import Deployment, export_digits_users

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    dep = Deployment(out, export_digits_users(out, 3), auth=True, intruders=1)
    killed_at = None
    try:
        dep.start()
        run = dep.launch("num-clients=3 min-clients=2 research-accuracy=false summary-level='bitmap' "
                         "stall-clients='supernode-2' round-timeout=400.0")
        got_model = out / "supernode-2" / "device" / "base.pt"
        deadline = time.time() + 240
        while not got_model.exists() and time.time() < deadline and run.poll() is None:
            time.sleep(0.5)
        assert got_model.exists(), "supernode-2 never received the base model"
        dep.kill("supernode-2")  # mid-round: it holds the model and is working on its reply
        killed_at = time.time()
        report = dep.wait(run, timeout=500)
        intruder_exit = dep.procs["intruder-0"].poll()  # before stop(): did it give up by itself?
    finally:
        dep.stop()
    return out, dep, report, intruder_exit


def test_round_completes_over_tls_without_the_device_that_disconnected(deployment):
    out, dep, report, _ = deployment
    assert {c["id"] for c in report["clients"]} == {"supernode-0", "supernode-1"}
    assert all(c["sparsity"] > 0.3 and c["upload_bytes"] > 0 for c in report["clients"])
    assert "accuracy_base" not in report["clients"][0]  # a real device has no labels
    assert len(report["failed"]) == 1 and not report["rejected"]
    assert report["failed"][0]["kind"] in ("node-unavailable", "no-reply")
    assert report["rounds"][0]["incidents"]["failed"] == {report["failed"][0]["kind"]: 1}
    assert f"https://127.0.0.1:{dep.port}" in dep.log("superlink")
    assert "root-certificates" in (out / "flwr-home" / "config.toml").read_text()


def test_unregistered_supernode_is_refused(deployment):
    _, dep, report, intruder_exit = deployment
    assert intruder_exit not in (None, 0)  # it exited on its own: the SuperLink would not let it in
    assert "Failed to activate SuperNode" in dep.log("intruder-0")
    assert "No SuperNode found with the given public key" in dep.log("superlink")
    assert "intruder-0" not in {c["id"] for c in report["clients"]}


def test_devices_keep_their_models_and_processes_are_stopped(deployment):
    out, dep, _, _ = deployment
    for i in range(2):
        assert (out / f"supernode-{i}" / "device" / "personal.pt").stat().st_size > 1000
        assert (out / f"supernode-{i}" / "device" / "base.pt").exists()
    assert not (out / "supernode-2" / "device" / "personal.pt").exists()  # killed before it finished
    assert not list(out.rglob(".*.tmp"))  # no half-written file anywhere
    assert all(p.poll() is not None for p in dep.procs.values())
    assert json.loads((out / "server" / "report.json").read_text())["analysis"]["similarity_method"] == "exact (bitmap)"
