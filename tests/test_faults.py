"""Faults: a device killed while it writes its personalized model, interrupted writes, a server
restarted over its own reports, nodes that fail or vanish, and bad replies at the server: each one
handled, counted, and nothing lost."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.device import Device
from common.io import atomic_write_bytes
from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import load_checkpoint
from common.model.mask import Mask
from common.wire.federation import DEFAULTS, model_bytes
from common.wire.summary import build_summary, encode, usage_histograms
from server.server_app import earlier_reports
from server.strategy import FinePruneStrategy
from tests.conftest import FakeGrid

ROOT = Path(__file__).resolve().parents[1]
META = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits",
        "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}


@pytest.mark.fault
def test_device_killed_while_saving_keeps_its_previous_model_and_recovers(tmp_path, _digits_base, digits):
    dev = Device(tmp_path / "device")
    fp = dev.store_base(_digits_base, META)
    x = digits.x[digits.y == 3][:80]
    torch.save(x, tmp_path / "x.pt")
    cfg_a, cfg_b = dict(DEFAULTS), dict(DEFAULTS, tolerance=0.05)
    dev.personalize(_digits_base, META, fp, x, cfg_a)
    before = dev.personal_path.read_bytes()
    # a second personalization is killed (SIGKILL: no cleanup runs) in the middle of saving
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        import common.io
        from client.device import Device
        from common.wire.federation import DEFAULTS
        def stuck(src, dst):
            print("WRITING", flush=True)
            time.sleep(120)
        common.io.os.replace = stuck
        dev = Device({str(tmp_path / "device")!r})
        base, meta = dev.load_base({fp!r})
        dev.personalize(base, meta, {fp!r}, torch.load({str(tmp_path / "x.pt")!r}), dict(DEFAULTS, tolerance=0.05))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert dev.personal_path.read_bytes() == before  # the old model, whole
    load_checkpoint(dev.personal_path)
    assert list(dev.root.glob(".personal.pt.*.tmp"))  # the killed writer's leftover, never read
    # restarted, the device personalizes again, cleans up, and a later round resumes from it
    mask, info = dev.personalize(_digits_base, META, fp, x, cfg_b)
    assert not info.resumed and not list(dev.root.glob(".*.tmp"))
    mask2, info2 = dev.personalize(_digits_base, META, fp, x, cfg_b)
    assert info2.resumed and mask2 == mask


@pytest.mark.fault
def test_interrupted_write_leaves_the_old_file_and_no_part(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr("common.io.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.fault
def test_restarted_server_keeps_earlier_reports_and_sets_aside_an_unreadable_one(tmp_path):
    assert earlier_reports(tmp_path) == []
    (tmp_path / "report.json").write_text(json.dumps({"rounds": [{"round": 1}], "previous_runs": [{"rounds": []}],
                                                      "files": {}}))
    kept = earlier_reports(tmp_path)
    assert kept == [{"rounds": []}, {"rounds": [{"round": 1}]}]
    (tmp_path / "report.json").write_text('{"rounds": [')  # a report cut off by a crash elsewhere
    assert earlier_reports(tmp_path) == []
    aside = list(tmp_path.glob("report.unreadable-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == '{"rounds": ['


# ---------------------------------------------------------------- the strategy, without Ray
def _pushed(msgs):
    """What Flower's grid does when it sends: give each message its id."""
    for m in msgs:
        m.metadata.__dict__["_message_id"] = m.object_id
    return msgs


def _good_reply(strat, instr, cid, **metric_changes):
    base = strat.base
    hist = usage_histograms({n: m.weight.abs() for n, m in prunable_layers(base).items()})
    payload = encode(build_summary(Mask.dense(base), hist, "bitmap", strat.fp, model_bytes(base)))
    metrics = {"sparsity": 0.0, "prune_seconds": 0.1, "upload_bytes": len(payload), **metric_changes}
    content = RecordDict({"summary": ConfigRecord({"data": payload, "level": "bitmap"}),
                          "info": ConfigRecord({"client": cid, "stop_reason": "test"}),
                          "metrics": MetricRecord({k: v for k, v in metrics.items() if v is not None})})
    return Message(content=content, reply_to=instr)


def _strategy(tmp_path, n, **cfg):
    torch.manual_seed(0)
    return FinePruneStrategy(build_model("smallcnn"), META,
                             dict(DEFAULTS, **{"num-clients": n, "min-clients": 1, "summary-level": "bitmap",
                                               "num-rounds": 2, "out-dir": str(tmp_path), **cfg}))


@pytest.mark.fault
def test_node_lost_mid_round_is_counted_once_and_gets_the_base_again(identity, tmp_path):
    strat = _strategy(tmp_path, 3)
    msgs = _pushed(list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(3))))
    lost = Message(Error(code=5, reason="Error: Node Unavailable — The destination node failed to report a "
                                        "heartbeat within 2 × its expected interval."), reply_to=msgs[1])
    lost.metadata.__dict__["_src_node_id"] = 0  # made by the SuperLink, not by the node
    crashed = Message(Error(code=1, reason="ClientApp raised: no usable base model"), reply_to=msgs[2])
    strat.aggregate_train(1, [_good_reply(strat, msgs[0], "u0"), lost, crashed])
    rnd = strat.rounds[0]
    assert [c["id"] for c in rnd["clients"]] == ["u0"]
    assert sorted((f["node"], f["kind"]) for f in rnd["failed"]) == [(2, "node-unavailable"), (3, "client-error")]
    assert rnd["incidents"]["failed"] == {"node-unavailable": 1, "client-error": 1}
    # next round: the base goes again to the nodes that failed (their copy may be what broke)
    msgs2 = list(strat.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid(3)))
    assert {m.metadata.dst_node_id: "base" in m.content.array_records for m in msgs2} == {1: False, 2: True, 3: True}


BAD_REPLIES = {  # name: (metric changes or a builder, expected reason, kind)
    "NaN sparsity": ({"sparsity": float("nan")}, "NaN or infinite", "metrics"),
    "infinite prune time": ({"prune_seconds": float("inf")}, "NaN or infinite", "metrics"),
    "negative upload": ({"upload_bytes": -5}, "out of range", "metrics"),
    "missing sparsity": ({"sparsity": None}, "missing", "metrics"),
    "accuracy above 1": ({"accuracy_base": 1.5}, "out of range", "metrics"),
    "NaN accuracy": ({"accuracy_personalized": float("nan")}, "NaN or infinite", "metrics"),
    "oversized payload": ("oversized", "exceeds the limit", "size"),
    "not a summary": ("garbage", "bad magic", "format"),
    "second reply from one node": ("duplicate", "duplicate reply from node", "duplicate"),
    "valid summary of another level": ("other-level", "is not the run's 'bitmap'", "level"),
}


@pytest.mark.badinput
@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_bad_reply_is_rejected_counted_and_the_round_goes_on(identity, tmp_path, case):
    change, reason, kind = BAD_REPLIES[case]
    strat = _strategy(tmp_path, 2)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    good = _good_reply(strat, msgs[0], "u0")
    if change == "oversized":
        bad = _good_reply(strat, msgs[1], "u1")
        bad.content["summary"]["data"] = bad.content["summary"]["data"] + b"\x00" * strat.max_summary_bytes
    elif change == "garbage":
        bad = _good_reply(strat, msgs[1], "u1")
        bad.content["summary"]["data"] = b"\x00" * 100
    elif change == "duplicate":
        bad = _good_reply(strat, msgs[0], "u1")
    elif change == "other-level":  # before: accepted, and the round lost similarity, clusters and consensus
        bad = _good_reply(strat, msgs[1], "u1")
        hist = usage_histograms({n: m.weight.abs() for n, m in prunable_layers(strat.base).items()})
        bad.content["summary"]["data"] = encode(build_summary(Mask.dense(strat.base), hist, "stats", strat.fp,
                                                              model_bytes(strat.base)))
    else:
        bad = _good_reply(strat, msgs[1], "u1", **change)
    strat.aggregate_train(1, [good, bad])
    rnd = strat.rounds[0]
    assert [c["id"] for c in rnd["clients"]] == ["u0"]  # the good client still counts
    assert len(rnd["rejected"]) == 1 and reason in rnd["rejected"][0]["reason"], rnd["rejected"]
    assert rnd["incidents"]["rejected"] == {kind: 1}


@pytest.mark.fault
@pytest.mark.security
def test_concurrent_writers_of_one_path_never_delete_each_others_temp_files(tmp_path):
    """Two processes and two threads write the same file 50 times each: no write is lost to
    another writer removing its temp file, and no temp file is left."""
    import multiprocessing as mp
    import threading

    from common.io import atomic_write_bytes

    target = tmp_path / "shared.bin"
    errors = []

    def threads():
        def run(i):
            try:
                for k in range(50):
                    atomic_write_bytes(target, f"t{i}-{k}".encode())
            except Exception as exc:  # a lost write raises (its temp file vanished)
                errors.append(exc)
        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]

    procs = [mp.get_context("spawn").Process(target=_write_many, args=(str(target), i)) for i in range(2)]
    [p.start() for p in procs]
    threads()
    [p.join(60) for p in procs]
    assert not errors and all(p.exitcode == 0 for p in procs)
    assert not list(tmp_path.glob(".*.tmp"))


def _write_many(path, i):
    from common.io import atomic_write_bytes

    for k in range(50):
        atomic_write_bytes(path, f"p{i}-{k}".encode())


@pytest.mark.security
def test_files_follow_the_umask_and_private_ones_are_0600_from_the_start(tmp_path):
    import os
    import stat

    from common.io import atomic_write_bytes

    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "b", b"x")
        atomic_write_bytes(tmp_path / "key", b"secret", private=True)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE((tmp_path / p).stat().st_mode)  # noqa: E731
    assert mode("a") == 0o600 and mode("b") == 0o644 and mode("key") == 0o600


@pytest.mark.fault
def test_work_that_outlives_the_round_is_abandoned_and_the_client_returns():
    """client_app.within: a hung step (a 30 s sleep) does not hold the ClientApp past its budget;
    work that checks `cancel` stops; results and errors of work in time pass through."""
    import threading
    import time

    from client.client_app import RoundTimeout, within

    t0 = time.time()
    with pytest.raises(RoundTimeout):
        within(0.3, lambda cancel: time.sleep(30))
    assert time.time() - t0 < 2

    stopped = threading.Event()

    def cooperative(cancel):
        while not cancel.wait(0.01):
            pass
        stopped.set()
    with pytest.raises(RoundTimeout):
        within(0.2, cooperative)
    assert stopped.wait(2)  # the engine's steps see the cancel and stop burning the CPU
    assert within(5, lambda cancel: 42) == 42
    with pytest.raises(ZeroDivisionError):
        within(5, lambda cancel: 1 / 0)


@pytest.mark.security
def test_a_node_claiming_an_honest_peers_client_id_pushes_no_one_out(identity, tmp_path):
    """Before, the first reply under an id won and the honest device was rejected as a duplicate."""
    strat = _strategy(tmp_path, 3)
    msgs = _pushed(list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(3))))
    impostor, honest, other = (_good_reply(strat, msgs[1], "alice"), _good_reply(strat, msgs[0], "alice"),
                               _good_reply(strat, msgs[2], "bob"))
    strat.aggregate_train(1, [impostor, honest, other])
    rnd = strat.rounds[0]
    assert rnd["rejected"] == []
    ids = {c["id"]: c["node"] for c in rnd["clients"]}
    assert ids == {"alice@1": 1, "alice@2": 2, "bob": 3}  # each claim shown with the node that made it
    msgs2 = _pushed(list(strat.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid(3))))
    strat.aggregate_train(2, [_good_reply(strat, msgs2[0], "alice")])  # the impostor is gone next round
    assert [c["id"] for c in strat.rounds[1]["clients"]] == ["alice@1"]  # the id stays bound to its node


@pytest.mark.security
def test_markup_in_a_devices_error_reason_is_shown_as_text_in_the_report(identity, tmp_path):
    """An error reply's reason landed verbatim in report.md: a table cell broken by '|', an HTML
    image with onerror, a javascript: link, $math$ and a terminal escape."""
    from server.report import to_markdown

    strat = _strategy(tmp_path, 2)
    msgs = _pushed(list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2))))
    evil = ("boom | <img src=x onerror=alert(1)> [click](javascript:alert(1)) $\\frac{a}{b}$ "
            "**bold** `code` \x1b[31mred")
    failed = Message(Error(code=1, reason=f"ClientApp raised: {evil}"), reply_to=msgs[1])
    strat.aggregate_train(1, [_good_reply(strat, msgs[0], "u_0"), failed])
    md = to_markdown({"config": strat.cfg, "rounds": strat.rounds})
    line = next(ln for ln in md.splitlines() if ln.startswith("  - node 2"))
    for raw in ("<img", "](javascript", "$\\frac", "**bold**", "`code`", "\x1b", " | "):
        assert raw not in line, (raw, line)
    assert "onerror=alert" in line and "javascript" in line  # still readable as text
    assert "| u\\_0 |" in md  # device ids in the table too


@pytest.mark.fault
def test_only_the_devices_side_can_inject_a_fault(monkeypatch):
    """A fault comes from the device's own node config or the simulation's environment; the run
    config the server sends has no such key (a server that could make devices hang could stall
    the federation)."""
    from client.faults import FAULT_ENV, fault_spec, injected_fault
    from common.wire.federation import merged_config

    with pytest.raises(ValueError, match="unknown run-config key 'stall-clients'"):
        merged_config({"stall-clients": "1"})
    assert injected_fault({"device-name": "phone-1", "fault": "stall"}, None) == "stall"
    assert injected_fault({"fault": "melt"}, None) is None
    monkeypatch.setenv(FAULT_ENV, fault_spec({"crash": [2], "stall": [1, 3]}))
    assert [injected_fault({}, p) for p in range(4)] == [None, "stall", "crash", "stall"]
    monkeypatch.delenv(FAULT_ENV)
    assert injected_fault({}, 2) is None
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        fault_spec({"melt": [1]})
