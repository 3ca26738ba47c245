"""The second probe (S31, common/engine/confirm.py): samples the stop rule's search never saw judge
the mask it kept. It is disjoint from the probe and seeded; where the rule fails there the levels
below are bisected on it; it only ever takes sparsity back; every pass over it is counted; a user
whose probe took every sample has none; and on styled users of a BatchNorm-free network, where the
probe alone keeps masks that disagree with the unpruned model on the user's other samples, the kept
mask passes the rule on them."""
import copy

import numpy as np
import pytest
import torch

from common.engine.adapt import vendor_record
from common.engine.confirm import confirm_pick, confirmed
from common.engine.probe import probe_pick
from common.engine.prune import fine_prune
from common.model.architectures import build_model
from common.model.batches import batched_forward
from common.model.train import train_supervised
from common.settings import PruneConfig
from simulations import cohorts as CO


def test_the_second_probe_is_disjoint_from_the_probe_seeded_and_at_most_as_large():
    cfg = PruneConfig()
    for n in (20, 32, 40, 70, 200, 1000):
        p, c = probe_pick(cfg, n), confirm_pick(cfg, n)
        assert not set(p.tolist()) & set(c.tolist())
        assert len(c) == min(len(p), n - len(p))
        assert torch.equal(c, confirm_pick(cfg, n))  # seeded: the same samples every time
    assert len(confirm_pick(cfg, 32)) == 0  # the probe took them all


class _Judge:
    """A second probe that passes exactly the schedule steps up to `last_ok`."""

    def __init__(self, last_ok):
        self.last_ok, self.asked = last_ok, []

    def __call__(self, mask):
        self.asked.append(mask)
        return mask <= self.last_ok


@pytest.mark.parametrize("last_ok", [-1, 0, 2, 5, 6])
def test_where_the_second_probe_fails_the_levels_below_are_bisected_to_the_sparsest_that_passes(last_ok):
    levels = [0.1 * (k + 1) for k in range(8)]
    masks = {k: k for k in range(8)}  # step k's mask, stood for by its index
    judge = _Judge(last_ok)
    step, mask = confirmed(6, masks, lambda level: round(level * 10) - 1, levels, "dense", judge)
    assert step == min(last_ok, 6) and mask == (last_ok if last_ok >= 0 else "dense")
    assert judge.asked[0] == 6 and len(judge.asked) <= 1 + 3  # the pick, then a bisection of 6 steps


@pytest.fixture(scope="module")
def nobn_styled(digits, digits_split):
    """The digits CNN without BatchNorm, trained on the vendor's half, with its record, and eight
    styled users (thick strokes, blur, low contrast, rotation) drawn from the users' pool."""
    vend, pool = digits_split
    torch.manual_seed(0)
    m = build_model("smallcnn", num_classes=10, batchnorm=False)
    train_supervised(m, digits.x[vend], digits.y[vend], epochs=15, lr=3e-3)
    m.eval()
    return m, vendor_record(m, digits.x[vend], digits.y[vend]), CO.image_style_users(digits, np.asarray(pool), 0)


def _agreement_on_second_probe(base, meta, u, cfg):
    dense = copy.deepcopy(base)
    fine_prune(dense, u.x, PruneConfig(target_sparsity=0.0), base_meta=meta)
    kept = copy.deepcopy(base)
    res = fine_prune(kept, u.x, cfg, base_meta=meta)
    idx = confirm_pick(cfg, len(u.x))
    same = batched_forward(kept, u.x[idx]).argmax(1) == batched_forward(dense, u.x[idx]).argmax(1)
    return same.float().mean().item(), res


def test_the_kept_mask_passes_the_stop_rule_on_samples_the_search_never_saw(nobn_styled):
    base, meta, users = nobn_styled
    alone, second = [], []
    for u in users:
        a_off, r_off = _agreement_on_second_probe(base, meta, u, PruneConfig(confirm="off"))
        a_on, r_on = _agreement_on_second_probe(base, meta, u, PruneConfig(confirm="on"))
        alone.append(a_off)
        second.append(a_on)
        assert r_on.sparsity <= r_off.sparsity + 1e-9  # it only ever takes sparsity back
    assert min(second) >= 1 - PruneConfig().tolerance
    # the probe alone kept masks the user's other samples refute (today's search, S30)
    assert min(alone) < 1 - PruneConfig().tolerance


def test_every_pass_over_the_second_probe_is_counted(nobn_styled):
    base, meta, users = nobn_styled
    u = users[0]
    off = fine_prune(copy.deepcopy(base), u.x, PruneConfig(confirm="off"), base_meta=meta)
    on = fine_prune(copy.deepcopy(base), u.x, PruneConfig(confirm="on"), base_meta=meta)
    passes = [h for h in on.history if "second_probe" in h]
    assert passes and all(h["second_probe"] == len(confirm_pick(PruneConfig(), len(u.x))) for h in passes)
    # without BatchNorm the statistics pass gave the unpruned model's logits there: no pass of its own
    assert on.forward_samples - off.forward_samples == sum(h["second_probe"] for h in passes)


def test_a_user_whose_probe_took_every_sample_has_no_second_probe(digits, digits_split, digits_base):
    _, pool = digits_split
    x = digits.x[torch.as_tensor(pool[:30])]
    off_model, on_model = copy.deepcopy(digits_base), copy.deepcopy(digits_base)
    off = fine_prune(off_model, x, PruneConfig(confirm="off"))
    on = fine_prune(on_model, x, PruneConfig(confirm="on"))
    assert off.mask == on.mask and off.history == on.history
    for a, b in zip(off_model.state_dict().values(), on_model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_command_line_flag_turns_the_second_probe_on(tmp_path, digits_cli_base, digits, digits_split):
    from common.cli import main
    from common.model.checkpoint import load_checkpoint

    _, pool = digits_split
    data = tmp_path / "x.npy"
    np.save(data, digits.x[torch.as_tensor(pool[:100])].numpy())
    histories = {}
    for flag in ([], ["--confirm", "on"]):
        out = tmp_path / f"me{len(flag)}.pt"
        args = ["personalize", "--model", str(digits_cli_base), "--data", str(data), "--out", str(out), *flag]
        assert main(args) == 0
        _, meta, _ = load_checkpoint(out)
        p = meta["personalization"]
        assert p["settings"]["confirm"] == ("on" if flag else "auto")
        assert p["adaptation"]["nothing_adapts"] is False  # a user of the digits CNN: its statistics follow it
        histories[bool(flag)] = [h for h in p["history"] if "second_probe" in h]
    # auto, on a user whose adaptation follows its data: no second probe
    assert not histories[False] and histories[True]
    assert all(h["second_probe"] == 32 for h in histories[True])  # 100 samples: a probe of 32, then the next 32


def test_the_default_judges_the_stop_again_where_nothing_on_the_device_follows_the_shift(nobn_styled):
    """S35: a styled user of a BatchNorm-free network keeps the base's output layer (S26's gate), so
    pruning is all that moves its model; the default then judges the stop on the second probe, as
    `on` does, and where no gate fired it runs none (the test above)."""
    base, meta, users = nobn_styled
    for u in users[:4]:
        auto = fine_prune(copy.deepcopy(base), u.x, PruneConfig(), base_meta=meta)
        on = fine_prune(copy.deepcopy(base), u.x, PruneConfig(confirm="on"), base_meta=meta)
        assert auto.adaptation["head_gated"] is True and auto.adaptation["nothing_adapts"] is True
        assert any("second_probe" in h for h in auto.history)
        assert auto.mask == on.mask and auto.history == on.history
