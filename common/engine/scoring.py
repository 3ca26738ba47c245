"""Importance criteria. A scorer maps (weight, layer stats, generator) to a score per connection;
low scores are pruned first. Add one with @register("name"); what a scorer is (structured: one
score per output unit) and what statistics it needs ("outputs", "classes") are attributes of the
scorer itself."""
from __future__ import annotations

import math

import torch

from common.engine.stats import LayerStats
from common.model.architectures import prunable_layers, require_reader_links

SCORERS = {}


def register(name: str, structured: bool = False, needs: tuple = (), network: bool = False):
    """`structured`: one score per output unit (whole rows pruned together). `needs`: extra
    statistics the scorer reads: "outputs" (mean activation, firing rate), "classes" (per
    pseudo-class sums of fully-connected inputs). `network`: the scorer sees the whole model,
    fn(model, stats) -> {layer: one score per output unit} (a layer alone cannot know what its
    units send on), instead of fn(weight, layer stats, generator)."""
    def deco(fn):
        fn.structured, fn.needs, fn.network = structured, frozenset(needs), network
        SCORERS[name] = fn
        return fn
    return deco


def _broadcast_inputs(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-input-feature vector -> shape of w (out, in, *kernel)."""
    return v.view(1, -1, *([1] * (w.dim() - 2))).to(w)


def broadcast_outputs(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (w.dim() - 1))).to(w).expand_as(w)


@register("usage")
def usage_score(w: torch.Tensor, st: LayerStats, gen=None) -> torch.Tensor:
    """|w_ij| * ||x_j||: the signal a synapse actually carries on this user's data."""
    return w.abs() * _broadcast_inputs(st.input_norm(), w)


@register("usage-share")
def usage_share_score(w: torch.Tensor, st: LayerStats, gen=None) -> torch.Tensor:
    """usage relative to the unit it feeds: |w_ij| ||x_j|| / ||(|w_ik| ||x_k||)_k||_2. A synapse
    carrying a small share of its unit's input signal goes first, whatever the layer's scale, so
    one global ranking does not strip a layer just because its activations are small."""
    u = usage_score(w, st)
    return u / (u.reshape(u.shape[0], -1).norm(dim=1).view(-1, *([1] * (w.dim() - 1))) + 1e-12)


@register("firing", structured=True, needs=("outputs",))
def firing_score(w: torch.Tensor, st: LayerStats, gen=None) -> torch.Tensor:
    """Whole units ranked by how often they fire for this user (mean activation breaks ties)."""
    rate, act = st.firing_rate(), st.mean_activation()
    return broadcast_outputs(rate + 1e-3 * act / (act.max() + 1e-12), w)


@register("channel-usage", structured=True, network=True)
def channel_usage_units(model, stats) -> dict:
    """Per unit u of each producer layer: sqrt(sum over the reader's inputs j fed by u of
    (||x_j|| ||W_reader[:, j]||)^2), the RMS signal u sends on, measured after its BatchNorm and
    ReLU, weighted by how strongly its one reader listens. Divided by the layer's median, so one
    global ranking compares units by their share within their layer. Producers are the layers
    whose units have one reader (common.model.architectures.reader_links: a chain model's layers, the inside
    of ResNet blocks); every other layer's units score +inf and stay."""
    links = require_reader_links(model, "channel-usage")
    layers = prunable_layers(model)
    out = {name: torch.full((m.weight.shape[0],), math.inf) for name, m in layers.items()}
    for name, nxt in links:
        units = layers[name].weight.shape[0]
        wn = layers[nxt].weight.detach()
        listen = wn.transpose(0, 1).reshape(wn.shape[1], -1).norm(dim=1)  # per input feature j
        signal = stats.layers[nxt].input_norm().to(listen) * listen
        per = wn.shape[1] // units  # inputs per unit (flattened spatial positions before an fc)
        u = signal.reshape(units, per).pow(2).sum(1).sqrt()
        out[name] = (u / u.median().clamp_min(1e-12)).cpu()
    return out


@register("discriminative", needs=("classes",))
def discriminative_score(w: torch.Tensor, st: LayerStats, gen=None) -> torch.Tensor:
    """|w_ij| re-ranked, within each fully-connected layer, by how well input feature j separates
    this user's pseudo-classes (the model's own predictions after adaptation, no labels):
    |w_ij| * sqrt(eta_j / mean_k eta_k), eta_j the share of feature j's variance explained by the
    pseudo-classes. The division keeps each layer's overall scale, so the global ranking allocates
    sparsity across layers as magnitude does; within a layer, features that do not tell this
    user's classes apart go first. Convolution inputs (no per-sample scalar per channel that
    carries the class) are ranked by magnitude alone."""
    eta = st.class_separation()
    if eta is None:
        return w.abs()
    return w.abs() * _broadcast_inputs((eta / eta.mean().clamp_min(1e-12)).sqrt(), w)


@register("magnitude")
def magnitude_score(w: torch.Tensor, st: LayerStats = None, gen=None) -> torch.Tensor:
    """|w|: data-blind control."""
    return w.abs()


@register("random")
def random_score(w: torch.Tensor, st: LayerStats = None, gen=None) -> torch.Tensor:
    """Uniform random: control."""
    return torch.rand(w.shape, generator=gen, device="cpu").to(w.device)


def get_scorer(name: str):
    if name not in SCORERS:
        raise ValueError(f"unknown scoring '{name}' (choose from: {', '.join(SCORERS)})")
    return SCORERS[name]


def usage_scores(model, stats) -> dict:
    """How much signal each connection of `model` carries (|w| x input norm), per prunable layer,
    from the statistics of a fine-pruning pass: what a summary's usage histograms count."""
    usage = get_scorer("usage")
    return {n: usage(m.weight.detach().cpu(), stats.layers[n]) for n, m in prunable_layers(model).items()}
