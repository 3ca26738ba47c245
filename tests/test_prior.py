"""The federation gives back: the prior (the share of devices that pruned each connection) lifts a
data-poor device that personalizing alone hurts, changes nothing where it is worth nothing, is
released only over enough devices, travels checked, and keeps private mode private."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.engine.prior import Prior
from common.engine.prune import fine_prune
from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import fingerprint
from common.model.mask import Mask
from common.settings import PruneConfig
from common.wire import prior as PW
from common.wire.federation import DEFAULTS, merged_config, model_bytes
from common.wire.summary import build_summary, encode, usage_histograms
from server.analysis import pruned_shares, robust_voters
from server.strategy import FinePruneStrategy
from tests.conftest import FakeGrid
from tests.test_adaptation import Guarded
from tests.test_server import META, _reply

K, F, H = 4, 5, 4  # classes; input features and hidden units of each class


def _base(k=K, f=F, h=H, tie_break=0.05):
    """Class c reads its own f features through its own h hidden units; every other connection is
    small. Without BatchNorm (a BatchNorm-free network). `tie_break`: the last class's bias, so a
    class whose evidence is gone is not right by a tie."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k * f, k * h), nn.ReLU(), nn.Linear(k * h, k))
    with torch.no_grad():
        m[0].weight.uniform_(-0.02, 0.02)
        m[0].bias.zero_()
        m[2].weight.uniform_(-0.02, 0.02)
        m[2].bias.zero_()
        m[2].bias[k - 1] = tie_break
        for c in range(k):
            m[0].weight[c * h:(c + 1) * h, c * f:(c + 1) * f] = 1.0
            m[2].weight[c, c * h:(c + 1) * h] = 1.0
    return m.eval()


def _sample(classes, n, g):
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.zeros(n, K * F)
    for i, c in enumerate(y.tolist()):
        x[i, c * F:(c + 1) * F] = 1 + 0.3 * torch.rand(F, generator=g)
    return x, y


def _acc(m, x, y):
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def federation():
    """Six devices of 40 samples of every class personalize alone; the server's prior from their
    masks, through the wire and the device's checks."""
    g = torch.Generator().manual_seed(0)
    base = _base()
    masks = {}
    for d in range(6):
        x, _ = _sample(list(range(K)), 40, g)
        masks[f"d{d}"] = fine_prune(copy.deepcopy(base), x, PruneConfig()).mask
    voters, _ = robust_voters(masks)
    arrays, meta = PW.to_records(pruned_shares(voters), len(voters), 1)
    shapes = {k: tuple(m.weight.shape) for k, m in prunable_layers(base).items()}
    return base, PW.from_records(arrays, meta, shapes, 32.0), g


def test_the_prior_lifts_a_data_poor_user_that_personalizing_alone_hurts(federation):
    base, prior, g = federation
    xu, _ = _sample([1, 2, 3], 8, g)  # 8 samples: class 0 missing by chance, so its path looks unused
    xh, yh = _sample(list(range(K)), 400, g)
    alone = copy.deepcopy(base)
    r_alone = fine_prune(alone, xu, PruneConfig())
    helped = copy.deepcopy(base)
    r_prior = fine_prune(helped, xu, PruneConfig(), prior=prior)
    assert _acc(base, xh, yh) == 1.0
    assert _acc(alone, xh, yh) < 0.8  # alone, class 0's connections went first
    assert _acc(helped, xh, yh) == 1.0  # the others used them: they stay
    # nothing on this device adapts the model (no BatchNorm, the base's layer): the prior reorders
    # what it prunes, but its evidence raises no bound (P12), so it prunes as much as alone
    assert r_prior.adaptation["nothing_adapts"] and r_prior.sparsity == r_alone.sparsity
    # a device whose model adapts (its layer blended with prototypes) prunes more, what the others
    # pruned, though not to the bound their evidence raised (P8)
    alone, helped = copy.deepcopy(base), copy.deepcopy(base)
    r_alone = fine_prune(alone, xu, PruneConfig(head="blend"))
    r_prior = fine_prune(helped, xu, PruneConfig(head="blend"), prior=prior)
    assert _acc(alone, xh, yh) < 0.8 and _acc(helped, xh, yh) == 1.0
    assert not r_prior.adaptation["nothing_adapts"] and r_prior.sparsity > r_alone.sparsity + 0.05


def test_a_prior_worth_no_samples_gives_the_mask_of_personalizing_alone(federation):
    base, prior, g = federation
    xu, _ = _sample([1, 2, 3], 30, g)
    alone = fine_prune(copy.deepcopy(base), xu, PruneConfig()).mask
    nothing = fine_prune(copy.deepcopy(base), xu, PruneConfig(), prior=Prior(prior.pruned, 0.0, 6)).mask
    assert all(torch.equal(alone.layers[k], nothing.layers[k]) for k in alone.layers)


def test_a_prior_that_opens_no_step_of_the_search_leaves_a_device_with_data_as_alone(federation):
    """P9: 450 samples bound the search at 0.887; the prior's 2 samples of evidence move it by
    0.0004, past no step of the schedule, so its ranking would only reorder the device's own."""
    from common.engine.search import opens_a_step

    cfg = PruneConfig()
    assert not opens_a_step(cfg, 450, 32 * 32 / 482)  # a 450-clip speaker
    assert not opens_a_step(cfg, 105, 32 * 32 / 137)  # 0.728 -> 0.740: no step between
    assert opens_a_step(cfg, 57, 32 * 32 / 89) and opens_a_step(cfg, 20, 32 * 32 / 52)  # 0.608 -> 0.647 passes 0.613
    base, prior, g = federation
    xu, _ = _sample(list(range(K)), 450, g)
    alone = fine_prune(copy.deepcopy(base), xu, PruneConfig())
    with_prior = fine_prune(copy.deepcopy(base), xu, PruneConfig(), prior=prior)
    assert with_prior.adaptation["prior_ranking"] is False
    assert all(torch.equal(alone.mask.layers[k], with_prior.mask.layers[k]) for k in alone.mask.layers)
    assert with_prior.sparsity == alone.sparsity and with_prior.stop_reason == alone.stop_reason
    x8, _ = _sample([1, 2, 3], 8, g)  # the data-poor device: the prior opens steps, and is used
    assert fine_prune(copy.deepcopy(base), x8, PruneConfig(), prior=prior).adaptation["prior_ranking"] is True


@pytest.mark.security
def test_a_hostile_prior_cannot_cost_a_device_with_data_its_accuracy(federation):
    """A server that sends the opposite of what the devices pruned (prune what is used), worth a
    million samples: the stop rule still judges every step on the device's own probe."""
    base, prior, g = federation
    xu, yu = _sample(list(range(K)), 500, g)
    hostile = Prior({k: 1 - v for k, v in prior.pruned.items()}, 1e6, 6)
    m = copy.deepcopy(base)
    r = fine_prune(m, xu, PruneConfig(), prior=hostile)
    assert _acc(m, xu, yu) == 1.0 and "stop rule" in r.stop_reason


def test_the_prior_runs_no_backward_pass_and_takes_no_labels(federation):
    base, prior, g = federation
    xu, _ = _sample([1, 2, 3], 8, g)
    guarded = Guarded(copy.deepcopy(base))  # asking for a gradient of the input raises
    shares = {f"inner.{k}": v for k, v in prior.pruned.items()}
    with torch.enable_grad():
        fine_prune(guarded, xu, PruneConfig(), prior=Prior(shares, 32.0, 6))
    assert all(p.grad is None for p in guarded.parameters())


# ---------------------------------------------------------------- the server: aggregates of k or more
def server_rounds(tmp_path, n, k, reply, **config):
    """A strategy of n devices of the digits CNN (`slim-min-clients` k, two rounds, `config` on top):
    round 1's instructions, each device's reply from reply(i, instruction, base, (fingerprint,
    size, usage histograms)), aggregated, then round 2's instructions. Returns (strategy, round 1's,
    round 2's)."""
    base = build_model("smallcnn")
    cfg = dict(DEFAULTS, **{"num-clients": n, "min-clients": 1, "num-rounds": 2, "slim-min-clients": k,
                            "out-dir": str(tmp_path), **config})
    strat = FinePruneStrategy(base, META, cfg)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(n)))
    summary = (fingerprint(base), model_bytes(base),
               usage_histograms({name: m.weight.abs() for name, m in prunable_layers(base).items()}))
    strat.aggregate_train(1, [reply(i, instr, base, summary) for i, instr in enumerate(msgs)])
    return strat, msgs, list(strat.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid(n)))


def _round_one(tmp_path, n, k, epsilon=0.0, outlier=False):
    g = torch.Generator().manual_seed(1)
    truth, common = [], {}

    def reply(i, instr, base, summary):
        fp, size, hist = summary
        if not common:
            common.update({name: torch.rand(m.weight.shape, generator=g) < 0.4
                           for name, m in prunable_layers(base).items()})
        p = 0.95 if outlier and i == n - 1 else 0.1
        mask = Mask({name: ~(c | (torch.rand(c.shape, generator=g) < p)) for name, c in common.items()})
        truth.append(mask)
        data = build_summary(mask, None if epsilon else hist, "bitmap", fp, size,
                             epsilon=epsilon or None, privacy_key=bytes([i]) * 32 if epsilon else None)
        return _reply(instr, encode(data), f"u{i}", mask.sparsity())
    strat, msgs, msgs2 = server_rounds(tmp_path, n, k, reply, **{"summary-level": "bitmap",
                                                                 "privacy-epsilon": epsilon})
    assert not any("prior" in m.content.array_records for m in msgs)  # round 1: alone
    return strat, msgs2, truth


@pytest.mark.security
def test_no_prior_is_released_over_fewer_than_k_devices(identity, tmp_path):
    strat, msgs2, _ = _round_one(tmp_path, n=4, k=5)
    assert "skipped" in strat.rounds[0]["prior"]
    assert not any("prior" in m.content.array_records for m in msgs2)


@pytest.mark.security
def test_a_private_prior_counts_its_randomized_masks_for_what_their_bits_still_tell(identity, tmp_path):
    """P11: at epsilon 1 a randomized bit keeps at most tanh(1/2)^2 = 0.21 of the bit's information,
    so 20 private masks are worth 4.3 exact ones: under k = 5 no prior leaves the server, and a
    device refuses one that a server sends anyway; 40 are worth 8.5 and go."""
    from common.wire.privacy import effective_voters

    assert effective_voters(20, 1.0) < 5 < effective_voters(40, 1.0) and effective_voters(4, None) == 4
    strat, msgs2, _ = _round_one(tmp_path / "a", n=20, k=5, epsilon=1.0)
    assert "worth 4.3 exact ones" in strat.rounds[0]["prior"]["skipped"]
    assert not any("prior" in m.content.array_records for m in msgs2)
    strat, msgs2, _ = _round_one(tmp_path / "b", n=40, k=5, epsilon=1.0)
    assert strat.rounds[0]["prior"]["voters"] == 40
    assert all("prior" in m.content.array_records for m in msgs2)
    shapes, arrays, meta = _good()  # five voters: exact, a prior; randomized at epsilon 1, worth 1.1
    assert PW.from_records(arrays, meta, shapes, 32.0).voters == 5
    with pytest.raises(PW.PriorError, match="worth 1.1 exact ones"):
        PW.from_records(arrays, meta, shapes, 32.0, epsilon=1.0)


def test_k_devices_give_every_non_outlier_the_share_that_pruned_each_connection(identity, tmp_path):
    strat, msgs2, truth = _round_one(tmp_path, n=6, k=5, outlier=True)
    rec = strat.rounds[0]["prior"]
    assert rec["voters"] == 5 and rec["outliers"] == ["u5"]
    got = [m for m in msgs2 if "prior" in m.content.array_records]
    assert len(got) == 5 and msgs2[5] not in got  # the outlier's node gets none
    base = strat.base
    shapes = {k: tuple(m.weight.shape) for k, m in prunable_layers(base).items()}
    prior = PW.from_records(got[0].content["prior"], got[0].content["prior-meta"], shapes, 32.0)
    for name in shapes:  # exactly the five voters' shares, to a byte
        want = torch.stack([~t.layers[name] for t in truth[:5]]).float().mean(0)
        assert (prior.pruned[name] - want).abs().max() <= 0.5 / PW.LEVELS + 1e-6


def test_a_private_prior_is_built_from_the_noisy_masks_and_still_tells_shared_pruning(identity, tmp_path):
    strat, msgs2, truth = _round_one(tmp_path, n=40, k=5, epsilon=2.0)
    assert strat.rounds[0]["prior"]["debiased"] is True
    got = [m for m in msgs2 if "prior" in m.content.array_records]
    assert got
    shapes = {k: tuple(m.weight.shape) for k, m in prunable_layers(strat.base).items()}
    prior = PW.from_records(got[0].content["prior"], got[0].content["prior-meta"], shapes, 32.0)
    est = torch.cat([prior.pruned[k].flatten() for k in shapes])
    true = torch.cat([torch.stack([~t.layers[k] for t in truth]).float().mean(0).flatten() for k in shapes])
    assert float(torch.corrcoef(torch.stack([est, true]))[0, 1]) > 0.8


@pytest.mark.security
def test_sybils_read_back_only_an_honest_devices_noisy_bits_from_a_private_prior():
    """Four sybils and one honest device: the sybils know what they sent and subtract it from the
    shares. Without privacy that returns the honest mask exactly; in a private run (epsilon 1) only
    its randomized bits, which agree with its mask no more often than randomized response lets
    them (e/(1+e) = 0.73)."""
    from common.wire.privacy import keep_probability, randomize

    g = torch.Generator().manual_seed(3)
    honest = Mask({"l": torch.rand(20_000, generator=g) < 0.5})
    sybils = {f"s{i}": Mask({"l": torch.rand(20_000, generator=g) < 0.5}) for i in range(4)}
    known = sum((~m.layers["l"]).float() for m in sybils.values())

    def read_back(shares, eps):
        p = keep_probability(eps) if eps else 1.0
        reported = shares["l"].double() * (2 * p - 1) + (1 - p)  # the mean of the reported pruned bits
        return (5 * reported - known).round().clamp(0, 1).bool()  # the honest device's reported pruned bit

    plain = read_back(pruned_shares({"h": honest, **sybils}), None)
    assert torch.equal(plain, ~honest.layers["l"])  # without privacy: the mask itself
    noisy = randomize(honest, 1.0, seed=0)
    private = read_back(pruned_shares({"h": noisy, **sybils}, 1.0), 1.0)
    agree = float((private == ~honest.layers["l"]).float().mean())
    assert 0.6 < agree < keep_probability(1.0) + 0.01  # no better than the randomized bits (clipping loses a little)


# ---------------------------------------------------------------- the device: a prior checked before use
def _good():
    base = build_model("smallcnn")
    shapes = {k: tuple(m.weight.shape) for k, m in prunable_layers(base).items()}
    arrays, meta = PW.to_records({k: torch.rand(s) for k, s in shapes.items()}, 5, 1)
    return shapes, arrays, meta


def _bad_dtype(shapes, arrays, meta):
    name = next(iter(shapes))
    arrays[name] = Array(np.zeros(shapes[name], dtype=np.float32))


def _bad_shape(shapes, arrays, meta):
    name = next(iter(shapes))
    arrays[name] = Array(np.zeros((3, 3), dtype=np.uint8))


def _extra_layer(shapes, arrays, meta):
    arrays["../../etc"] = Array(np.zeros(3, dtype=np.uint8))


def _missing_layer(shapes, arrays, meta):
    del arrays[next(iter(shapes))]


def _lying_header(shapes, arrays, meta):
    name = next(iter(shapes))
    a = Array(np.zeros(7, dtype=np.uint8))
    arrays[name] = Array(dtype="uint8", shape=shapes[name], stype=a.stype, data=a.data)


def _too_few(shapes, arrays, meta):
    meta["meta"] = json.dumps({"voters": 1, "round": 1})


def _not_json(shapes, arrays, meta):
    meta["meta"] = "{voters"


@pytest.mark.security
@pytest.mark.parametrize("spoil, why", [(_bad_dtype, "not uint8"), (_bad_shape, "not uint8"),
                                        (_extra_layer, "prunable"), (_missing_layer, "prunable"),
                                        (_lying_header, "holds"), (_too_few, "fewer than"),
                                        (_not_json, "not JSON")])
def test_a_device_refuses_a_prior_that_does_not_fit_its_base(spoil, why):
    shapes, arrays, meta = _good()
    assert PW.from_records(arrays, meta, shapes, 32.0).voters == 5
    spoil(shapes, arrays, meta)
    with pytest.raises(PW.PriorError, match=why):
        PW.from_records(arrays, meta, shapes, 32.0)


def test_prior_on_needs_bitmaps_and_no_slim_base():
    with pytest.raises(ValueError, match="bitmap"):
        merged_config({"prior": "on", "summary-level": "sketch"})
    with pytest.raises(ValueError, match="slim-base"):
        merged_config({"prior": "on", "summary-level": "bitmap", "slim-base": True})


def test_bench_federation_puts_each_devices_first_round_beside_its_second(tmp_path, digits_server_base):
    import shutil

    from simulations import bench_federation as BF

    (tmp_path / "bases").mkdir()
    shutil.copy(digits_server_base, tmp_path / "bases" / "base_digits_s0.pt")
    over = {"slim-min-clients": 3, "partitioning": "sampled", "client-samples": 16}
    rows = BF.federation(6, 0, None, tmp_path, over) + BF.federation(6, 0, 2.0, tmp_path, over)
    assert len(rows) == 12 and {r["epsilon"] for r in rows} == {0, 2.0}
    for r in rows:
        assert 0 <= r["base"] <= 1 and 0 <= r["prior"] <= 1 and r["samples"] == 11
        assert all(0 <= r[arm] <= 1 for arm in BF.BASELINES)  # the label-free baselines beside them
        if not r["with_prior"]:
            assert (r["prior"], r["sparsity_prior"]) == (r["alone"], r["sparsity_alone"])
    helped = [r for r in rows if r["with_prior"]]
    assert len(helped) >= 6 and all(r["sparsity_prior"] > r["sparsity_alone"] for r in helped)
    table = BF.summarize(rows)
    assert [(t["clients"], t["epsilon"]) for t in table] == [(6, 0), (6, 2.0)]
    assert "| 6 | 2.0 |" in BF.to_markdown(table)
    BF.plot(rows, tmp_path / "prior.png")
    assert (tmp_path / "prior.png").stat().st_size > 5000
