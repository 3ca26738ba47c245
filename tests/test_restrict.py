"""Output restriction (common/engine/restrict.py, common/model/restricted.py): the classes a user's
data is never predicted as become impossible, as pruned output rows, as -inf logits, and through
the wrapper a device predicts with; an unsure runner-up keeps its class."""
import torch

from common.engine.restrict import apply_restriction, doubtful_removals, restrict_logits, restricted_classes
from common.model.architectures import build_model, prunable_layers
from common.model.mask import Mask
from common.model.restricted import restricted_model


def _logits(rows: list[tuple[int, float]]) -> torch.Tensor:
    """One row per sample: (top class, its logit); class 9 always trails at 0.9 below it."""
    out = torch.full((len(rows), 10), -5.0)
    for i, (c, v) in enumerate(rows):
        out[i, c] = v
        out[i, 9] = v - 0.9 if c != 9 else v
    return out


def test_the_kept_classes_are_those_predicted_and_an_unsure_runner_up():
    lg = _logits([(1, 2.0)] * 10 + [(4, 2.0)] * 10)
    assert restricted_classes(lg, 0.05, margin=0.0) == [1, 4]
    # top probability less than 0.5 above the runner-up (class 9): the runner-up stays too
    assert restricted_classes(lg, 0.05, margin=0.5) == [1, 4, 9]
    assert doubtful_removals(lg, [1, 4], 0.05) == [9]  # a class the model keeps confusing


def test_a_restricted_model_never_predicts_a_removed_class():
    torch.manual_seed(0)
    model = build_model("smallcnn").eval()
    mask = apply_restriction(model, Mask.dense(model), [2, 5])
    last = list(prunable_layers(model))[-1]
    assert mask.layers[last].reshape(10, -1).any(1).nonzero().flatten().tolist() == [2, 5]
    wrapped = restricted_model(model, [2, 5])
    with torch.no_grad():
        pred = wrapped(torch.rand(64, 1, 8, 8)).argmax(1)
    assert set(pred.tolist()) <= {2, 5}
    lg = restrict_logits(torch.randn(8, 10), [2, 5])
    assert torch.isinf(lg[:, [0, 1, 3, 4, 6, 7, 8, 9]]).all() and torch.isfinite(lg[:, [2, 5]]).all()
