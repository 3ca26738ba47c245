"""Output heads a device can build from its own unlabeled data, forward only: T3A's prototype
classifier (Iwasawa & Matsuo 2021), and imprinting it into a pruned model's output layer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.forward import features_and_logits
from common.mask import Mask
from common.models import prunable_layers


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, 1)
    return -(p * F.log_softmax(logits, 1)).sum(1)


class T3AHead:
    """T3A's classifier: per class, the normalized mean of the normalized supports predicted as
    that class. Supports are the last layer's weight rows (the warm-up supports of the paper's
    code) plus the user's features, of which each class keeps its `filter_k` lowest-entropy ones."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, feats: torch.Tensor,
                 logits: torch.Tensor, filter_k: int = 100):
        w = weight.detach().float().cpu()
        warm_logits = w @ w.T + (0 if bias is None else bias.detach().float().cpu())
        sup = torch.cat([w, feats.float()])
        lg = torch.cat([warm_logits, logits.float()])
        labels, ent = lg.argmax(1), entropy_rows(lg)
        keep = torch.zeros(len(sup), dtype=torch.bool)
        for c in range(w.shape[0]):
            idx = torch.nonzero(labels == c).flatten()
            if filter_k > 0 and len(idx) > filter_k:
                idx = idx[torch.argsort(ent[idx], stable=True)[:filter_k]]
            keep[idx] = True
        onehot = F.one_hot(labels[keep], w.shape[0]).float()
        self.weight = F.normalize(F.normalize(sup[keep], dim=1).T @ onehot, dim=0)  # (d, C)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float() @ self.weight



@torch.no_grad()
def imprint_prototypes(model: nn.Module, x: torch.Tensor, mask: Mask, batch_size: int, device: str) -> None:
    """Replace the output layer by T3A's prototype classifier (no labels): each class's weight
    row becomes the normalized mean of the normalized features the adapted, pruned network
    predicts as that class (lowest-entropy supports, the old row as a warm-up support); the bias
    goes. The output layer is not ranked for pruning under this head, so its mask holds only the
    rows of restricted-away classes, which stay pruned."""
    feats, logits, last = features_and_logits(model, x, batch_size, device)
    head = T3AHead(last.weight, last.bias, feats, logits)
    name = list(prunable_layers(model))[-1]
    w = head.weight.T.reshape(last.weight.shape).to(last.weight)
    last.weight.copy_(w * mask.layers[name].to(w.device))
    if last.bias is not None:
        last.bias.zero_()
