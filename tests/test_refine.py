"""The refined prototypes (S71): where a user holds nearly every class, T3A's assignment is repeated
on the user's own features until no sample changes class, and the head keeps the mean of the first
prototypes and the last. A user holding a few classes, or whose groups gave its labels, keeps T3A's
prototypes as they were."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.engine import heads as HD


def _user(seed: int, classes: int = 10, dim: int = 16, per_class: int = 30, lean: float = 0.8, held=None,
          scale: float = 5.0):
    """A user's features in one cluster per class (and held-out samples of the same clusters), and
    a base layer whose rows lean from each class's cluster toward the next one's: the base misreads
    a share of every class, its prototypes inherit part of it."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    held = list(range(classes)) if held is None else held

    def draw():
        y = torch.tensor(held).repeat_interleave(per_class)
        return centres[y] + 0.35 * 4 / dim ** 0.5 * torch.randn(len(y), dim, generator=g), y

    (x, _), (hx, hy) = draw(), draw()
    last = nn.Linear(dim, classes)
    with torch.no_grad():
        last.weight.copy_(scale * F.normalize(centres + lean * centres.roll(-1, 0), dim=1))
        last.bias.zero_()
    return last, x, hx, hy


def _accuracy(layer, x, y) -> float:
    return float((HD.layer_logits(layer, x).argmax(1) == y).float().mean())


def _t3a(last, x, logits):
    """T3A's prototypes written as they were before S71."""
    layer = nn.Linear(last.in_features, last.out_features)
    layer.load_state_dict(last.state_dict())
    with torch.no_grad():
        layer.weight.copy_(HD._prototype_weight(last, x, logits))
        layer.bias.zero_()
    return layer


def _written(last, x, logits, **kw):
    layer = nn.Linear(last.in_features, last.out_features)
    layer.load_state_dict(last.state_dict())
    HD.write_prototypes(layer, x, logits, **kw)
    return layer


def test_a_user_of_every_class_reads_its_held_out_samples_better_with_refined_prototypes():
    gains = []
    for seed in range(5):
        last, x, hx, hy = _user(seed)
        logits = HD.layer_logits(last, x)
        assert HD.refines(logits)
        plain, refined = _accuracy(_t3a(last, x, logits), hx, hy), _accuracy(_written(last, x, logits), hx, hy)
        assert refined > plain, (seed, plain, refined)
        gains.append(refined - plain)
    assert sum(gains) / len(gains) >= 0.05, gains


def test_a_user_holding_a_few_classes_keeps_t3as_prototypes_unrefined():
    last, x, _, _ = _user(0, held=[2, 7], lean=0.3, scale=20.0)  # a base that reads them well
    logits = HD.layer_logits(last, x)
    assert not HD.refines(logits)
    assert torch.equal(_written(last, x, logits).weight, _t3a(last, x, logits).weight)


def test_prototypes_from_the_groups_labels_are_not_refined():
    last, x, _, _ = _user(1)
    logits = HD.layer_logits(last, x)
    labels = torch.full_like(logits, -30.0)
    labels[torch.arange(len(x)), logits.argmax(1)] = 0.0
    assert not HD.refines(logits, labels)
    grouped = _written(last, x, logits, labels=labels)
    assert torch.equal(grouped.weight, _t3a(last, x, labels).weight)


def test_refined_prototypes_are_unit_rows_between_the_first_and_the_last():
    last, x, _, _ = _user(2)
    logits = HD.layer_logits(last, x)
    first = HD._prototype_weight(last, x, logits)
    once = HD.refined_weight(first, x, rounds=0)  # no round: the first prototypes themselves
    assert torch.allclose(once, F.normalize(first, dim=1), atol=1e-6)
    refined = HD.refined_weight(first, x)
    assert torch.allclose(refined.norm(dim=1), torch.ones(len(refined)), atol=1e-5)
    assert not torch.allclose(refined, once, atol=1e-3)  # the rounds moved them
