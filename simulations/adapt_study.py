"""Which label-free adaptation is safe and best, measured per user before any pruning, on every
bench cohort and the few-class ResNet18 users (held-out labels score only): BatchNorm recalibrated
fully, on the input side only (stem), or per channel where the class mix cannot explain the move
(spread-3: kappa 3), with the base's output layer, T3A's prototypes or their blend; then the
check's thresholds chosen leave-one-cohort-out (loco.md). Writes one row per user x recipe
(study.csv, study.json). The refuted recipes of docs/personalization.md came from the same code
with a wider grid: WEIGHTS (0, 0.25, 0.5, 0.75, 1: a mixture with the base's statistics), HEADS
with T3A's base rows counted K = 5 or 20 times (T3AHead's prior_weight), PRIORS with EM's class
frequencies (heads.label_shift_prior, strength 1 or 5).

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

from common import baselines as BL
from common import data as D
from common import protocol as P
from common.adapt import class_spread
from common.forward import bn_prior, features_and_logits, recalibrate_bn
from common.heads import T3AHead, label_shift_prior
from common.io import atomic_write_csv, atomic_write_text
from simulations import bench_tasks as BT

WEIGHTS = (0.0, 1.0)                      # the user's share of each layer's statistics
PROFILES = {"all": None, "stem": "stem"}  # which layers take it
HEADS = {"linear": None, "t3a": 1.0, "lens": "lens"}  # lens: the blend head; a number: T3A with K
PRIORS = {"none": None}                   # or {"em-a5": 5.0}: EM's class frequencies as an offset


def stem_profile(model, extra: int = 0):
    """The BatchNorm layers up to the first one with more than one channel (+ `extra` more)."""
    from common.adapt import stem_count

    n = stem_count(model) + extra
    return lambda i, _layers: float(i < n)


def cohorts(out: Path, fsdd: str | None, names):
    jobs = {"digits": lambda: BT.digits_task(out, 0, 10, None),
            "digits-style": lambda: BT.digits_task(out, 0, 10, None, style=True),
            "resnet-few": lambda: BT.resnet_few_task(out, 0)}
    if fsdd:
        ds = D.load_fsdd(fsdd)
        jobs.update({"fsdd-loso": lambda: BT.fsdd_loso_task(out, ds, 0, 12, print),
                     "fsdd-seen": lambda: BT.fsdd_seen_task(out, ds, 0, 12, print),
                     "fsdd-cond": lambda: BT.fsdd_seen_task(out, ds, 0, 12, print, conditions=True),
                     "fsdd-few": lambda: BT.fsdd_loso_task(out, ds, 0, 12, print, few=True)})
    for n in names:
        if n in jobs:
            yield n, jobs[n]()


_DS = {}
_SPREAD = {}


def vendor_spread(cohort: str, base, user, fsdd: str | None):
    """eta^2 per BatchNorm channel on the data this cohort's base was trained on (cached)."""
    spk = user.user_id.split(":")[0] if cohort in ("fsdd-loso", "fsdd-few") else ""
    key = (cohort if cohort not in ("digits-style",) else "digits", spk)
    key = ("fsdd-seen", "") if cohort == "fsdd-cond" else key
    if key in _SPREAD:
        return _SPREAD[key]
    if cohort.startswith("fsdd"):
        ds = _DS.setdefault("fsdd", D.load_fsdd(fsdd))
        idx = P.seen_speaker_split(ds)[0] if key[0] == "fsdd-seen" else P.vendor_indices("fsdd", ds, 0, 0.5, spk)[0]
        x, y = ds.x[torch.as_tensor(idx)], ds.y[torch.as_tensor(idx)]
    else:
        ds = _DS.setdefault("digits", D.load_digits())
        if cohort == "resnet-few":
            idx = torch.as_tensor(P.vendor_and_pool("digits", ds, 0)[0])
            x, y = BT.resnet_input(ds.x[idx]).repeat(1, 3, 1, 1), ds.y[idx]
        else:
            idx = torch.as_tensor(P.vendor_indices("digits", ds, 0, 0.5)[0])
            x, y = ds.x[idx], ds.y[idx]
    _SPREAD[key] = class_spread(base, x, y)
    return _SPREAD[key]


SPREAD_KAPPA = ((3.0, 0.0, False),)  # (kappa, -, -): the hard rule of common.forward.explained_weight


@torch.no_grad()
def user_rows(cohort: str, base, user, fsdd=None) -> list[dict]:
    rows = []
    prior = bn_prior(base)
    acc = lambda lg: (lg.argmax(1) == user.heldout_y).float().mean().item()  # noqa: E731
    base_acc = None
    spread = vendor_spread(cohort, base, user, fsdd)
    grid = [(w, prof, fn, None) for w, (prof, fn) in itertools.product(WEIGHTS, PROFILES.items())
            if not (w == 0 and prof != "all")]
    grid += [(1.0, f"spread-{k[0]:g}-{k[1]:g}{'s' if k[2] else ''}", None, k) for k in SPREAD_KAPPA]
    for w, prof, fn, kappa in grid:
        m = copy.deepcopy(base).eval()
        lw = []
        if isinstance(fn, str):
            fn = stem_profile(m, 1 if fn == "stem+1" else 0)
        if kappa is not None:
            dec = {}
            recalibrate_bn(m, user.x, 256, prior=prior, spread=spread, kappa=kappa[0], noise=kappa[1], soft=kappa[2],
                           decided=dec)
            lw = dec.get("layer_w", [])
        elif w > 0:
            recalibrate_bn(m, user.x, 256, weight=w, prior=prior, profile=fn)
        fu, lu, last = features_and_logits(m, user.x)
        fh, lh, _ = features_and_logits(m, user.heldout_x)
        pm = torch.softmax(lu, 1).mean(0)
        keff = float(torch.exp(-(pm * pm.clamp_min(1e-12).log()).sum()))
        k_pred = int((torch.bincount(lu.argmax(1), minlength=lu.shape[1]) >= max(1, 0.05 * len(lu))).sum())
        for hname, k in HEADS.items():
            if k == "lens":  # the blend head: half the base's logits, half T3A's at the same spread
                head = T3AHead(last.weight, last.bias, fu, lu)
                pu = head(fu)
                sc = lu.std() / pu.std().clamp_min(1e-12)
                su, sh = (lu + sc * pu) / 2, (lh + sc * head(fh)) / 2
            elif k is None:
                su, sh = lu, lh
            else:
                head = T3AHead(last.weight, last.bias, fu, lu, prior_weight=k)
                su, sh = head(fu), head(fh)
            for pname, a in PRIORS.items():
                off = 0 if a is None else label_shift_prior(su, a)
                r = {"cohort": cohort, "user": user.user_id, "n": len(user.x), "w": w, "profile": prof, "head": hname,
                     "prior": pname, "acc": acc(sh + off), "keff": keff, "k_pred": k_pred,
                     "layer_w": lw}
                if w == 0 and hname == "linear" and pname == "none":
                    base_acc = r["acc"]
                rows.append(r)
    lame = BL.lame(base, user.x)
    rows.append({"cohort": cohort, "user": user.user_id, "n": len(user.x), "w": -1, "profile": "-", "head": "lame",
                 "prior": "none",
                 "acc": acc(lame.predict(user.heldout_x))})
    for r in rows:
        r["base"] = base_acc
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdd")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--cohorts", default="digits,digits-style,resnet-few,fsdd-loso,fsdd-seen,fsdd-cond,fsdd-few")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    rows, t0 = [], time.time()
    for name, users in cohorts(out, a.fsdd, a.cohorts.split(",")):
        for base, _, u in users:
            rows += user_rows(name, base, u, a.fsdd)
        print(f"[{time.time() - t0:5.0f} s] {name}: {len(users)} users", file=sys.stderr, flush=True)
    atomic_write_csv(out / "study.csv", rows)
    atomic_write_text(out / "study.json", json.dumps(rows))
    table(rows)
    if {"all", "stem", "spread-3-0"} <= {r["profile"] for r in rows}:
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


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- leave-one-cohort-out choice
def decide(d: dict, slack: int, min_support: float, fallback: str) -> float:
    """One user's gain over the base under the auto policy: full recalibration unless it predicts
    more than `slack` classes beyond the class-spread recalibration (then `fallback`), then the
    prototype head where the user gives `min_support` samples per class, else the blend."""
    a, s = d[("all", "linear")], d[("spread-3-0", "linear")]
    bn = "all" if a["k_pred"] <= s["k_pred"] + slack else fallback
    lin = d[(bn, "linear")]
    head = "t3a" if lin["n"] / lin["keff"] >= min_support else "lens"
    return d[(bn, head)]["acc"] - d[("base", "linear")]["acc"]


def loco(rows) -> str:
    """The policy's thresholds chosen on six cohorts, judged on the seventh, for each cohort: the
    choice maximizes the mean cohort gain less every point a cohort's worst user falls more than 2
    points below its base (ties: the smaller slack, the safer side)."""
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

    grid = list(itertools.product((0, 1, 2), (0, 5, 8, 10, 12, 15, 20, math.inf), ("stem", "spread-3-0")))

    def score(p, cs):
        st = [stats(c, p) for c in cs]
        return sum(m for m, _ in st) / len(st) - sum(max(0.0, -w - 0.02) for _, w in st)

    lines = ["| held-out cohort | chosen on the other cohorts (slack, min support, fallback) | held-out mean gain "
             "| held-out worst user |", "|---|---|---|---|"]
    for c in cohorts_:
        best = max(grid, key=lambda p: (score(p, [x for x in cohorts_ if x != c]), -p[0]))
        m, w = stats(c, best)
        lines.append(f"| {c} | {best[0]}, {best[1]}, {best[2]} | {m:+.3f} | {w:+.3f} |")
    shipped = (2, 10, "stem")
    lines += ["", f"Shipped {shipped} on every cohort (mean gain / worst user): " + ", ".join(
        f"{c} {m:+.3f}/{w:+.3f}" for c in cohorts_ for m, w in [stats(c, shipped)])]
    return "\n".join(lines) + "\n"
