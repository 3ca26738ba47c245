"""S28: BatchNorm statistics estimated on a user's few samples move by chance; a channel follows the
user, and the deep layers count as shifted, only by what they move beyond that chance. Samples,
not positions, set it: positions within a sample are correlated."""
import math

import pytest
import torch

from common.engine.bn import explained_weight, per_sample_sums, sampling_noise

C, P = 64, 16  # channels, positions per sample


def _inputs(n, g, shift=0.0, scale=1.0):
    """n samples of a layer's input: a per-sample level (half the variance) plus noise per position,
    mean 0 and variance 1 per channel on the base's data; a user's moved by `shift` and `scale`."""
    level = torch.randn(n, C, 1, generator=g) * math.sqrt(0.5)
    h = level + torch.randn(n, C, P, generator=g) * math.sqrt(0.5)
    return (h * scale + shift).reshape(n, C, 4, 4)


def _weights(h, noise: bool):
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3))
    base_mean, base_var, spread = torch.zeros(C), torch.ones(C), torch.zeros(C)  # no class mix to explain
    nz = sampling_noise(per_sample_sums(h), base_var) if noise else None
    return explained_weight(mean, var, base_mean, base_var, spread, 3.0, noise=nz)


@pytest.mark.parametrize("n", [4, 8, 32])
def test_a_users_few_samples_of_the_bases_own_data_do_not_count_as_a_shift(n):
    g = torch.Generator().manual_seed(n)
    h = _inputs(n, g)
    assert _weights(h, noise=False).mean() > 0.95  # without the allowance every channel follows chance
    assert _weights(h, noise=True).mean() < 0.15  # about 5% of channels pass a one-sided 95% test by chance


@pytest.mark.parametrize("n", [8, 32])
def test_a_real_shift_still_counts_on_a_few_samples(n):
    g = torch.Generator().manual_seed(100 + n)
    assert _weights(_inputs(n, g, shift=1.5, scale=2.0), noise=True).mean() > 0.5


def test_the_allowance_shrinks_with_the_samples_and_is_set_by_samples_not_positions():
    g = torch.Generator().manual_seed(7)
    h = _inputs(256, g)
    sums = per_sample_sums(h)
    small, large = sampling_noise(sums, torch.ones(C), 8), sampling_noise(sums, torch.ones(C), 256)
    assert torch.allclose(small, large * 32)
    # the same values with the per-sample level removed (positions independent) move far less by chance
    flat = h - h.mean((2, 3), keepdim=True) + torch.randn(256, C, 1, 1, generator=g) * 0.05
    assert sampling_noise(per_sample_sums(flat), torch.ones(C)).mean() < 0.5 * sampling_noise(sums, torch.ones(C)).mean()
    # one sample tells nothing from chance: nothing follows it
    assert torch.isinf(sampling_noise(per_sample_sums(h[:1]), torch.ones(C))).all()
