"""Output heads built from the user's own features: which one `auto` picks for how much data."""
import torch

from common.engine.heads import choose_head, spread_classes


def _logits(n: int, classes: int) -> torch.Tensor:
    """n samples spread evenly over `classes` confident classes."""
    out = torch.full((n, 10), -5.0)
    out[torch.arange(n), torch.arange(n) % classes] = 5.0
    return out


def test_auto_keeps_the_base_layer_where_prototypes_would_come_from_one_to_three_samples():
    """20 clips over ten digits are 2 per class: prototypes (or half of them) of so few samples cost
    data-poor speech devices 10-44 points where the base's layer kept them at or above their base."""
    assert abs(spread_classes(_logits(20, 10)) - 10) < 0.01
    assert choose_head("auto", _logits(20, 10), 10.0, 4.0) == "linear"   # 2 per class
    assert choose_head("auto", _logits(40, 10), 10.0, 4.0) == "blend"    # 4 per class
    assert choose_head("auto", _logits(24, 4), 10.0, 4.0) == "blend"     # 6 per class (few clips, 4 digits)
    assert choose_head("auto", _logits(45, 3), 10.0, 4.0) == "prototypes"
    assert choose_head("auto", _logits(20, 10), 10.0, 0.0) == "blend"    # no floor: as before
    assert choose_head("prototypes", _logits(20, 10), 10.0, 4.0) == "prototypes"  # a named head is itself


def test_the_floor_is_a_setting_of_every_surface():
    from common.settings import SETTINGS, PruneConfig

    assert PruneConfig().head_min_support == 4.0
    assert any(s.name == "head-min-support" for s in SETTINGS)


def test_em_recovers_the_class_mix_behind_calibrated_posteriors():
    """label_mix (S54): posteriors of a base trained on balanced classes, over a user's data drawn
    in another mix, give that mix back (Saerens et al.'s EM), where their plain mean does not."""
    from common.engine.heads import label_mix

    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([0.6, 0.3, 0.1, 0.0])
    y = torch.multinomial(mix, 4000, replacement=True, generator=g)
    centres = torch.tensor([0.0, 1.5, 3.0, 4.5])
    x = centres[y] + torch.randn(len(y), generator=g)
    logits = -0.5 * (x[:, None] - centres[None]) ** 2  # the exact posteriors under a uniform prior
    est = label_mix(logits)
    assert (est - mix).abs().max() < 0.03, est
    assert (torch.softmax(logits, 1).mean(0) - mix).abs().max() > 0.08  # what EM is for


def _imbalanced_posteriors(vendor, mix, n=4000, seed=0):
    """Exact posteriors of a base trained on classes in the `vendor` mix, over a user's data drawn
    in `mix` (unit Gaussians on a line): what a calibrated base trained on imbalanced data outputs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(mix, n, replacement=True, generator=g)
    centres = torch.arange(len(mix), dtype=torch.float32) * 2.5
    x = centres[y] + torch.randn(len(y), generator=g)
    return -0.5 * (x[:, None] - centres[None]) ** 2 + vendor.log()


def test_em_over_the_vendors_counts_recovers_the_mix_where_a_uniform_vendor_misreads_it():
    """S55: a base trained on imbalanced classes carries their mix in its posteriors. EM over the
    vendor's own mix (its record's class_counts) gives the user's mix back; EM that takes the
    vendor for uniform tilts it toward the vendor's common classes."""
    from common.engine.heads import label_mix, vendor_prior

    vendor = vendor_prior({"class_counts": [800, 400, 100, 50]}, 4)
    assert torch.allclose(vendor, torch.tensor([800, 400, 100, 50]) / 1350.0, atol=1e-6)
    mix = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = _imbalanced_posteriors(vendor, mix, n=20000)
    assert (label_mix(logits, vendor) - mix).abs().max() < 0.02
    assert (label_mix(logits) - mix).abs().max() > 0.04  # the vendor's mix read as the user's


def test_a_user_holding_the_vendors_own_mix_keeps_its_predictions_under_the_label_shift_head():
    """S55: over the vendor's counts, a user whose data come in the vendor's mix moves every class
    by nearly the same (no label shift to correct); over a uniform vendor the same user's common
    classes are pushed up further (the vendor's prior counted twice)."""
    from common.engine.heads import vendor_prior, write_label_shift

    vendor = vendor_prior({"class_counts": [800, 400, 100, 50]}, 4)
    logits = _imbalanced_posteriors(vendor, vendor)
    moves = []
    for v in (vendor, None):
        layer = torch.nn.Linear(3, 4)
        b = layer.bias.detach().clone()
        write_label_shift(layer, torch.zeros(len(logits), 3), logits, vendor=v)
        moves.append(layer.bias.detach() - b)
    assert float(moves[0].max() - moves[0].min()) < 0.05, moves[0]
    assert float(moves[1][0] - moves[1][3]) > 0.5, moves[1]


def test_a_record_without_usable_counts_leaves_the_vendor_uniform():
    """vendor_prior: no counts, counts for another number of classes, or none counted: None (the
    uniform vendor of S54); a class the vendor never saw counts for VENDOR_FLOOR of uniform."""
    from common.engine.heads import VENDOR_FLOOR, vendor_prior

    assert vendor_prior(None, 3) is None and vendor_prior({}, 3) is None
    assert vendor_prior({"class_counts": [1, 2]}, 3) is None
    assert vendor_prior({"class_counts": [0, 0, 0]}, 3) is None
    pv = vendor_prior({"class_counts": [500, 500, 0]}, 3)
    assert abs(float(pv.sum()) - 1) < 1e-6 and float(pv[2]) >= VENDOR_FLOOR / 3 * 0.99


def test_the_label_shift_head_moves_only_the_bias_and_keeps_a_uniform_users_layer():
    """write_label_shift keeps the base's rows; a user whose data spread evenly over the classes
    keeps its predictions; a user holding one class gets the other classes pushed down, by the
    power PRIOR_POWER of their estimated shares, floored."""
    import math

    from common.engine.heads import PRIOR_FLOOR, PRIOR_POWER, label_mix, write_label_shift

    layer = torch.nn.Linear(6, 10)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    write_label_shift(layer, torch.zeros(40, 6), _logits(40, 10))
    assert torch.equal(layer.weight, w) and torch.allclose(layer.bias - b, (layer.bias - b)[0].expand(10), atol=1e-4)
    layer.bias.data.copy_(b)
    write_label_shift(layer, torch.zeros(30, 6), _logits(30, 1))
    moved = layer.bias.detach() - b
    assert torch.equal(layer.weight, w) and int(moved.argmax()) == 0
    assert (moved[1:] < moved[0] - 1.0).all() and (moved[1:] >= math.log(PRIOR_FLOOR) - 1e-5).all(), moved
    assert abs(float(moved[0]) - math.log(10) - PRIOR_POWER * math.log(float(label_mix(_logits(30, 1))[0]))) < 1e-4
    bare = torch.nn.Linear(6, 10, bias=False)
    before = bare.weight.detach().clone()
    write_label_shift(bare, torch.zeros(30, 6), _logits(30, 1))  # no bias: nothing to move
    assert torch.equal(bare.weight, before)
