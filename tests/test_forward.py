"""Forward passes (common/model/batches.py, common/engine/forward.py, common/engine/bn.py): a pass
that takes the probe's samples first hands its logits and features back in the order of the data;
full recalibration leaves each BatchNorm layer with the user's own statistics (every batch weighed
by its samples), and a partial one
(weight 0) with the base's."""
import copy

import torch
import torch.nn as nn

from common.engine.bn import bn_prior, recalibrate_bn
from common.engine.forward import capture_features, forward_pass
from common.model.batches import batched_forward, batches


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_a_probe_first_pass_returns_logits_and_features_in_the_order_of_the_data():
    net, x = _net(), torch.randn(50, 6)
    first = torch.tensor([40, 3, 17, 9])
    order = torch.cat(list(batches(torch.arange(50), 16, first)))
    assert order[:4].tolist() == [40, 3, 17, 9] and sorted(order.tolist()) == list(range(50))
    with capture_features(net) as cap:
        logits, _ = forward_pass(net, x, 16, first=first)
    assert torch.allclose(logits, batched_forward(net, x, 16), atol=1e-6)
    with torch.no_grad():
        want = net[:3](x)
    assert torch.allclose(cap.features(first), want, atol=1e-6)


def test_full_recalibration_takes_the_users_statistics_and_weight_zero_keeps_the_bases():
    net, x = _net(), torch.randn(300, 6) * 3 + 2
    with torch.no_grad():
        pre = net[0](x)
    full = copy.deepcopy(net)
    recalibrate_bn(full, x, 64)
    bn = full[1]
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=1e-4)
    # the variance: each batch's own (unbiased, as BatchNorm's), averaged weighted by its samples
    parts = pre.split(64)
    want = sum(len(p) * p.var(0) for p in parts) / len(pre)
    assert torch.allclose(bn.running_var, want, rtol=1e-4, atol=1e-5)
    kept = copy.deepcopy(net)
    base = bn_prior(kept)
    recalibrate_bn(kept, x, 64, weight=0.0)
    assert torch.equal(kept[1].running_mean, base[0][0]) and torch.equal(kept[1].running_var, base[0][1])
