"""The user's own groups (S68): a user holding a few classes forms as many tight groups in its
features as it holds classes; each group takes one class, no two the same, and the head reads those
pseudo-labels. Groups that are not the user's classes are refused."""
import copy

import pytest
import torch

from common.engine import clusters as CL


def _groups_of(sizes, dim=32, spread=0.05, seed=0):
    """Samples in tight groups of the given sizes around random centres, and each one's group."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g)
    x = torch.cat([c + spread * torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    return x, torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])


def _logits_for(y, right: float, wrong_to: dict | None = None, classes: int = 10):
    """Logits whose argmax is each sample's class `y` with probability about `right` (the rest on the
    class `wrong_to` names, else the next one): a base that errs but leans right."""
    out = torch.full((len(y), classes), -4.0)
    for i, c in enumerate(y.tolist()):
        other = (wrong_to or {}).get(c, (c + 1) % classes)
        out[i, c], out[i, other] = (1.0, 0.0) if i % 3 else (0.0, 1.0)  # a third of the samples read wrong
    return out * right


def test_a_user_of_four_classes_with_six_samples_each_forms_four_groups_that_are_its_classes():
    x, y = _groups_of([6] * 4)
    groups = CL.user_groups(x, 10)
    assert groups is not None and groups.count == 4
    for j in range(4):
        assert len(set(y[groups.labels == j].tolist())) == 1


def test_users_of_every_class_form_no_groups_fewer_than_the_classes():
    # two samples of each of ten classes: no class stands apart in a graph of five neighbours
    assert CL.user_groups(_groups_of([2] * 10)[0], 10) is None
    # ten classes that do stand apart are as many groups as the model has classes: nothing to learn
    assert CL.user_groups(_groups_of([6] * 10)[0], 10) is None


def test_each_group_takes_one_class_and_no_two_groups_take_the_same():
    """Both groups lean to class 0 on average; the assignment that explains both best gives the one
    leaning less to 0 its own runner-up class instead of a second class 0."""
    x, y = _groups_of([6, 6])
    groups = CL.user_groups(x, 10)
    p = torch.zeros(12, 10)
    p[y == 0] = torch.tensor([0.6, 0.3] + [0.0125] * 8)
    p[y == 1] = torch.tensor([0.5, 0.4] + [0.0125] * 8)
    labels = CL.group_logits(groups, p).argmax(1)
    assert set(labels[y == 0].tolist()) == {0} and set(labels[y == 1].tolist()) == {1}


def test_the_assignment_is_scipys_optimum_without_importing_scipy_on_the_device():
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for t in range(300):
        n = int(rng.integers(1, 10))
        m = int(rng.integers(n, 13))
        gain = rng.normal(size=(n, m)) if t % 2 else rng.integers(0, 3, size=(n, m)).astype(float)  # ties too
        got = CL.assignment(gain)
        rows, cols = linear_sum_assignment(gain, maximize=True)
        assert len(got) == n and len({c for _, c in got}) == n
        assert abs(sum(gain[r, c] for r, c in got) - gain[rows, cols].sum()) < 1e-9


def test_a_group_overturns_the_base_where_it_errs_on_a_few_of_its_samples():
    x, y = _groups_of([6] * 4)
    logits = _logits_for(y, right=3.0)
    assert float((logits.argmax(1) == y).float().mean()) < 0.7
    groups, labels, seen = CL.group_labels(x, logits)
    assert seen["groups_used"] and torch.equal(labels.argmax(1), y)


def test_groups_never_overturn_a_prediction_the_model_is_sure_of():
    """Two classes the model tells apart with certainty, merged in one group of the features:
    taking the group's class would overturn sure predictions, so the groups are refused."""
    x, y = _groups_of([6, 6])
    sure = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)  # the second group holds two classes
    logits = torch.full((12, 10), -20.0)
    logits[torch.arange(12), sure] = 20.0
    assert CL.user_groups(x, 10).count == 2
    got, labels, seen = CL.group_labels(x, logits)
    assert got is None and labels is None and seen["groups_used"] is False
    assert seen["group_overturns"] >= CL.CONFIDENT


def test_groups_the_model_predicts_many_more_classes_than_are_refused():
    """A user of every class whose features group by something else (a voice's noise): the model
    predicts more than SLACK classes beyond the groups, so they are not the user's classes."""
    from common.engine.adapt import SLACK

    x, y = _groups_of([8, 8])
    logits = torch.full((16, 10), 0.0)
    logits[torch.arange(16), torch.arange(16) % 8] = 2.0  # eight classes, two samples each, unsure
    got, labels, seen = CL.group_labels(x, logits)
    assert seen["classes_predicted"] - seen["groups"] > SLACK
    assert got is None and not seen["groups_used"]


def test_too_many_samples_for_the_graph_are_not_grouped():
    x, _ = _groups_of([CL.MAX_SAMPLES // 4 + 1] * 4)
    assert CL.user_groups(x, 10) is None


def test_seen_speakers_holding_four_digits_over_a_phone_line_gain_from_their_groups(fsdd_seen_base, monkeypatch):
    """Seen speakers, takes the base never heard, four digits over a telephone band (24 clips): the
    default with the groups their features form against the default refused them; none falls below
    its base by more than 2 points, and none below the default without them."""
    import numpy as np

    from common.engine.prune import fine_prune, personalized_model
    from common.model.train import accuracy
    from common.settings import PruneConfig
    from simulations import cohorts as CO

    base, meta, ds = fsdd_seen_base
    rng = np.random.default_rng([0, 99])
    with_groups, without, bases = [], [], []
    for spk in sorted(set(ds.groups.tolist())):
        u = CO.few_data_user(ds, spk, rng)
        x, hx = CO.telephone(u.x, 8000), CO.telephone(u.heldout_x, 8000)
        bases.append(accuracy(base, hx, u.heldout_y))
        for arm, out in ((True, with_groups), (False, without)):
            if not arm:
                monkeypatch.setattr(CL, "group_labels", lambda *a, **k: (None, None, {}))
            m = copy.deepcopy(base)
            r = fine_prune(m, x, PruneConfig(), base_meta=meta)
            out.append(accuracy(personalized_model(m, r), hx, u.heldout_y))
        monkeypatch.undo()
    assert sum(with_groups) / len(with_groups) >= sum(without) / len(without) + 0.03, (with_groups, without)
    assert all(w >= b - 0.02 for w, b in zip(with_groups, bases)), (with_groups, bases)
    assert all(w >= o - 1e-9 for w, o in zip(with_groups, without)), (with_groups, without)


@pytest.mark.parametrize("head", ["blend", "prototypes"])
def test_a_head_written_from_group_labels_reads_them_not_the_models_own(head):
    from common.engine.heads import HEADS

    x, y = _groups_of([6] * 4, dim=16)
    logits = _logits_for(y, right=3.0)
    last = torch.nn.Linear(16, 10)
    a, b = copy.deepcopy(last), copy.deepcopy(last)
    onehot = torch.full((24, 10), -30.0)
    onehot[torch.arange(24), y] = 0.0
    HEADS[head].write(a, x, logits, labels=onehot)
    HEADS[head].write(b, x, logits)
    assert not torch.allclose(a.weight, b.weight)  # not the model's own pseudo-labels
    if head == "prototypes":  # exactly the prototypes of the given labels
        c = copy.deepcopy(last)
        HEADS[head].write(c, x, onehot)
        assert torch.equal(a.weight, c.weight)


def _few_class_base(seed: int, n_per: int):
    """A network without BatchNorm whose features of four classes form tight groups, and whose
    output layer nearly ties classes 0 and 1 with distractors 4 and 5 along a direction their
    samples vary in (its pseudo-labels scatter over six classes), with the vendor's record."""
    from common.engine.adapt import vendor_record

    g = torch.Generator().manual_seed(seed)
    dim = 16
    centres = torch.randn(10, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True)
    u = torch.randn(10, dim, generator=g)
    u = u - (u * centres).sum(1, keepdim=True) * centres
    u = u / u.norm(dim=1, keepdim=True)

    def draw(classes, n):
        ys = torch.tensor(classes).repeat_interleave(n)
        return centres[ys] + 0.05 * torch.randn(len(ys), dim, generator=g), ys

    w, b = 12 * centres.clone(), torch.zeros(10)
    w[4:6] = 12 * centres[:2] + 24 * u[:2]
    b[:2] = 0.6
    model = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(dim))
        model[0].bias.zero_()
        model[1].weight.copy_(w)
        model[1].bias.copy_(b)
    xv, yv = draw(list(range(10)), 20)
    x, _ = draw([0, 1, 2, 3], n_per)
    return model, vendor_record(model, xv, yv), x


def test_a_fixed_target_rebuilds_a_grouped_users_prototypes_from_the_groups_labels(monkeypatch):
    """At a fixed target the prototypes are written again on the pruned features; a grouped user's
    are read from its groups' labels then too, not from the pruned model's own predictions."""
    from common.engine import heads as HD
    from common.engine.prune import fine_prune
    from common.settings import PruneConfig

    model, meta, x = _few_class_base(1, 12)
    calls = []
    real = HD.HEADS["prototypes"]

    def spy(last, feats, logits, labels=None):
        calls.append(labels)
        real.write(last, feats, logits, labels=labels)

    monkeypatch.setitem(HD.HEADS, "prototypes", HD.Head(spy, rebuild_at_target=True))
    r = fine_prune(copy.deepcopy(model), x, PruneConfig(target_sparsity=0.5), base_meta=meta)
    assert r.adaptation["head"] == "prototypes" and r.adaptation["head_groups"] is True
    assert len(calls) == 2 and all(c is not None for c in calls)  # before pruning and the rebuild
    assert torch.equal(calls[0], calls[1])
