"""Which label-free adaptation is safe and best, measured per user before any pruning, on every
bench cohort and the few-class ResNet18 users (held-out labels score only): BatchNorm recalibrated
fully, on the input side only (stem), or per channel where the class mix cannot explain the move
(spread-3: kappa 3), with the base's output layer, T3A's prototypes or their blend; then the
check's thresholds chosen leave-one-cohort-out (loco.md). Writes one row per user x recipe
(study.csv, study.json). WEIGHTS (0, 0.25, 0.5, 0.75, 1) gives S1's mixtures with the base's
statistics; S6's shrunk prototypes and S8's EM class prior of docs/personalization.md were
measured with this script as of commit 6008969, which had them.

    python -m simulations.adapt_study --fsdd ../shared/data/fsdd --out runs/study
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from common.cli import first_sentence
from common.data import readers as D
from common.engine.adapt import (
    AGREE,
    DEEP_SHIFT,
    KAPPA,
    classes_predicted,
    deep_shift,
    spread_for,
    stem_count,
    stem_profile,
)
from common.engine.bn import bn_prior, recalibrate_bn
from common.engine.forward import features_and_logits
from common.engine.heads import HEADS as HEAD_REGISTRY
from common.engine.heads import spread_classes
from common.io import atomic_write_csv, atomic_write_text
from simulations import baselines as BL
from simulations import bench_tasks as BT

WEIGHTS = (0.0, 1.0)                      # the user's share of each layer's statistics
PROFILES = {"all": None, "stem": "stem"}  # which layers take it
HEADS = {"linear": None, "t3a": "prototypes", "lens": "blend"}  # row name -> common.engine.heads writer


def cohorts(out: Path, fsdd: str | None, names, resnet64: str | None = None):
    jobs = {"digits": lambda: BT.digits_task(out, 0, 10, None),
            "digits-style": lambda: BT.digits_task(out, 0, 10, None, style=True),
            "resnet-few": lambda: BT.resnet_few_task(out, 0)}
    if fsdd:
        ds = D.load_fsdd(fsdd)
        jobs.update({"fsdd-loso": lambda: BT.fsdd_loso_task(out, ds, 0, 12, print),
                     "fsdd-seen": lambda: BT.fsdd_seen_task(out, ds, 0, 12, print),
                     "fsdd-cond": lambda: BT.fsdd_seen_task(out, ds, 0, 12, print, conditions=True),
                     "fsdd-few": lambda: BT.fsdd_loso_task(out, ds, 0, 12, print, few=True)})
    if resnet64:
        jobs["resnet18-64"] = lambda: resnet64_users(resnet64)
    for n in names:
        if n in jobs:
            yield n, jobs[n]()


def resnet64_users(base_path: str, n_users: int = 6):
    """The few-class ResNet18 users of simulations/resnet_users.py --size 64, on the base.pt it wrote
    (its vendor record included)."""
    import torch.nn.functional as F

    from common.data.protocol import simulated_user
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config
    from simulations.cohorts import BenchUser

    base, meta, _ = load_checkpoint(base_path)
    size = meta["features"]["image_size"]
    up = lambda x: F.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1)  # noqa: E731
    cfg = merged_config({}, {})
    users = []
    for pid in range(n_users):
        u = simulated_user(cfg, pid, 10)
        users.append((base, meta, BenchUser(str(pid), up(u.unlabeled), None, up(u.heldout_x), u.heldout_y)))
    return users


SPREAD = "spread-3-0"  # the rows of common.engine.adapt's class-spread recalibration (kappa = adapt.KAPPA)


@torch.no_grad()
def user_rows(cohort: str, base, meta: dict, user) -> list[dict]:
    """One row per recipe: the recalibration, then the engine's own output heads (common.engine.heads)."""
    rows = []
    prior = bn_prior(base)
    acc = lambda lg: (lg.argmax(1) == user.heldout_y).float().mean().item()  # noqa: E731
    base_acc = None
    spread = spread_for(base, meta)  # the vendor's record, as the engine reads it
    grid = [(w, prof, fn) for w, (prof, fn) in itertools.product(WEIGHTS, PROFILES.items())
            if not (w == 0 and prof != "all")] + [(1.0, SPREAD, None)]
    user_logits, shift = {}, None
    for w, prof, fn in grid:
        m = copy.deepcopy(base).eval()
        if prof == SPREAD:
            recalibrate_bn(m, user.x, 256, prior=prior, spread=spread, kappa=KAPPA)
        elif w > 0:
            recalibrate_bn(m, user.x, 256, weight=w, prior=prior,
                           profile=stem_profile(m) if fn == "stem" else fn)
        if w == 1 and prof == "all" and spread is not None:  # what the engine's check reads of full recalibration
            shift = deep_shift(bn_prior(m), prior, spread, stem_count(m))
        fu, lu, last = features_and_logits(m, user.x)
        fh, lh, _ = features_and_logits(m, user.heldout_x)
        user_logits[(w, prof)] = lu
        for hname, writer in HEADS.items():
            sh = lh
            if writer is not None:
                head = copy.deepcopy(last)
                HEAD_REGISTRY[writer].write(head, fu, lu)
                sh = head(fh)
            r = {"cohort": cohort, "user": user.user_id, "n": len(user.x), "w": w, "profile": prof, "head": hname,
                 "prior": "none", "acc": acc(sh), "keff": spread_classes(lu), "k_pred": classes_predicted(lu)}
            if w == 0 and hname == "linear":
                base_acc = r["acc"]
            rows.append(r)
    lame = BL.lame(base, user.x)
    rows.append({"cohort": cohort, "user": user.user_id, "n": len(user.x), "w": -1, "profile": "-", "head": "lame",
                 "prior": "none",
                 "acc": acc(lame.predict(user.heldout_x))})
    full, safe = user_logits.get((1.0, "all")), user_logits.get((1.0, SPREAD))
    agree = None if full is None or safe is None else float((full.argmax(1) == safe.argmax(1)).float().mean())
    for r in rows:
        r.update(base=base_acc, deep_shift=shift, agreement=agree)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--fsdd")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--cohorts", default="digits,digits-style,resnet-few,fsdd-loso,fsdd-seen,fsdd-cond,fsdd-few,"
                                        "resnet18-64")
    p.add_argument("--resnet64", help="the base.pt of simulations/resnet_users.py --size 64: its users join "
                                      "(cohort resnet18-64)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    rows, t0 = [], time.time()
    for name, users in cohorts(out, a.fsdd, a.cohorts.split(","), a.resnet64):
        for base, meta, u in users:
            rows += user_rows(name, base, meta, u)
        print(f"[{time.time() - t0:5.0f} s] {name}: {len(users)} users", file=sys.stderr, flush=True)
    atomic_write_csv(out / "study.csv", rows)
    atomic_write_text(out / "study.json", json.dumps(rows))
    table(rows)
    if {"all", "stem", SPREAD} <= {r["profile"] for r in rows}:
        atomic_write_text(out / "loco.md", loco(rows))
        print(loco(rows))


def table(rows):
    import collections
    by = collections.defaultdict(list)
    for r in rows:
        by[(r["cohort"], r["w"], r["profile"], r["head"], r["prior"])].append(r["acc"] - r["base"])
    cohorts_ = sorted({r["cohort"] for r in rows})
    recipes = sorted({k[1:] for k in by})
    print("recipe".ljust(28) + "".join(c[:12].rjust(14) for c in cohorts_) + "   mean  worst")
    for rc in recipes:
        cells, ws = [], []
        for c in cohorts_:
            v = by.get((c, *rc), [])
            if v:
                cells.append(f"{sum(v) / len(v):+.3f}/{min(v):+.2f}".rjust(14))
                ws.append((sum(v) / len(v), min(v)))
            else:
                cells.append("".rjust(14))
        print(f"{str(rc):28s}" + "".join(cells) + f"  {sum(m for m, _ in ws) / len(ws):+.3f} {min(w for _, w in ws):+.2f}")



# ---------------------------------------------------------------- leave-one-cohort-out choice
DEEP_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def decide(d: dict, slack: int, min_support: float, fallback: str, deep: float = 0.0) -> float:
    """One user's gain over the base under the auto policy: full recalibration where the layers past
    the input side moved at least `deep` beyond their class mix (deep_shift), it predicts at most
    `slack` classes beyond the class-spread recalibration and agrees with it on AGREE of the user's
    samples (else `fallback`); then the prototype head where the user gives `min_support` samples
    per class, else the blend."""
    a, s = d[("all", "linear")], d[(SPREAD, "linear")]
    full = (a["k_pred"] <= s["k_pred"] + slack and (a.get("agreement") is None or a["agreement"] >= AGREE)
            and (a.get("deep_shift") is None or a["deep_shift"] >= deep))
    bn = "all" if full else fallback
    lin = d[(bn, "linear")]
    head = "t3a" if lin["n"] / lin["keff"] >= min_support else "lens"
    return d[(bn, head)]["acc"] - d[("base", "linear")]["acc"]


def loco(rows) -> str:
    """The policy's thresholds chosen on all cohorts but one, judged on that one, for each cohort:
    the choice maximizes the mean cohort gain less every point a cohort's worst user falls more than
    2 points below its base; among equal choices the smaller slack, and the middle of the plateau
    of deep-shift thresholds that score alike (the widest margin on both sides)."""
    import collections
    import math

    users = collections.defaultdict(dict)
    for r in rows:
        key = "base" if r["w"] == 0 else r["profile"] if r["w"] == 1 else f"{r['profile']}@{r['w']}"
        users[(r["cohort"], r["user"])][(key, r["head"])] = r
    cohorts_ = sorted({c for c, _ in users})

    def stats(c, p):
        v = [decide(d, *p) for (cc, _), d in users.items() if cc == c]
        return sum(v) / len(v), min(v)

    grid = list(itertools.product((0, 1, 2), (0, 5, 8, 10, 12, 15, 20, math.inf), ("stem", SPREAD), DEEP_GRID))

    def score(p, cs):
        st = [stats(c, p) for c in cs]
        return sum(m for m, _ in st) / len(st) - sum(max(0.0, -w - 0.02) for _, w in st)

    def choose(cs):
        scored = {p: score(p, cs) for p in grid}
        top = max(scored.values())
        best = [p for p, v in scored.items() if v > top - 1e-9]
        head = min(best, key=lambda p: (p[0], p[1], p[2]))[:3]  # the smaller slack, then support
        plateau = sorted(p[3] for p in best if p[:3] == head)
        return (*head, plateau[len(plateau) // 2]), (plateau[0], plateau[-1])

    lines = ["| held-out cohort | chosen on the other cohorts (slack, min support, fallback, deep shift) "
             "| deep-shift plateau | held-out mean gain | held-out worst user |", "|---|---|---|---|---|"]
    for c in cohorts_:
        best, (lo, hi) = choose([x for x in cohorts_ if x != c])
        m, w = stats(c, best)
        lines.append(f"| {c} | {best[0]}, {best[1]}, {best[2]}, {best[3]} | {lo}-{hi} | {m:+.3f} | {w:+.3f} |")
    shipped = (2, 10, "stem", DEEP_SHIFT)
    lines += ["", f"Shipped {shipped} on every cohort (mean gain / worst user): " + ", ".join(
        f"{c} {m:+.3f}/{w:+.3f}" for c in cohorts_ for m, w in [stats(c, shipped)])]
    lines += ["", "Per user: deep shift, agreement of full with the class-spread recalibration, and full "
              "recalibration's gain over the input side's (both with T3A's prototypes):", "",
              "| cohort | user | deep shift | agreement | full - stem |", "|---|---|---|---|---|"]
    for (c, u), d in sorted(users.items()):
        a = d[("all", "linear")]
        sh = "-" if a.get("deep_shift") is None else f"{a['deep_shift']:.3f}"
        ag = "-" if a.get("agreement") is None else f"{a['agreement']:.2f}"
        lines.append(f"| {c} | {u} | {sh} | {ag} | {d[('all', 't3a')]['acc'] - d[('stem', 't3a')]['acc']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
