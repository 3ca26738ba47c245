"""Supervised steps that happen off the device or serve as baselines: the vendor's pretraining
(labels are fine there), evaluation, and backprop fine-tuning (the expensive baseline)."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.model.batches import BATCH_SIZE
from common.model.batches import batched_forward as predict_logits


def train_supervised(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3,
                     batch_size: int = 64, seed: int = 0, device: str = "cpu", progress=None,
                     weight_decay: float = 1e-4, augment=None) -> dict:
    """Adam on cross-entropy. Returns counts for cost accounting."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    t0, samples = time.perf_counter(), 0
    for ep in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2 < len(x):  # BatchNorm cannot train on one sample where a map is 1x1
                continue
            xb, yb = x[idx].to(device), y[idx].to(device)
            if augment is not None:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += len(idx)
        sched.step()
        if progress:
            progress(ep + 1, epochs, f"loss {loss.item():.3f}")
    model.eval()
    return {"seconds": time.perf_counter() - t0, "forward_samples": samples, "backward_samples": samples}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    if len(y) == 0:
        return float("nan")
    return (predict_logits(model, x, device=device).argmax(1) == y).float().mean().item()


def time_inference(model: nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE, device: str = "cpu",
                   repeats: int = 3) -> float:
    """Best-of-n seconds for one plain forward pass over x."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_logits(model, x, batch_size, device)
        best = min(best, time.perf_counter() - t0)
    return best
