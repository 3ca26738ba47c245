"""No reply can crash a round: seeded, bounded fuzzing of device replies through the whole server
path (decode, reply checks, analysis, report files); every reply ends accepted or as a counted
rejection."""
import random
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import fingerprint
from common.model.mask import Mask
from common.wire.federation import DEFAULTS, model_bytes
from common.wire.summary import build_summary, encode, usage_histograms
from server.report import write_report
from server.strategy import FinePruneStrategy
from tests.conftest import FakeGrid

META = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits",
        "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}
WEIRD = [float("nan"), float("inf"), -1.0, 1e30, True, "x", [1, 2], b"\x00", None, 2**63, -0.0]
NAMES = ["a$\\frac$b", "x" * 20_000, "a|b\n## c", "", "ok-id", "\u202etxet", "<script>", "../../etc", "$$"]


def _valid(base, level, i, rng):
    layers = prunable_layers(base)
    mask = Mask({n: torch.rand(m.weight.shape, generator=rng) > 0.6 for n, m in layers.items()})
    hist = usage_histograms({n: m.weight.abs() for n, m in layers.items()})
    data = encode(build_summary(mask, hist, level, fingerprint(base), model_bytes(base), seed=0))
    return {"data": data, "level": level, "client": f"user{i}", "stop_reason": "reached target",
            "metrics": {"sparsity": mask.sparsity(), "prune_seconds": 0.1, "upload_bytes": len(data),
                        "num_samples": 40, "accuracy_base": 0.9, "accuracy_personalized": 0.95}}


def _mutate(r: dict, rnd: random.Random) -> dict:
    r = {**r, "metrics": dict(r["metrics"])}
    for _ in range(rnd.randint(1, 3)):
        what = rnd.randrange(7)
        if what == 0:  # flip, cut or grow the summary bytes
            d = bytearray(r.get("data") if isinstance(r.get("data"), bytes) else b"")
            op = rnd.randrange(3)
            if op == 0 and d:
                for _ in range(rnd.randint(1, 8)):
                    d[rnd.randrange(len(d))] = rnd.randrange(256)
            elif op == 1:
                d = d[:rnd.randrange(len(d) + 1)]
            else:
                d += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
            r["data"] = bytes(d)
        elif what == 1:  # a metric goes strange or missing
            r.setdefault("metrics", {})
            k = rnd.choice(list(r["metrics"]) + ["resumed", "num_samples"])
            if rnd.random() < 0.3:
                r["metrics"].pop(k, None)
            else:
                r["metrics"][k] = rnd.choice(WEIRD)
        elif what == 2:
            r["client"] = rnd.choice(NAMES + [rnd.choice(WEIRD)])
        elif what == 3:
            r["stop_reason"] = rnd.choice(NAMES + [None, 3, "x" * 600])
        elif what == 4:
            r.pop(rnd.choice(["client", "stop_reason", "data", "metrics"]), None)
        elif what == 5:
            r["extra"] = True
        else:
            r["data"] = rnd.choice([b"", "text", 7, b"FPSUM" + bytes(40)])
    return r


def _message(instr, r: dict) -> Message:
    content = RecordDict()
    try:
        if "data" in r:
            content["summary"] = ConfigRecord({"data": r["data"], "level": r["level"]})
        info = {k: r[k] for k in ("client", "stop_reason") if k in r}
        content["info"] = ConfigRecord(info)
        if "metrics" in r:
            content["metrics"] = MetricRecord({k: v for k, v in r["metrics"].items()
                                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if r.get("extra"):
            content["weights"] = ArrayRecord()
    except (TypeError, ValueError):  # a value Flower's records refuse never reaches the wire
        content = RecordDict({"info": ConfigRecord({"client": "unsendable"})})
    return Message(content=content, reply_to=instr)


@pytest.mark.security
@pytest.mark.badinput
def test_thousands_of_mutated_replies_only_ever_become_counted_rejections(identity, tmp_path):
    torch.manual_seed(0)
    rnd, rng = random.Random(0), torch.Generator().manual_seed(0)
    base = build_model("smallcnn")
    deadline = time.time() + 120  # bounded: the suite stays fast on 2 cores
    seen = accepted = rejected = rounds = 0
    for level in ("sketch", "bitmap", "stats"):
        cfg = dict(DEFAULTS, **{"num-clients": 8, "min-clients": 1, "summary-level": level,
                                "out-dir": str(tmp_path / level)})
        strat = FinePruneStrategy(base, META, cfg)
        pool = [_valid(base, level, i, rng) for i in range(4)]
        for rnd_i in range(1, 120):
            if time.time() > deadline:
                break
            msgs = list(strat.configure_train(rnd_i, ArrayRecord(), ConfigRecord(), FakeGrid(8)))
            replies = []
            for j, instr in enumerate(msgs):
                r = dict(pool[j % len(pool)], client=f"user{j}")
                replies.append(_message(instr, _mutate(r, rnd) if j % 4 else r))  # some stay valid
            strat.aggregate_train(rnd_i, replies)
            rec = strat.rounds[-1]
            assert len(rec["clients"]) + len(rec["rejected"]) + len(rec["failed"]) == len(replies)
            assert sum(rec["incidents"]["rejected"].values()) == len(rec["rejected"])
            seen += len(replies)
            accepted += len(rec["clients"])
            rejected += len(rec["rejected"])
            rounds += 1
            if rnd_i % 40 == 1:  # the report files too: plots and Markdown from what devices sent
                write_report(tmp_path / level, {"config": cfg, "rounds": strat.rounds[-1:], **{
                    k: rec[k] for k in ("clients", "analysis", "rejected", "failed")}})
    assert seen >= 1000 and accepted > 0 and rejected > 0
    for md in tmp_path.glob("*/report.md"):
        text = md.read_text()
        assert "$\\frac" not in text and "x" * 1000 not in text


def _sketch_with_other_bins(base, rng):
    from common.wire.summary import sketch_budget

    layers = prunable_layers(base)
    mask = Mask({n: torch.rand(m.weight.shape, generator=rng) > 0.6 for n, m in layers.items()})
    hist = usage_histograms({n: m.weight.abs() for n, m in layers.items()})
    s = build_summary(mask, hist, "sketch", fingerprint(base), model_bytes(base), seed=0, sketch_frac=0.006)
    assert s.bins != sketch_budget([m.weight.numel() for m in layers.values()], model_bytes(base))
    return encode(s)


@pytest.mark.security
@pytest.mark.badinput
@pytest.mark.parametrize("case", ["nan num_samples", "inf num_samples", "missing stop_reason",
                                  "sketch bins not the run's", "mathtext client name", "20,000-character name"])
def test_each_known_round_crasher_is_rejected_and_counted(identity, tmp_path, case):
    rng = torch.Generator().manual_seed(0)
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 2, "min-clients": 1, "summary-level": "sketch", "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    instr = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    good, bad = _valid(base, "sketch", 0, rng), dict(_valid(base, "sketch", 1, rng))
    bad["metrics"] = dict(bad["metrics"])
    if case.endswith("num_samples"):
        bad["metrics"]["num_samples"] = float(case.split()[0])
    elif case == "missing stop_reason":
        bad.pop("stop_reason")
    elif case == "sketch bins not the run's":
        bad["data"] = _sketch_with_other_bins(base, rng)
        bad["metrics"]["upload_bytes"] = len(bad["data"])
    else:
        bad["client"] = "a$\\frac$b" if case.startswith("mathtext") else "x" * 20_000
    strat.aggregate_train(1, [_message(instr[0], good), _message(instr[1], bad)])
    rec = strat.rounds[-1]
    assert [c["id"] for c in rec["clients"]] == ["user0"] and len(rec["rejected"]) == 1
    write_report(tmp_path, {"config": cfg, "rounds": [rec], **{k: rec[k] for k in ("clients", "analysis",
                                                                                      "rejected", "failed")}})
    assert (tmp_path / "report.md").exists()


@pytest.mark.security
@pytest.mark.badinput
@pytest.mark.parametrize("change, msg", [
    ({"arch_kwargs": {"num_classes": 10, "widths": [10_000_000, 32, 64]}}, "widths=10000000 outside"),
    ({"arch_kwargs": {"num_classes": 10, "weights_path": "/etc/shadow"}}, "are not smallcnn's"),
    ({"arch": "resnet50", "arch_kwargs": {"weights_path": "/home/me/photos/1.jpg"}}, "are not resnet50's"),
    ({"features": {"kind": "audio", "sample_rate": 8000, "clip_samples": 10**10}}, "clip_samples=10000000000 outside"),
    ({"features": {"kind": "image", "image_size": 10**6, "channels": 1}}, "image_size=1000000 outside"),
    ({"arch": "transformer9000"}, "unknown model 'transformer9000'"),
    ({"classes": ["x" * 1000]}, "classes are not a list of short names"),
])
def test_a_device_refuses_base_metadata_that_would_exhaust_or_probe_it(change, msg):
    import json as _json

    from common.model.checkpoint import CheckpointError
    from common.wire.federation import base_to_records, records_to_base

    base = build_model("smallcnn")
    arrays, meta_record = base_to_records(base, META)
    meta_record["meta"] = _json.dumps({**_json.loads(meta_record["meta"]), **change})
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        records_to_base(arrays, meta_record)
    assert records_to_base(*base_to_records(base, META))[1]["arch"] == "smallcnn"  # the honest one loads
