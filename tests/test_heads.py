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
