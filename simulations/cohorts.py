"""User cohorts with their own conditions, made from data that ships or sits in ../shared: the
domain shifts under which personalization matters. Every user gets unlabeled personalization
inputs and a disjoint labeled held-out split, both under the user's own condition.

Speech (FSDD, 8 kHz): additive noise at a fixed SNR, reverberation (a synthetic room impulse
response), speed change (resampling: tempo and pitch), a telephone band, and few-data users (24
clips of 4 digits). Images (scikit-learn digits, 8x8): stroke thickness, blur, contrast, rotation.
Conditions are drawn per user from a seeded generator, so a cohort is the same on every machine."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.data import protocol as P

SPEECH_CONDITIONS = ("noise", "reverb", "speed", "phone")
IMAGE_STYLES = ("thick", "blur", "contrast", "rotate")


# ---------------------------------------------------------------- speech effects
def add_noise(wav: torch.Tensor, snr_db: float, gen: torch.Generator, color: str = "white") -> torch.Tensor:
    """Noise at `snr_db` relative to each clip's own power; pink noise by 1/f shaping."""
    noise = torch.randn(wav.shape, generator=gen)
    if color == "pink":
        spec = torch.fft.rfft(noise, dim=-1)
        f = torch.arange(spec.shape[-1]).clamp_min(1).float()
        noise = torch.fft.irfft(spec / f.sqrt(), n=wav.shape[-1], dim=-1)
    p_sig = wav.pow(2).mean(-1, keepdim=True).clamp_min(1e-10)
    p_noise = noise.pow(2).mean(-1, keepdim=True).clamp_min(1e-10)
    return wav + noise * (p_sig / p_noise / 10 ** (snr_db / 10)).sqrt()


def reverberate(wav: torch.Tensor, rate: int, rt60: float, gen: torch.Generator) -> torch.Tensor:
    """Convolve with an exponentially decaying noise impulse response of reverberation time rt60."""
    import torchaudio.functional as AF

    n = int(rate * rt60)
    t = torch.arange(n) / rate
    rir = torch.randn(n, generator=gen) * torch.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[0] = 1.0
    rir = rir / rir.norm()
    out = AF.fftconvolve(wav, rir.expand(wav.shape[0], -1))[..., :wav.shape[-1]]
    return out * (wav.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-10))


def change_speed(wav: torch.Tensor, rate: int, factor: float) -> torch.Tensor:
    """Play `factor` times faster (tempo and pitch move together), same clip length."""
    import torchaudio.functional as AF

    new = int(round(rate / factor))
    out = AF.resample(wav, rate, new)
    n = wav.shape[-1]
    return out[..., :n] if out.shape[-1] >= n else F.pad(out, (0, n - out.shape[-1]))


def telephone(wav: torch.Tensor, rate: int) -> torch.Tensor:
    """A 300-3400 Hz band, as a phone line passes it."""
    import torchaudio.functional as AF

    return AF.lowpass_biquad(AF.highpass_biquad(wav, rate, 300.0), rate, 3400.0)


def speech_condition(name: str, rng: np.random.Generator) -> dict:
    if name == "noise":
        return {"name": name, "snr_db": float(rng.choice([5.0, 10.0])), "color": str(rng.choice(["white", "pink"]))}
    if name == "reverb":
        return {"name": name, "rt60": float(rng.uniform(0.3, 0.7))}
    if name == "speed":
        return {"name": name, "factor": float(rng.choice([0.85, 1.15]))}
    if name == "phone":
        return {"name": name}
    raise ValueError(f"unknown speech condition '{name}' (choose from: {', '.join(SPEECH_CONDITIONS)})")


def apply_speech(wav: torch.Tensor, cond: dict, rate: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if cond["name"] == "noise":
        return add_noise(wav, cond["snr_db"], gen, cond["color"])
    if cond["name"] == "reverb":
        return reverberate(wav, rate, cond["rt60"], gen)
    if cond["name"] == "speed":
        return change_speed(wav, rate, cond["factor"])
    return telephone(wav, rate)


def describe(cond: dict) -> str:
    return cond["name"] + "".join(f"-{v}" for k, v in cond.items() if k != "name")


# ---------------------------------------------------------------- image styles
def image_style(name: str, rng: np.random.Generator) -> dict:
    if name == "thick":
        return {"name": name, "amount": float(rng.uniform(0.6, 1.0))}
    if name == "blur":
        return {"name": name, "sigma": float(rng.uniform(0.8, 1.2))}
    if name == "contrast":
        return {"name": name, "gain": float(rng.uniform(0.3, 0.5)), "offset": float(rng.uniform(0.2, 0.4))}
    if name == "rotate":
        return {"name": name, "degrees": float(rng.choice([-1, 1]) * rng.uniform(20, 30))}
    raise ValueError(f"unknown image style '{name}' (choose from: {', '.join(IMAGE_STYLES)})")


def apply_image(x: torch.Tensor, style: dict) -> torch.Tensor:
    """x: (N, 1, H, W) in [0, 1]."""
    if style["name"] == "thick":  # strokes dilated by a 3x3 max filter, blended by `amount`
        return (1 - style["amount"]) * x + style["amount"] * F.max_pool2d(x, 3, 1, 1)
    if style["name"] == "blur":
        r = torch.arange(-1, 2).float()
        k = torch.exp(-r ** 2 / (2 * style["sigma"] ** 2))
        k2 = (k[:, None] * k[None, :]) / k.sum() ** 2
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2.view(1, 1, 3, 3))
    if style["name"] == "contrast":  # faded ink on a grey background
        return x * style["gain"] + style["offset"]
    a = math.radians(style["degrees"])
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


# ---------------------------------------------------------------- users
@dataclass
class BenchUser:
    user_id: str
    x: torch.Tensor          # personalization inputs: unlabeled for every method but backprop
    y: torch.Tensor          # their labels, used only by the backprop baseline
    heldout_x: torch.Tensor  # evaluation only
    heldout_y: torch.Tensor


def _fmt(cond: dict) -> str:
    return cond["name"] + "".join(f"-{v:.2f}" if isinstance(v, float) else f"-{v}"
                                  for k, v in cond.items() if k != "name")


def speech_condition_users(ds, seed: int, per_speaker: int = 2) -> list[BenchUser]:
    """Each FSDD speaker under `per_speaker` acoustic conditions (cycled through noise, reverb,
    speed, phone): takes 5-24 unlabeled, takes 0-4 held out, all ten digits, both under the
    condition. The base was trained on takes 25-49 of clean speech."""
    rng = np.random.default_rng(seed)
    users, k = [], 0
    for spk in sorted(set(ds.groups.tolist())):
        pers, ev = (torch.as_tensor(i) for i in P.speaker_user(ds, spk, (P.TEST_TAKES, P.VENDOR_TAKE)))
        for _ in range(per_speaker):
            cond = speech_condition(SPEECH_CONDITIONS[k % len(SPEECH_CONDITIONS)], rng)
            k += 1
            users.append(BenchUser(f"{spk}:{_fmt(cond)}", apply_speech(ds.x[pers], cond, 8000, seed * 7919 + 2 * k),
                                   ds.y[pers], apply_speech(ds.x[ev], cond, 8000, seed * 7919 + 2 * k + 1), ds.y[ev]))
    return users


def few_data_user(ds, spk: str, rng: np.random.Generator, digits: int = 4, takes=(5, 11)) -> BenchUser:
    """A new speaker with little data: `digits` digits, takes 5-10 of each unlabeled (24 clips),
    takes 0-4 held out."""
    mine = rng.choice(10, size=digits, replace=False)
    pers, ev = (torch.as_tensor(i[np.isin(ds.y.numpy()[i], mine)]) for i in P.speaker_user(ds, spk, takes))
    return BenchUser(f"{spk}:{''.join(map(str, sorted(mine)))}", ds.x[pers], ds.y[pers], ds.x[ev], ds.y[ev])


def image_style_users(ds, pool: np.ndarray, seed: int, n_users: int = 8, n_images: int = 110,
                      heldout: int = 40) -> list[BenchUser]:
    """digits users with their own handwriting/camera style (cycled through thick strokes, blur,
    low contrast, rotation), all ten classes, drawn from the users' pool."""
    rng = np.random.default_rng(seed)
    users = []
    for u in range(n_users):
        style = image_style(IMAGE_STYLES[u % len(IMAGE_STYLES)], rng)
        idx = rng.choice(pool, n_images, replace=False)
        p, e = torch.as_tensor(idx[heldout:]), torch.as_tensor(idx[:heldout])
        users.append(BenchUser(f"user{u}:{_fmt(style)}", apply_image(ds.x[p], style), ds.y[p],
                               apply_image(ds.x[e], style), ds.y[e]))
    return users
