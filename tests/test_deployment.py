"""A real deployment on loopback: SuperLink + 2 SuperNodes as separate processes over TLS, each
with its own data directory and device storage, one round end to end, then everything stopped."""
import json

import pytest

from simulations.deploy.run_local import Deployment, export_digits_users


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    dep = Deployment(out, export_digits_users(out, 2))
    try:
        dep.start()
        report = dep.run("num-clients=2 min-clients=2 research-accuracy=false summary-level='bitmap'", timeout=400)
    finally:
        dep.stop()
    return out, dep, report


def test_round_runs_end_to_end_over_tls(deployment):
    out, dep, report = deployment
    assert len(report["clients"]) == 2 and not report["failed"] and not report["rejected"]
    assert {c["id"] for c in report["clients"]} == {"node-0", "node-1"}
    assert all(c["sparsity"] > 0.3 and c["upload_bytes"] > 0 for c in report["clients"])
    assert "accuracy_base" not in report["clients"][0]  # a real device has no labels
    assert f"https://127.0.0.1:{dep.port}" in (out / "superlink.log").read_text()
    assert "root-certificates" in (out / "flwr-home" / "config.toml").read_text()


def test_devices_keep_their_models_and_processes_are_stopped(deployment):
    out, dep, _ = deployment
    for i in range(2):
        assert (out / f"node-{i}" / "device" / "personal.pt").stat().st_size > 1000
        assert (out / f"node-{i}" / "device" / "base.pt").exists()
    assert all(p.poll() is not None for p in dep.procs)
    assert json.loads((out / "server" / "report.json").read_text())["analysis"]["similarity_method"] == "exact (bitmap)"
