"""Scores -> masks (common/engine/select.py): the exact k-th value selection, one global ranking
whichever way it is computed, the geometric schedule, masks at a sparsity that keep what was
pruned pruned."""
import math

import pytest
import torch

from common.engine.select import global_ranking, kth_smallest, mask_at, schedule
from common.model.architectures import build_model
from common.model.mask import Mask


@pytest.mark.parametrize("n", [300_000, 5_000])
@pytest.mark.parametrize("kind", ["uniform", "ties", "sorted", "infinities", "one value"])
def test_kth_smallest_is_kthvalue_exactly(kind, n):
    """The selection (NumPy's introselect) answers what torch.kthvalue answers, at every k, the
    edges included, on ties, sorted scores and infinities (pruned connections rank at -inf, a
    kept output layer at +inf)."""
    g = torch.Generator().manual_seed(1)
    f = torch.rand(n, generator=g)
    if kind == "ties":
        f = (f * 7).floor()
    elif kind == "sorted":
        f = torch.sort(f).values
    elif kind == "infinities":
        f[: n // 3] = -math.inf
        f[-n // 5:] = math.inf
    elif kind == "one value":
        f = torch.full((n,), 0.25)
    for k in (1, 2, 17, n // 10, n // 3, n // 3 + 1, n // 2, int(0.7 * n), n - n // 5, n - 1, n):
        assert torch.equal(kth_smallest(f, k), torch.kthvalue(f, k).values), (kind, k)


def test_single_selection_on_large_inputs_gives_the_sorted_ranking_masks():
    """Fixed targets and bisection select by k-th value; a linear search ranks once by a stable
    sort. On 300,000 tied scores with -inf (already pruned) both give the same masks."""
    g = torch.Generator().manual_seed(2)
    sc = {"a": torch.randint(0, 9, (300, 600), generator=g).float(), "b": torch.randint(0, 3, (20_000,), generator=g).float()}
    sc["a"][:5] = -math.inf
    single, ranked = global_ranking(sc, single=True), global_ranking(sc, single=False)
    for sp in (0.0, 0.05, 0.3, 0.71, 0.95, 1.0):
        a, b = single(sp), ranked(sp)
        assert a == b and a.sparsity() == pytest.approx(sp, abs=1e-5)


def test_schedule_is_geometric_and_ends_at_target():
    lv = schedule(0.1, 0.95)
    assert lv[0] == pytest.approx(0.1) and lv[1] == pytest.approx(0.19) and lv[-1] == 0.95
    assert all(a < b for a, b in zip(lv, lv[1:]))
    assert schedule(0.5, 0.95, target=0.7) == [0.5, 0.7]


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_mask_at_hits_sparsity_and_keeps_pruned_pruned(scope):
    model = build_model("smallcnn")
    scores = {n: torch.rand(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight")
              and n in ("conv1", "conv2", "fc1", "fc2")}
    m1 = mask_at(scores, Mask.dense(model), 0.3, scope)
    m2 = mask_at(scores, m1, 0.6, scope)
    assert m1.sparsity() == pytest.approx(0.3, abs=0.01)
    assert m2.sparsity() == pytest.approx(0.6, abs=0.01)
    assert all((~m1.layers[k] & m2.layers[k]).sum() == 0 for k in m1.layers)  # nested
    if scope != "global":
        assert all(abs(v - 0.6) < 0.05 for v in m2.layer_sparsity().values())
