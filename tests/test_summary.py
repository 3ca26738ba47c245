"""Mask summaries: sizes against the issue's targets, sketch accuracy against exact Jaccard,
bit-exact bitmaps, and rejection of every kind of malformed summary."""
import copy
import struct

import numpy as np
import pytest
import torch

from common.data import partition as PT
from common.engine.prune import fine_prune
from common.model.architectures import build_model, prunable_layers
from common.model.checkpoint import fingerprint
from common.model.mask import Mask
from common.settings import PruneConfig
from common.wire.federation import model_bytes
from common.wire.summary import MAGIC, SKETCH_BITS, SummaryError, build_summary, decode, encode, usage_histograms


def _hist(model):
    return usage_histograms({n: m.weight.abs() for n, m in prunable_layers(model).items()})


def _shapes(model):
    return {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}


@pytest.fixture(scope="module")
def user_masks(_digits_base, digits, digits_split):
    """Real fine-pruned masks of 8 digits users (2-3 classes each)."""
    pool = digits_split[1]
    sub = digits.subset(pool)
    users = PT.make_users(sub, PT.partition_class_subsets(sub.y.numpy(), 8, (2, 3), 3), 0.3, 3)
    masks = []
    for u in users:
        res = fine_prune(copy.deepcopy(_digits_base), u.unlabeled, PruneConfig(restrict_outputs=True, recalibrate_bn=False))
        masks.append(res.mask)
    return masks


@pytest.mark.parametrize("arch", ["smallcnn", "kws"])
def test_upload_sizes_meet_targets(arch):
    model = build_model(arch)
    g = torch.Generator().manual_seed(0)
    mask = Mask({n: torch.rand(s, generator=g) > 0.7 for n, s in _shapes(model).items()})
    size = model_bytes(model)
    fp = fingerprint(model)
    sizes = {lvl: len(encode(build_summary(mask, _hist(model), lvl, fp, size))) for lvl in ("stats", "sketch", "bitmap")}
    assert sizes["bitmap"] <= size / 32
    assert sizes["sketch"] <= 0.005 * size
    assert sizes["stats"] < sizes["sketch"]


def sketch_jaccard(a, b) -> tuple[float, list[float]]:
    """The oracle for the server's all-pairs sketch estimator (server.analysis): one pair at a time,
    written out from the b-bit MinHash estimate (Li and Koenig 2010): per layer the share of equal
    bins less the chance collision rate, then the layers' intersections and unions summed. Returns
    (whole model, per layer)."""
    inter = union = 0.0
    collide = 2.0 ** -SKETCH_BITS
    per_layer = []
    for sa, sb, pa, pb in zip(a.sketch, b.sketch, a.pruned, b.pruned):
        if pa == 0 or pb == 0:
            j = 1.0 if pa == pb else 0.0
        else:
            j = min(1.0, max(0.0, (float(np.mean(sa == sb)) - collide) / (1 - collide)))
        per_layer.append(j)
        i = j * (pa + pb) / (1 + j)
        inter += i
        union += pa + pb - i
    return (1.0 if union == 0 else inter / union), per_layer


def test_sketch_estimates_jaccard_within_005_of_exact(user_masks, _digits_base):
    fp, size, shapes = fingerprint(_digits_base), model_bytes(_digits_base), _shapes(_digits_base)
    hist = _hist(_digits_base)
    from server.analysis import similarity

    summ = {f"u{i}": decode(encode(build_summary(m, hist, "sketch", fp, size)), fp, shapes)
            for i, m in enumerate(user_masks)}
    ids, sim, method, _ = similarity(summ)
    assert method == "estimated (sketch)"
    errs = [abs(sim[a, b] - user_masks[int(ids[a][1:])].jaccard(user_masks[int(ids[b][1:])]))
            for a in range(len(ids)) for b in range(a + 1, len(ids))]
    assert max(errs) <= 0.05
    exact = [user_masks[i].jaccard(user_masks[j]) for i in range(8) for j in range(i + 1, 8)]
    assert max(exact) - min(exact) > 0.05  # the users really differ: the test can fail


def test_bitmap_round_trip_is_bit_exact(user_masks, _digits_base):
    fp, shapes = fingerprint(_digits_base), _shapes(_digits_base)
    for m in user_masks[:3]:
        back = decode(encode(build_summary(m, _hist(_digits_base), "bitmap", fp, model_bytes(_digits_base))), fp, shapes)
        assert back.bitmap == m
        assert back.pruned == [int((~v).sum()) for v in m.layers.values()]


MALFORMED = ["bad magic", "truncated", "wrong version", "wrong fingerprint", "wrong layer count",
             "count out of range", "negative count", "bad histogram", "bitmap disagrees", "bitmap cut",
             "not bytes", "garbage zlib", "over the size limit", "sketch cut", "NaN count", "bool count",
             "sketch on a bitmap level"]


@pytest.mark.badinput
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_summary_is_rejected_with_a_reason(_digits_base, user_masks, case):
    fp, shapes, size = fingerprint(_digits_base), _shapes(_digits_base), model_bytes(_digits_base)
    hist = _hist(_digits_base)
    good = build_summary(user_masks[0], hist, "bitmap", fp, size)
    raw = encode(good)

    def variant(**changes):
        s = copy.copy(good)
        for k, v in changes.items():
            setattr(s, k, v)
        return encode(s)

    n = struct.unpack_from("<I", raw, len(MAGIC))[0]
    sk = encode(build_summary(user_masks[0], hist, "sketch", fp, size))
    data, reason, limit = {
        "bad magic": (b"XXXXXX" + raw[6:], "bad magic", None),
        "truncated": (raw[:len(MAGIC) + 10], "corrupt summary header", None),
        "wrong version": (variant(version=99), "format version 99", None),
        "wrong fingerprint": (variant(fingerprint="0" * 32), "not " + fp[:12], None),
        "wrong layer count": (variant(pruned=good.pruned[:-1]), "layers", None),
        "count out of range": (variant(pruned=[10 ** 9] + good.pruned[1:]), "out of range", None),
        "negative count": (variant(pruned=[-1] + good.pruned[1:]), "out of range", None),
        "bad histogram": (variant(hist=[[1] * 8] * len(hist)), "histogram", None),
        "bitmap disagrees": (variant(pruned=[good.pruned[0] - 1] + good.pruned[1:]), "disagrees", None),
        "bitmap cut": (raw[:-20], "bitmap", None),
        "not bytes": ("a string", "expected bytes", None),
        "garbage zlib": (raw[:len(MAGIC) + 4 + n + 4] + b"\x00\x01garbage", "zlib", None),
        "over the size limit": (raw, "exceeds the limit", 100),
        "sketch cut": (sk[:-3], "sketch", None),
        "NaN count": (variant(pruned=[float("nan")] + good.pruned[1:]), "out of range", None),
        "bool count": (variant(pruned=[True] + good.pruned[1:]), "out of range", None),
        "sketch on a bitmap level": (raw[:len(MAGIC) + 4 + n] + struct.pack("<I", 2) + b"ab" + raw[len(MAGIC) + 8 + n:],
                                     "unexpected sketch", None),
    }[case]
    with pytest.raises(SummaryError, match=reason):
        decode(data, fp, shapes, **({"max_bytes": limit} if limit else {}))


@pytest.mark.parametrize("level,eps", [("bitmap", None), ("bitmap", 2.0), ("sketch", None)])
def test_all_pairs_similarity_equals_the_pair_by_pair_estimators(user_masks, _digits_base, level, eps):
    """server.analysis.similarity computes all pairs as matrix products; each entry and each
    layer's mean agreement equal the pair-by-pair estimators (exact Jaccard, the private
    estimator, the sketch estimator) to 1e-9."""
    from common.wire.privacy import estimate_jaccard
    from server.analysis import similarity

    fp, size = fingerprint(_digits_base), model_bytes(_digits_base)
    hist = _hist(_digits_base)
    masks = user_masks + [Mask.dense(_digits_base)]  # a user that pruned nothing: empty sets
    summ = {f"u{i}": build_summary(m, hist, level, fp, size, epsilon=eps, privacy_seed=i) for i, m in enumerate(masks)}
    ids, sim, method, agreement = similarity(summ)
    ss = [summ[i] for i in ids]

    def flat(s):
        return [(~t).flatten().numpy() for t in s.bitmap.layers.values()]

    def pair(a, b):
        if level == "sketch":
            return sketch_jaccard(a, b)
        fa, fb = flat(a), flat(b)
        if eps is not None:
            return (estimate_jaccard(np.concatenate(fa), np.concatenate(fb), eps),
                    [estimate_jaccard(x, y, eps) for x, y in zip(fa, fb)])
        j = lambda x, y: 1.0 if not (x | y).any() else (x & y).sum() / (x | y).sum()
        return j(np.concatenate(fa), np.concatenate(fb)), [j(x, y) for x, y in zip(fa, fb)]
    layers = []
    for i in range(len(ss)):
        for k in range(i + 1, len(ss)):
            whole, per_layer = pair(ss[i], ss[k])
            assert abs(sim[i, k] - whole) < 1e-9 and sim[i, k] == sim[k, i]
            layers.append(per_layer)
    assert np.allclose(agreement, np.mean(layers, axis=0), atol=1e-9)
    assert np.all(np.diag(sim) == 1.0)
