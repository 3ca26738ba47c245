"""Inputs unlike anything the base was trained on (inverted contrast, swapped colours, another
sample rate): the vendor records the average input its model's first layer saw (input_profile,
pooled to at most PROFILE_SIDE positions per side); the device compares the user's average, which
its statistics pass gives for free (FirstLayerInputs), channel by channel (the lowest Pearson
correlation). Below UNLIKE_BELOW the user is told so in one line, and nothing irreversible is done
for them: no pruning, no restriction (common/engine/prepare.py).

Inputs in other units than the base's (raw pixels of 0-255 where the model saw 0-1, audio in PCM
units where it saw [-1, 1]) keep the shape of the average input, and a correlation cannot see
them. So the vendor also records the level of its raw inputs (input_rms: their root mean square),
and inputs whose level lies more than LEVEL_BOUND times above or below it are unlike the base's
too (S60). The units errors it is for move the level 100x (percent) to 32768x (PCM); the
benchmark's users and the federations' devices, whose voices, rooms and styles move it, lie
between 0.075x and 2.1x (13x at most). The bound sits at the geometric middle of the two; each
leave-one-cohort-out fold puts it at 30x-36x, and none flags a user of the cohort it held out
(docs/input_level)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.model.architectures import prunable_layers
from common.model.batches import BATCH_SIZE

PROFILE_SIDE = 8  # an input profile is pooled to at most this many positions per side
UNLIKE_BELOW = 0.3  # average input correlated below this with the vendor's: unlike the base's inputs
LEVEL_BOUND = 36.0  # inputs whose level lies beyond this factor of the vendor's: unlike the base's (S60)


def input_profile(model: nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE, device: str = "cpu") -> torch.Tensor:
    """The average input of the model's first layer (for audio models, the spectrogram after its
    own front end), pooled to at most PROFILE_SIDE x PROFILE_SIDE per channel: (C, h, w), or
    (features,) for a fully-connected first layer."""
    return pooled_profile(first_layer_mean(model, x, batch_size, device))


def pooled_profile(mean: torch.Tensor) -> torch.Tensor:
    """An average first-layer input as a profile: pooled to at most PROFILE_SIDE per side."""
    if mean.dim() == 3:
        mean = F.adaptive_avg_pool2d(mean.unsqueeze(0), (min(PROFILE_SIDE, mean.shape[1]),
                                                         min(PROFILE_SIDE, mean.shape[2])))[0]
    return mean


class _Enough(Exception):
    pass


@torch.no_grad()
def first_layer_mean(model: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """The average input of the model's first layer over x; each batch stops at that layer."""
    first = next(iter(prunable_layers(model).values()))
    total = {}

    def pre(_m, args):
        h = args[0].detach().float()
        total["s"] = h.sum(0) + total.get("s", 0)
        raise _Enough

    handle = first.register_forward_pre_hook(pre)
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            try:
                model(x[i:i + batch_size].to(device))
            except _Enough:
                pass
    finally:
        handle.remove()
    return (total["s"] / len(x)).cpu()


def input_correlation(model: nn.Module, meta: dict | None, x: torch.Tensor, batch_size: int = BATCH_SIZE,
                      device: str = "cpu") -> float | None:
    """Pearson correlation between the user's average input and the vendor's (input_profile), per
    channel, the lowest over channels whose profile varies, from passes that stop at the first
    layer; None where the checkpoint records no profile. Inverted digits: -0.8 to -0.98; styled,
    coloured, noisy or reverberant users of the benchmark: 0.52 and above."""
    vendor = _vendor_profile(meta)
    if vendor is None:
        return None
    return _lowest_correlation(input_profile(model, x, batch_size, device), vendor)


class FirstLayerInputs:
    """The sum of the first prunable layer's inputs over the passes it is open for: a hook on a
    pass the engine runs anyway (its statistics pass), so the input check costs no pass."""

    def __init__(self, model: nn.Module):
        self.layer = next(iter(prunable_layers(model).values()))
        self.total, self.n = None, 0

    def _hook(self, _m, args):
        h = args[0].detach().float()
        self.total = h.sum(0) if self.total is None else self.total + h.sum(0)
        self.n += h.shape[0]

    def __enter__(self):
        self._handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def correlation(self, meta: dict | None) -> float | None:
        """input_correlation of the inputs seen (the lowest over channels; per-channel affine
        normalization before the first layer, as a train-mode BatchNorm on a spectrogram, leaves it
        unchanged); None without a vendor profile or without inputs."""
        vendor = _vendor_profile(meta)
        if vendor is None or not self.n:
            return None
        return _lowest_correlation(pooled_profile((self.total / self.n).cpu()), vendor)


def _vendor_profile(meta: dict | None) -> torch.Tensor | None:
    rec = (meta or {}).get("input_profile")
    if not isinstance(rec, dict):
        return None
    try:
        return torch.tensor(rec["values"], dtype=torch.float32).reshape(rec["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None


def _lowest_correlation(user: torch.Tensor, vendor: torch.Tensor) -> float | None:
    # only a spatial average (an image's, a spectrogram's) keeps its layout whatever classes the
    # user holds; the mean of a feature vector moves with the class mix itself
    if user.shape != vendor.shape or user.dim() != 3:
        return None
    corrs = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(user.flatten(1), vendor.flatten(1))
             if b.numel() >= 4 and float(b.std()) > 1e-6 and float(a.std()) > 1e-6]
    return min(corrs) if corrs else None


def rms(x: torch.Tensor) -> float:
    """The root mean square of every value of x (one reduction, no copy of float32 data; its
    rounding, about 1e-4 relative, is nothing beside a bound of LEVEL_BOUND)."""
    return float(torch.linalg.vector_norm(x.float())) / max(x.numel(), 1) ** 0.5


def level_record(x: torch.Tensor) -> dict:
    """The vendor record's input_rms: the level of the raw inputs the base was trained on."""
    return {"input_rms": float(f"{rms(x):.6g}")}


def input_level(x: torch.Tensor, meta: dict | None) -> float | None:
    """The user's input level over the vendor's (input_rms); None where the checkpoint records
    none (or a level of zero: inputs all zero say nothing of their units)."""
    ref = (meta or {}).get("input_rms")
    if not isinstance(ref, (int, float)) or isinstance(ref, bool) or not 0 < ref < float("inf"):
        return None
    return rms(x) / ref


def off_level(level: float | None) -> bool:
    """Whether a level (input_level) lies beyond LEVEL_BOUND times the vendor's either way."""
    return level is not None and not 1 / LEVEL_BOUND <= level <= LEVEL_BOUND


def reason(adaptation: dict) -> str:
    """Why the engine took a user's inputs for unlike the base's, in words, from what its
    adaptation report says (`input_level`, `input_correlation`). The report rounds both to four
    digits, so a value that crossed its bound by less reads as on it: then both are named."""
    level, corr = adaptation.get("input_level"), adaptation.get("input_correlation")
    said = []
    if off_level(level):
        said.append(f"their level is {level:.3g}x the vendor's, beyond {LEVEL_BOUND:g}x either way: other units, "
                    f"e.g. pixels of 0-255 where the model saw 0-1, or audio in PCM units where it saw [-1, 1]")
    if corr is not None and corr < UNLIKE_BELOW:
        said.append(f"their average correlates {corr:+.2f} with the vendor's, e.g. dark ink on white where the "
                    f"model saw white on black, other colours or another sample rate")
    if not said:
        said.append(f"their level is {level}x the vendor's (bound {LEVEL_BOUND:g}x either way) and their average "
                    f"correlates {corr} with the vendor's (bound {UNLIKE_BELOW:g}), one of them past its bound")
    return "; ".join(said)
