"""Label-free test-time adaptation baselines that keep fine-pruning honest: AdaBN (BatchNorm
recalibration), T3A (prototype classifier from pseudo-labelled features, Iwasawa & Matsuo 2021),
LAME (Laplacian-adjusted outputs on a kNN graph, Boudiaf et al. 2022), all forward-only, and TENT
(entropy minimization by backprop on BatchNorm affine parameters, Wang et al. 2021), the
"label-free but backprop" compute reference.

Each adapter takes the base model and the user's unlabeled inputs and returns a Predictor: a
callable x -> logits used on the held-out split, so every method is scored the same way."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine.adapt import stem_profile
from common.engine.bn import bn_prior, recalibrate_bn
from common.engine.forward import features_and_logits
from common.engine.heads import T3AHead, entropy_rows
from common.model.batches import batched_forward


@dataclass
class Adapted:
    predict: callable          # x -> logits (CPU)
    seconds: float
    forward_samples: int       # samples pushed through the network while adapting
    backward_samples: int = 0


# ---------------------------------------------------------------- AdaBN
def adabn(base: nn.Module, x: torch.Tensor, batch_size: int = 256) -> Adapted:
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    recalibrate_bn(model, x, batch_size)
    return Adapted(lambda z: batched_forward(model, z, batch_size), time.perf_counter() - t0, len(x))


# ---------------------------------------------------------------- T3A
def _user_features(base: nn.Module, x: torch.Tensor, batch_size: int, recalibrate):
    """A copy of the base (recalibrated on x with `recalibrate`: True, every layer, the AdaBN+
    variants; "stem", the input side only), and its penultimate features and logits on x;
    returns (model, feats, logits, last layer, samples)."""
    model = copy.deepcopy(base)
    if recalibrate == "stem":
        recalibrate_bn(model, x, batch_size, profile=stem_profile(model), prior=bn_prior(model))
    elif recalibrate:
        recalibrate_bn(model, x, batch_size)
    feats, logits, last = features_and_logits(model, x, batch_size)
    return model, feats, logits, last, len(x) * (2 if recalibrate else 1)


def t3a(base: nn.Module, x: torch.Tensor, batch_size: int = 256, filter_k: int = 100,
        recalibrate: bool = False) -> Adapted:
    """T3A built from the user's unlabeled data; `recalibrate` runs AdaBN first (AdaBN+T3A), or
    "stem" recalibrates the input side only first (stem-BN+T3A: safe under label shift)."""
    t0 = time.perf_counter()
    model, feats, logits, last, fwd = _user_features(base, x, batch_size, recalibrate)
    head = T3AHead(last.weight, last.bias, feats, logits, filter_k)

    def predict(z):
        f, _, _ = features_and_logits(model, z, batch_size)
        return head(f)
    return Adapted(predict, time.perf_counter() - t0, fwd)


# ---------------------------------------------------------------- LAME
def lame_adjust(probs: torch.Tensor, feats: torch.Tensor, knn: int = 5, iters: int = 100) -> torch.Tensor:
    """LAME's bound optimization: z_i proportional to p_i * exp(sum_j w_ij z_j) with a symmetric
    kNN affinity on L2-normalized features; returns the adjusted assignments."""
    f = F.normalize(feats.float(), dim=1)
    n = len(f)
    k = min(knn, n - 1)
    if k <= 0:
        return probs
    dist = torch.cdist(f, f)
    dist.fill_diagonal_(float("inf"))
    nn_idx = dist.topk(k, largest=False).indices
    w = torch.zeros(n, n)
    w.scatter_(1, nn_idx, 1.0)
    w = (w + w.T) / 2
    logp = torch.log(probs.clamp_min(1e-12))
    z = probs.clone()
    energy = None
    for _ in range(iters):
        z = F.softmax(logp + w @ z, 1)
        e = -(z * (logp + w @ z - torch.log(z.clamp_min(1e-12)))).sum().item()
        if energy is not None and abs(e - energy) <= 1e-8 * abs(energy):
            break
        energy = e
    return z


def lame(base: nn.Module, x: torch.Tensor, batch_size: int = 256, knn: int = 5,
         recalibrate: bool = False) -> Adapted:
    """LAME is transductive: it corrects the outputs of a batch using that batch's own graph. The
    batch is the user's unlabeled data together with the samples to classify, so the held-out
    samples are adjusted in the company of the user's data, never of their labels."""
    t0 = time.perf_counter()
    model, feats_u, logits_u, _, fwd = _user_features(base, x, batch_size, recalibrate)

    def predict(z):
        f, lg, _ = features_and_logits(model, z, batch_size)
        probs = F.softmax(torch.cat([lg, logits_u]), 1)
        adj = lame_adjust(probs, torch.cat([f, feats_u]), knn)
        return torch.log(adj[:len(z)].clamp_min(1e-12))
    return Adapted(predict, time.perf_counter() - t0, fwd)


# ---------------------------------------------------------------- TENT (backprop, no labels)
def tent(base: nn.Module, x: torch.Tensor, epochs: int = 5, lr: float = 1e-3, batch_size: int = 32,
         seed: int = 0) -> Adapted:
    """Entropy minimization: BatchNorm in train mode (batch statistics), its affine parameters
    updated by Adam; the rest frozen. Ends with the BatchNorm statistics of the user's data."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in bns:
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    samples = 0
    if params:
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                xb = x[order[i:i + batch_size]]
                if len(xb) < 2:
                    continue
                loss = entropy_rows(model(xb)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                samples += len(xb)
    for p in model.parameters():
        p.requires_grad_(False)
    recalibrate_bn(model, x, 256)
    return Adapted(lambda z: batched_forward(model, z, 256), time.perf_counter() - t0, samples + len(x), samples)


# ---------------------------------------------------------------- every baseline, and the ceiling
def runs(base: nn.Module, x: torch.Tensor) -> dict:
    """Each label-free baseline by its name in the bench's tables: a thunk that adapts `base` to
    the user's unlabeled `x` when called."""
    return {"adabn": lambda: adabn(base, x), "t3a": lambda: t3a(base, x),
            "adabn+t3a": lambda: t3a(base, x, recalibrate=True),
            "stem-bn+t3a": lambda: t3a(base, x, recalibrate="stem"), "lame": lambda: lame(base, x),
            "tent (backprop, no labels)": lambda: tent(base, x)}


LABEL_FREE = ("adabn", "t3a", "lame", "adabn+t3a")  # the label-free baselines every result stands beside


def beside(base: nn.Module, user) -> tuple[dict, float]:
    """A user's held-out accuracy under each of LABEL_FREE on the frozen `base`, adapted to its
    unlabeled data, and under the labelled ceiling (backprop_ceiling on a copy): (name -> accuracy,
    the ceiling's accuracy)."""
    from common.model.train import accuracy

    adapted = runs(base, user.x)
    with torch.no_grad():
        label_free = {name: float((adapted[name]().predict(user.heldout_x).argmax(1) == user.heldout_y).float().mean())
                      for name in LABEL_FREE}
    ceiling = copy.deepcopy(base)
    backprop_ceiling(ceiling, user.x, user.y)
    return label_free, accuracy(ceiling, user.heldout_x, user.heldout_y)


def backprop_ceiling(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The ceiling no device reaches: `model` fine-tuned in place on the user's labels (5 epochs,
    every weight). Returns train_supervised's cost."""
    from common.model.train import train_supervised

    return train_supervised(model, x, y, epochs=5, lr=5e-4, batch_size=32)
