"""The federation's class directions (P6): pooled from many data-poor devices' class means, they lift
a device whose channel shifts its features, which personalizing alone cannot; a device holding few
classes, or enough samples per class for prototypes of its own, is left exactly as alone; they are
released only over k devices, travel checked both ways, and never leave a private device."""
import base64
import copy
import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.engine import class_prior as CPR
from common.engine.prior import Prior
from common.engine.prune import fine_prune
from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import fingerprint
from common.model.mask import Mask
from common.settings import PruneConfig
from common.wire import prior as PW
from common.wire.federation import DEFAULTS, class_prior_enabled, model_bytes
from common.wire.summary import SummaryError, build_summary, decode, encode, usage_histograms
from server.strategy import FinePruneStrategy
from tests.conftest import FakeGrid
from tests.test_adaptation import Guarded
from tests.test_prior import _acc, server_rounds
from tests.test_prior import _base as prior_base
from tests.test_server import META, _reply

K, F, H = 5, 4, 4  # classes; input features and hidden units of each class
HUMS = [0.9 + 0.025 * i for i in range(12)]  # how loudly each device's channel hums on class 0's features


def _base():
    """Class c reads its own F features through its own H hidden units; no BatchNorm, so nothing
    on a device follows its channel (test_prior's network, at these sizes and without its tie-break)."""
    return prior_base(K, F, H, tie_break=0.0)


def _sample(n, hum, g, classes=tuple(range(K))):
    y = torch.tensor(classes)[torch.arange(n) % len(classes)]
    x = 0.2 * torch.rand(n, K * F, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, c * F:(c + 1) * F] += 1 + 0.3 * torch.rand(F, generator=g)
    x[:, :F] += hum  # the channel's hum looks like class 0
    return x, y


@pytest.fixture(scope="module")
def fleet():
    """Twelve devices of 10 unlabeled samples (2 per class), each under its own hum; round 1 alone,
    and the class directions pooled from their class means."""
    g = torch.Generator().manual_seed(0)
    base = _base()
    devices = [(_sample(10, h, g), _sample(200, h, g)) for h in HUMS]
    alone = []
    for (x, _), _ in devices:
        m = copy.deepcopy(base)
        alone.append((m, fine_prune(m, x, PruneConfig())))
    return base, devices, alone, CPR.pool([r.class_means for _, r in alone]), g


def test_class_directions_lift_data_poor_devices_that_personalizing_alone_leaves_behind(fleet):
    base, devices, alone, pooled, _ = fleet
    gains = []
    for ((x, _), (hx, hy)), (m_alone, r_alone) in zip(devices, alone):
        m = copy.deepcopy(base)
        r = fine_prune(m, x, PruneConfig(), prior=Prior(None, 32.0, len(devices), pooled))
        assert _acc(m, hx, hy) >= _acc(m_alone, hx, hy) - 0.02  # no device loses
        gains.append(_acc(m, hx, hy) - _acc(m_alone, hx, hy))
        if r.adaptation["head"] == "class-prior":
            assert r_alone.adaptation["head"] == "linear"  # two samples per class: alone keeps the base's layer
    (x, _), (hx, hy) = devices[-3]  # a loud hum: the base and the device alone lose a third of its samples
    assert _acc(base, hx, hy) < 0.7 and _acc(alone[-3][0], hx, hy) < 0.7
    m = copy.deepcopy(base)
    fine_prune(m, x, PruneConfig(), prior=Prior(None, 32.0, len(devices), pooled))
    assert _acc(m, hx, hy) > 0.95
    assert sum(gains) / len(gains) > 0.08  # 12 devices: +0.095 on average


def test_a_device_holding_few_classes_or_plenty_of_samples_is_left_exactly_as_alone(fleet):
    """Two classes of five: its mean lies between them and the directions would pull toward the
    others (spread gate). 200 samples: prototypes of its own. Both: the same model, bit for bit."""
    base, _, _, pooled, g = fleet
    for x, _ in (_sample(10, 1.0, g, classes=(1, 2)), _sample(200, 1.0, g)):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        ra = fine_prune(a, x, PruneConfig())
        rb = fine_prune(b, x, PruneConfig(), prior=Prior(None, 32.0, 12, pooled))
        assert rb.adaptation["head"] != "class-prior"
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
        assert all(torch.equal(ra.mask.layers[k], rb.mask.layers[k]) for k in ra.mask.layers)


def test_class_directions_that_would_narrow_a_devices_predictions_are_refused(fleet):
    """P10: the loud-hum device takes the pooled directions, which spread its predictions wider
    than the base's layer does. Directions that send half of any device's samples to one class
    (that class's direction, every other class its opposite) would narrow them: refused, and the
    device is left bit for bit as alone."""
    base, devices, alone, pooled, _ = fleet
    (x, _), _ = devices[-3]
    r = fine_prune(copy.deepcopy(base), x, PruneConfig(), prior=Prior(None, 32.0, 12, pooled))
    used = r.adaptation["class_prior"]
    assert used["used"] and used["blend_soft_spread"] > used["soft_spread"]
    means = -pooled.means.clone()
    means[0] = pooled.means[0]
    narrowing = CPR.ClassPrior(means, pooled.freq, 12)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = fine_prune(a, x, PruneConfig())
    rb = fine_prune(b, x, PruneConfig(), prior=Prior(None, 32.0, 12, narrowing))
    refused = rb.adaptation["class_prior"]
    assert not refused["used"] and refused["blend_soft_spread"] < refused["soft_spread"]
    assert rb.adaptation["head"] == ra.adaptation["head"] == "linear"
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(ra.mask.layers[k], rb.mask.layers[k]) for k in ra.mask.layers)


def test_class_directions_run_no_backward_pass_and_take_no_labels(fleet):
    base, devices, _, pooled, _ = fleet
    (x, _), _ = devices[-3]
    guarded = Guarded(copy.deepcopy(base))  # asking for a gradient of the input raises
    with torch.enable_grad():
        r = fine_prune(guarded, x, PruneConfig(), prior=Prior(None, 32.0, 12, pooled))
    assert r.adaptation["head"] == "class-prior"
    assert all(p.grad is None for p in guarded.parameters())


# ---------------------------------------------------------------- the server: k or more devices
def _reply_n(instr, data, cid, samples):
    """A reply whose metrics say how many samples the device has (the class counts must add up)."""
    r = _reply(instr, data, cid, 0.0)
    r.content["metrics"]["num_samples"] = samples
    return r


def _means(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(30, 64, generator=g)
    return CPR.class_means(x, torch.randn(30, 10, generator=g))


def _round_one(tmp_path, n, k, level="sketch"):
    sent = []

    def reply(i, instr, base, summary):
        fp, size, hist = summary
        means, counts = _means(i)
        sent.append((means.half().float(), counts))
        data = encode(build_summary(Mask.dense(base), hist, level, fp, size, classes=(means, counts)))
        return _reply_n(instr, data, f"u{i}", 30)
    strat, msgs, msgs2 = server_rounds(tmp_path, n, k, reply, **{"summary-level": level})
    assert all(m.content["config"]["class-sums"] is True for m in msgs)  # asked for: a later round pools them
    return strat, msgs2, sent


@pytest.mark.security
def test_no_class_directions_are_released_over_fewer_than_k_devices(identity, tmp_path):
    strat, msgs2, _ = _round_one(tmp_path, n=4, k=5)
    assert "skipped" in strat.rounds[0]["class_prior"]
    assert not any("class-prior" in m.content.array_records for m in msgs2)
    assert all(m.content["config"]["class-sums"] is False for m in msgs2)  # the last round: nothing to pool


def test_k_devices_give_every_device_the_mean_of_their_class_means(identity, tmp_path):
    strat, msgs2, sent = _round_one(tmp_path, n=6, k=5)
    assert strat.rounds[0]["class_prior"]["voters"] == 6
    got = [m for m in msgs2 if "class-prior" in m.content.array_records]
    assert len(got) == 6
    prior = PW.classes_from_records(got[0].content["class-prior"], got[0].content["class-prior-meta"], (10, 64))
    want = CPR.pool(sent)
    assert torch.allclose(prior.means, want.means, atol=1e-6) and torch.allclose(prior.freq, want.freq)


def test_class_means_travel_in_any_summary_level_but_never_in_a_private_run():
    cfg = dict(DEFAULTS, **{"num-rounds": 2})
    assert class_prior_enabled(cfg)
    assert not class_prior_enabled(dict(cfg, **{"num-rounds": 1}))
    assert not class_prior_enabled(dict(cfg, **{"privacy-epsilon": 1.0, "summary-level": "bitmap"}))
    assert not class_prior_enabled(dict(cfg, **{"prior": "off"}))
    assert not class_prior_enabled(dict(cfg, **{"class-sums": False}))
    base = build_model("smallcnn")
    with pytest.raises(ValueError, match="private"):
        build_summary(Mask.dense(base), None, "bitmap", "f" * 64, 1, epsilon=1.0, classes=_means(0))


# ---------------------------------------------------------------- both sides check what crosses the wire
def _summary(spoil=None):
    base = build_model("smallcnn")
    shapes = {k: tuple(m.weight.shape) for k, m in prunable_layers(base).items()}
    hist = usage_histograms({name: m.weight.abs() for name, m in prunable_layers(base).items()})
    fp = fingerprint(base)
    data = encode(build_summary(Mask.dense(base), hist, "sketch", fp, model_bytes(base), classes=_means(1)))
    if spoil is not None:
        head_len = int.from_bytes(data[6:10], "little")
        h = json.loads(data[10:10 + head_len])
        spoil(h["classes"])
        header = json.dumps(h).encode()
        data = data[:6] + len(header).to_bytes(4, "little") + header + data[10 + head_len:]
    return data, fp, shapes


def test_class_means_round_trip_as_float16_and_counts_exactly():
    data, fp, shapes = _summary()
    s = decode(data, fp, shapes, classes_shape=(10, 64))
    means, counts = _means(1)
    assert torch.equal(s.classes[0], means.half().float()) and torch.equal(s.classes[1], counts)


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.security
@pytest.mark.parametrize("spoil, kind", [
    (_set("counts", [3] * 9), "shape"),
    (_set("counts", [-1] + [3] * 9), "shape"),
    (_set("counts", [True] * 10), "shape"),
    (_set("means", "!!not base64!!"), "format"),
    (_set("means", base64.b64encode(b"\0" * 10).decode()), "shape"),
    (_set("means", base64.b64encode(torch.full((10, 64), 60000.0).half().numpy().tobytes()).decode()), "range"),
    (_set("means", base64.b64encode(torch.full((10, 64), float("nan")).half().numpy().tobytes()).decode()), "range"),
    (_set("counts", [0] * 10), "range"),  # means for classes that stand for no samples
    (_set("extra", 1), "shape"),
])
def test_a_malformed_summarys_class_means_are_refused_with_their_kind(spoil, kind):
    data, fp, shapes = _summary(spoil)
    with pytest.raises(SummaryError) as err:
        decode(data, fp, shapes, classes_shape=(10, 64))
    assert err.value.kind == kind


@pytest.mark.security
def test_class_means_a_run_does_not_ask_for_are_refused():
    data, fp, shapes = _summary()
    with pytest.raises(SummaryError) as err:
        decode(data, fp, shapes)
    assert err.value.kind == "extra-content"


@pytest.mark.security
def test_the_server_counts_class_counts_that_disagree_with_the_sample_count(identity, tmp_path):
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": 1, "min-clients": 1, "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msg = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(1)))[0]
    hist = usage_histograms({name: m.weight.abs() for name, m in prunable_layers(base).items()})
    data = encode(build_summary(Mask.dense(base), hist, "sketch", fingerprint(base), model_bytes(base),
                                classes=_means(2)))
    strat.aggregate_train(1, [_reply_n(msg, data, "u0", 31)])  # the means stand for 30
    assert strat.rounds[0]["incidents"]["rejected"] == {"metrics": 1}


def _class_records(**change):
    means, freq = torch.zeros(10, 64), torch.full((10,), 0.1)
    means[:, 0] = 0.5
    arrays = {"means": Array(means.numpy()), "freq": Array(freq.numpy())}
    meta = {"voters": 6, "round": 1}
    for k, v in change.items():
        if k in arrays or k == "extra":
            arrays[k] = v
        else:
            meta[k] = v
    return ArrayRecord(arrays), ConfigRecord({"meta": json.dumps(meta)})


@pytest.mark.security
@pytest.mark.parametrize("change, why", [
    ({"voters": 1}, "fewer than"),
    ({"means": Array(torch.zeros(10, 64, dtype=torch.float64).numpy())}, "not float32"),
    ({"means": Array(torch.zeros(10, 63).numpy())}, "not float32"),
    ({"means": Array(torch.full((10, 64), float("inf")).numpy())}, "not finite"),
    ({"means": Array(torch.ones(10, 64).numpy())}, "longer than"),
    ({"freq": Array(torch.ones(10).numpy())}, "not a distribution"),
    ({"extra": Array(torch.ones(1).numpy())}, "not means and freq"),
])
def test_a_device_refuses_class_directions_that_do_not_fit_its_base(change, why):
    arrays, meta = _class_records(**change)
    with pytest.raises(PW.PriorError, match=why):
        PW.classes_from_records(arrays, meta, (10, 64))
    good = PW.classes_from_records(*_class_records(), (10, 64))
    assert good.voters == 6


def test_bench_federation_sends_styled_devices_the_class_directions_and_private_ones_none(tmp_path,
                                                                                        digits_server_base):
    import shutil

    from common.model.checkpoint import load_checkpoint, save_checkpoint
    from simulations import bench_federation as BF

    (tmp_path / "bases").mkdir()
    path = tmp_path / "bases" / "digits_s0_e0.pt"
    shutil.copy(digits_server_base, path)
    # with the vendor's own directions, devices blend those alone and the federation pools none (P13)
    kept = BF.styled_federation(2, 0, None, tmp_path, {"slim-min-clients": 3})
    assert not any(r["prior_source"] == "federation" for r in kept)
    assert sum(r["head_alone"] == "class-prior" for r in kept) >= 4
    model, meta, mask = load_checkpoint(path)  # a base without them: P6's pool
    save_checkpoint(path, model, dict(meta, class_directions=None), mask=mask)
    plain = BF.styled_federation(2, 0, None, tmp_path, {"slim-min-clients": 3})
    private = BF.styled_federation(2, 0, 2.0, tmp_path, {"slim-min-clients": 3})
    assert len(plain) == len(private) == 8 and all(r["samples"] == 20 for r in plain)
    assert all(r["with_prior"] for r in plain)  # every device gets the class directions
    # 20 images of ten classes: too few for prototypes of their own
    assert sum(r["head_prior"] == "class-prior" and r["prior_source"] == "federation" for r in plain) >= 4
    # a private run has none of the federation's: its devices blend the vendor's own, as alone (S59)
    assert not any(r["prior_source"] == "federation" for r in private)
    table = BF.summarize(plain + private)
    assert [(t["federation"], t["epsilon"]) for t in table] == [("styled", 0), ("styled", 2.0)]
    assert table[0]["class_prior_used"] >= 4 and table[1]["class_prior_used"] == 0


def test_bench_federation_draws_nested_devices_so_a_devices_gain_compares_across_sizes():
    from common.data import readers as D
    from simulations import bench_federation as BF

    ds = D.load_digits()
    two, three = BF.styled_devices(ds, 2, 0), BF.styled_devices(ds, 3, 0)
    assert [d.slot for d in two] == [0] * 4 + [1] * 4 and len(three) == 12 and three[8].slot == 2
    for a, b in zip(two, three):  # the first two per style are the same devices at either size
        assert a.id == b.id and torch.equal(a.unlabeled, b.unlabeled) and torch.equal(a.heldout_x, b.heldout_x)
    assert not torch.equal(BF.styled_devices(ds, 2, 1)[0].unlabeled, two[0].unlabeled)  # another draw

    def row(k, slot, gain):
        return {"federation": "speech", "clients": 4 * k, "epsilon": 0, "per_condition": k, "slot": slot, "seed": 0,
                "samples": 20, "with_prior": True, "head_prior": "-", "upload_bytes": 1, "base": 0.5, "alone": 0.5,
                "prior": 0.5 + gain, "sparsity_alone": 0.3, "sparsity_prior": 0.3, **dict.fromkeys(BF.BASELINES, 0.5)}
    rows = [row(2, s, 0.1) for s in (0, 1)] + [row(5, s, 0.2 if s < 2 else -0.4) for s in range(5)]
    table = {t["clients"]: t for t in BF.summarize(rows)}
    # over all devices the larger federation looks worse; on the devices both hold it gains more
    assert table[20]["prior_vs_alone"] < table[8]["prior_vs_alone"]
    assert table[8]["shared_prior_vs_alone"] == pytest.approx(0.1) and table[8]["shared_devices"] == 2
    assert table[20]["shared_prior_vs_alone"] == pytest.approx(0.2) and table[20]["shared_devices"] == 2
    assert "+20.00 pts (2)" in BF.to_markdown(list(table.values()))


def test_the_data_poor_speech_devices_are_nested_across_federation_sizes(fsdd_dir):
    from common.data import readers as D
    from simulations import federation_prior_study as FS

    ds = D.load_fsdd(fsdd_dir)
    cond = list(FS.CONDITIONS)[1]
    two, five = FS.devices(ds, cond, 2, 20, 0), FS.devices(ds, cond, 5, 20, 0)
    assert [d["slot"] for d in five] == list(range(5))
    for a, b in zip(two, five):
        assert a["id"] == b["id"] and torch.equal(a["x"], b["x"]) and torch.equal(a["hx"], b["hx"])


def test_the_servers_size_limit_leaves_room_for_the_class_means_of_a_thousand_classes(identity, tmp_path):
    """1,000 classes of 512 features: 1.4 MB of class means, far more than the bitmap's allowance."""
    base = build_model("smallcnn", num_classes=1000, widths=(4, 4, 512))
    cfg = dict(DEFAULTS, **{"num-clients": 1, "min-clients": 1, "num-rounds": 2, "out-dir": str(tmp_path)})
    strat = FinePruneStrategy(base, META, cfg)
    msg = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(1)))[0]
    hist = usage_histograms({name: m.weight.abs() for name, m in prunable_layers(base).items()})
    g = torch.Generator().manual_seed(0)
    means = CPR.class_means(torch.randn(3000, 512, generator=g), torch.randn(3000, 1000, generator=g))
    data = encode(build_summary(Mask.dense(base), hist, "sketch", fingerprint(base), model_bytes(base), classes=means))
    assert len(data) > sum(m.weight.numel() for m in prunable_layers(base).values()) // 8 + (256 << 10)
    strat.aggregate_train(1, [_reply_n(msg, data, "u0", 3000)])
    assert strat.rounds[0]["incidents"]["rejected"] == {} and len(strat.rounds[0]["clients"]) == 1


def test_a_resumed_personalization_uploads_the_class_means_it_made(tmp_path, digits_server_base):
    from client.personalize import personalize
    from common.data.protocol import simulated_user
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config, prune_settings

    base, meta, _ = load_checkpoint(digits_server_base)
    cfg = merged_config({}, {"num-clients": 10})
    x = simulated_user(cfg, 0, 10).unlabeled
    _, made = personalize(base, meta, x, prune_settings(cfg), tmp_path / "p.pt")
    _, again = personalize(base, meta, x, prune_settings(cfg), tmp_path / "p.pt")
    assert again.resumed and not made.resumed
    want = fine_prune(copy.deepcopy(base), x, prune_settings(cfg), base_meta=meta).class_means
    for m in (made, again):
        means, counts = m.class_means()
        assert torch.equal(means, want[0].half().float()) and torch.equal(counts, want[1].long())
