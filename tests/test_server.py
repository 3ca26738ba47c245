"""Server side without Ray: analysis on known masks, and the strategy's handling of good,
malformed and failed replies in one round."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import fingerprint
from common.model.mask import Mask
from common.wire.federation import DEFAULTS, model_bytes
from common.wire.summary import build_summary, encode, usage_histograms
from server.analysis import clusters, consensus
from server.strategy import FinePruneStrategy
from tests.conftest import FakeGrid


def _mask(bits):
    return Mask({"l": torch.tensor([bits], dtype=torch.bool)})


def test_consensus_counts_votes():
    a, b, c = _mask([0, 0, 1, 1]), _mask([0, 1, 1, 1]), _mask([0, 0, 0, 1])  # False = pruned
    assert consensus({"a": a, "b": b, "c": c}, 1.0).layers["l"].tolist() == [[False, True, True, True]]
    assert consensus({"a": a, "b": b, "c": c}, 0.5).layers["l"].tolist() == [[False, False, True, True]]


def test_clusters_separate_two_groups():
    sim = np.array([[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, .8], [.1, .1, .8, 1]])
    assert clusters(list("abcd"), sim, 0.5) == [["a", "b"], ["c", "d"]]


META = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits",
        "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}


def _reply(instr, payload, cid, sparsity, extra=None):
    content = RecordDict({"summary": ConfigRecord({"data": payload, "level": "bitmap"}),
                          "info": ConfigRecord({"client": cid, "stop_reason": "test"}),
                          "metrics": MetricRecord({"sparsity": sparsity, "prune_seconds": 0.1,
                                                   "upload_bytes": len(payload), "accuracy_base": 0.9,
                                                   "accuracy_personalized": 0.95})})
    for k, v in (extra or {}).items():
        content[k] = v
    return Message(content=content, reply_to=instr)


def test_round_survives_failed_and_malformed_clients_and_slims_the_base(identity, tmp_path):
    torch.manual_seed(0)
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 6, "min-clients": 2, "summary-level": "bitmap", "slim-base": True,
                            "slim-min-clients": 3,
                            "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(6)))
    assert len(msgs) == 6 and all("base" in m.content.array_records for m in msgs)
    fp, size = fingerprint(base), model_bytes(base)
    hist = usage_histograms({n: m.weight.abs() for n, m in prunable_layers(base).items()})
    g = torch.Generator().manual_seed(1)
    common_prune = {n: torch.rand(m.weight.shape, generator=g) < 0.5 for n, m in prunable_layers(base).items()}
    replies = []
    for i, instr in enumerate(msgs[:3]):  # three good clients that share half their pruning
        mask = Mask({n: ~(cp | (torch.rand(cp.shape, generator=g) < 0.3)) for n, cp in common_prune.items()})
        replies.append(_reply(instr, encode(build_summary(mask, hist, "bitmap", fp, size)), f"u{i}", mask.sparsity()))
    replies.append(Message(Error(code=1, reason="ClientApp crashed: out of memory"), reply_to=msgs[3]))
    bad = encode(build_summary(Mask.dense(base), hist, "bitmap", "f" * 32, size))
    replies.append(_reply(msgs[4], bad, "u4", 0.0))  # wrong base fingerprint
    # msgs[5] never answers: dropped out
    arrays, metrics = strat.aggregate_train(1, replies)
    rnd = strat.rounds[0]
    assert [c["id"] for c in rnd["clients"]] == ["u0", "u1", "u2"]
    assert len(rnd["failed"]) == 2 and any("out of memory" in f["reason"] for f in rnd["failed"])
    assert any("dropped out" in f["reason"] for f in rnd["failed"])
    assert len(rnd["rejected"]) == 1 and "base model" in rnd["rejected"][0]["reason"]
    a = rnd["analysis"]
    assert a["similarity_method"] == "exact (bitmap)" and 0.2 < a["mean_pairwise_similarity"] < 0.9
    assert a["consensus_sparsity"] >= 0.5
    # slim base: what all three pruned, physically removed where whole units went
    slim = rnd["slim_base"]
    assert arrays is not None and slim["consensus_sparsity"] >= 0.5
    assert strat.fp != fp  # next round distributes the new base to everyone
    msgs2 = list(strat.configure_train(2, arrays, ConfigRecord(), FakeGrid(6)))
    assert all("base" in m.content.array_records for m in msgs2)


def test_reply_with_weights_or_bad_metrics_is_rejected(identity, tmp_path):
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 2, "summary-level": "bitmap", "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    hist = usage_histograms({n: m.weight.abs() for n, m in prunable_layers(base).items()})
    payload = encode(build_summary(Mask.dense(base), hist, "bitmap", fingerprint(base), model_bytes(base)))
    leak = _reply(msgs[0], payload, "u0", 0.0, {"weights": ArrayRecord.from_torch_state_dict(base.state_dict())})
    lie = _reply(msgs[1], payload, "u1", 0.5)  # reported sparsity disagrees with the mask
    strat.aggregate_train(1, [leak, lie])
    reasons = [r["reason"] for r in strat.rounds[0]["rejected"]]
    assert any("more than a summary" in r for r in reasons) and any("disagrees" in r for r in reasons)
    # the second round does not resend the base to nodes that already hold it... none accepted here
    assert strat.nodes_with_base == {}


def test_base_is_sent_once_per_node(identity, tmp_path):
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 2, "summary-level": "stats", "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    hist = usage_histograms({n: m.weight.abs() for n, m in prunable_layers(base).items()})
    payload = encode(build_summary(Mask.dense(base), hist, "stats", fingerprint(base), model_bytes(base)))
    strat.aggregate_train(1, [_reply(m, payload, f"u{i}", 0.0) for i, m in enumerate(msgs)])
    msgs2 = list(strat.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    assert not any("base" in m.content.array_records for m in msgs2)
    assert strat.rounds[0]["analysis"]["similarity_method"].startswith("unavailable")


def test_pyproject_run_config_matches_defaults():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert cfg["tool"]["flwr"]["app"]["config"] == DEFAULTS


@pytest.mark.security
@pytest.mark.parametrize("honest", [2, 6])
def test_an_all_pruned_mask_cannot_turn_the_slim_base_into_a_peers_mask(identity, tmp_path, honest):
    """One attacker uploads an all-pruned mask so that "pruned by all" equals the others'
    intersection: with 2 honest peers that would be sent to every node, so no slim base is
    derived; with 6 the attacker's mask is an outlier and does not vote."""
    torch.manual_seed(0)
    base = build_model("smallcnn")
    n = honest + 1
    cfg = dict(DEFAULTS, **{"num-clients": n, "min-clients": 1, "summary-level": "bitmap", "slim-base": True,
                            "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(n)))
    fp, size = fingerprint(base), model_bytes(base)
    hist = usage_histograms({k: m.weight.abs() for k, m in prunable_layers(base).items()})
    g = torch.Generator().manual_seed(1)
    replies = []
    for i in range(honest):
        mask = Mask({k: torch.rand(m.weight.shape, generator=g) > 0.6 for k, m in prunable_layers(base).items()})
        replies.append(_reply(msgs[i], encode(build_summary(mask, hist, "bitmap", fp, size)), f"u{i}", mask.sparsity()))
    evil = Mask({k: torch.zeros(m.weight.shape, dtype=torch.bool) for k, m in prunable_layers(base).items()})
    replies.append(_reply(msgs[honest], encode(build_summary(evil, hist, "bitmap", fp, size)), "evil", 1.0))
    arrays, _ = strat.aggregate_train(1, replies)
    slim = strat.rounds[0]["slim_base"]
    if honest < cfg["slim-min-clients"]:
        assert arrays is None and "skipped" in slim and strat.fp == fingerprint(base)
    else:
        assert arrays is not None and slim["consensus_sparsity"] < 0.2  # random masks agree on little
    assert slim["outliers"] == ["evil"]


@pytest.mark.security
def test_a_private_run_derives_no_slim_base(identity, tmp_path):
    """4 sybils pruning one chosen set made the slim base reproduce an honest device's mask there
    (86% of all connections, 100% correct). In a private run there is no slim base at all."""
    from common.wire.federation import merged_config

    with pytest.raises(ValueError, match="slim-base is off in private runs"):
        merged_config({"slim-base": True, "privacy-epsilon": 1.0, "summary-level": "bitmap"})
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 6, "min-clients": 1, "summary-level": "bitmap", "slim-base": True,
                            "privacy-epsilon": 1.0, "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)  # built around the check: still no slim base
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(6)))
    fp, size = fingerprint(base), model_bytes(base)
    replies = [_reply(m, encode(build_summary(Mask.dense(base), None, "bitmap", fp, size, epsilon=1.0)), f"u{i}", 0.0)
               for i, m in enumerate(msgs)]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is None and strat.rounds[0]["slim_base"] == {"skipped": "private run: no slim base"}


def _row(cid, base, personal, sparsity):
    return {"id": cid, "node": 1, "sparsity": sparsity, "upload_bytes": 10, "upload_fraction": 0.001,
            "prune_seconds": 0.1, "accuracy_base": base, "accuracy_personalized": personal,
            "stop_reason": "agreement 0.97 < 0.98 at sparsity 0.65; kept the step before, sparsity 0.60"}


def _round(clients, failed=()):
    return {"round": 1, "base_fingerprint": "f" * 32, "base_bytes": 1000, "clients": list(clients),
            "rejected": [], "failed": list(failed), "incidents": {"rejected": {}, "failed": {}},
            "analysis": {"similarity_method": "-", "mean_pairwise_similarity": None, "clusters": [],
                         "consensus_quorum": 0.5, "consensus_sparsity": None, "consensus_all_upper_bound": None,
                         "layer_names": ["l1", "l2"],
                         "layer_sparsity": {c["id"]: [0.4, 0.6] for c in clients}}}


def test_a_run_ends_with_a_summary_a_person_reads_and_the_whole_stop_reason(tmp_path, capsys):
    from server.report import md_text, to_markdown
    from server.server_app import conclude

    rnd = _round([_row("a", 0.9, 0.95, 0.5), _row("b", 1.0, 0.96, 0.7)],
                 failed=[{"node": 3, "reason": "no reply", "kind": "no-reply"}])
    report = {"config": dict(DEFAULTS, **{"num-clients": 3}), "rounds": [rnd], "wall_seconds": 12.0,
              "clients": rnd["clients"], "failed": rnd["failed"], "rejected": []}
    conclude(tmp_path, report)
    said = capsys.readouterr().out
    assert "clients: 2 replied, 1 failed, 0 rejected (of 3 asked" in said
    assert "base 0.950 -> personalized 0.955; worst user -0.040, 1 worse / 0 same / 1 better" in said
    assert "sparsity: mean 0.60 (min 0.50, max 0.70)" in said and str(tmp_path / "report.json") in said
    assert json.loads((tmp_path / "report.json").read_text())["finished"]
    whole = md_text(rnd["clients"][0]["stop_reason"], 10_000)
    assert f"| {whole} |" in to_markdown(report)  # the stop column is not cut mid-word


def test_a_run_in_which_no_device_did_the_work_says_so_and_fails(tmp_path, capsys):
    from server.server_app import conclude

    rnd = _round([], failed=[{"node": 1, "reason": "app refused (unsigned)", "kind": "client-error"}])
    report = {"config": dict(DEFAULTS), "rounds": [rnd], "clients": [], "failed": rnd["failed"], "rejected": []}
    with pytest.raises(RuntimeError, match="no device did the work"):
        conclude(tmp_path, report)
    assert "no device did the work" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["error"] == "no device did the work" and on_disk["finished"]


def test_simulate_exits_1_when_no_device_did_the_work(monkeypatch, capsys, tmp_path):
    import simulations.simulate as sim
    from common.cli import main

    monkeypatch.setattr(sim, "simulate", lambda overrides, **kw: {
        "clients": [], "failed": [{"node": 1}], "rejected": [], "rounds": [], "config": {"num-clients": 2},
        "error": "no device did the work",  # as server_app.conclude writes it
        "files": {"json": str(tmp_path / "report.json")}, "analysis": None, "wall_seconds": 1.0})
    assert main(["simulate", "--clients", "2", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "0 replied, 1 failed" in captured.out and "fineprune: error: no device did the work" in captured.err
