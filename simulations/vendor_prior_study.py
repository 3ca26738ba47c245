"""S55's study: the label-shift head (S54) over the vendor's own class mix, as its record counts it,
against the uniform mix S54 assumed, on vendors that trained on imbalanced classes. Each vendor
keeps every class of its data at a share falling geometrically with the class's seeded rank (the
rarest at 1/imbalance of the most common); its users hold 2-3 classes of the pool, each whole and
cut to its first one and two classes. The digits CNN and ResNet18 at 32x32, both BatchNorm networks.
Users whom head auto gives no label-shift head get the same model under both arms.

    python -m simulations.vendor_prior_study --imbalance 10 --seeds 0,1,2 --out runs/vendor_prior

`--bench-cohorts digits,resnet-few` runs the benchmark's own cohorts (balanced vendors, whose
counts differ from uniform by sampling alone) under the same arms instead, users whole and cut.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

from simulations import baselines as BL
from simulations import cohort_study as CS

ARMS = {"uniform (S54)": {"uniform": True}, "vendor counts (S55)": {}, "prototypes": {"head": "prototypes"}}
NETWORKS = ("digits", "resnet18")


@contextlib.contextmanager
def uniform_vendor(change: dict):
    """Takes "uniform" out of an arm's `change` and, for the arm's run, reads no vendor counts
    (the label-shift head over a uniform vendor mix, as S54 shipped)."""
    from common.engine import heads as HD

    before = HD.vendor_prior
    if change.pop("uniform", False):
        HD.vendor_prior = lambda _meta, _k: None
    try:
        yield
    finally:
        HD.vendor_prior = before


def long_tailed(y: np.ndarray, idx: np.ndarray, imbalance: float, seed: int) -> np.ndarray:
    """The indices `idx` with class c kept at a share imbalance^(-rank_c / (k - 1)) (ranks a
    seeded permutation of the classes): the most common class whole, the rarest at 1/imbalance."""
    rng = np.random.default_rng([seed, 55])
    classes = np.unique(y[idx])
    rank = dict(zip(classes.tolist(), rng.permutation(len(classes)).tolist()))
    keep = []
    for c in classes:
        mine = rng.permutation(idx[y[idx] == c])
        share = imbalance ** (-rank[int(c)] / max(len(classes) - 1, 1))
        keep.extend(mine[:max(1, round(share * len(mine)))].tolist())
    return np.sort(np.asarray(keep))


def vendor_users(network: str, out: Path, seed: int, imbalance: float, n_users: int = 10) -> list:
    """[(base, metadata, user)]: a vendor of `network` trained on its long-tailed data, with the
    users of the pool holding 2-3 classes."""
    from common.data import protocol as P
    from common.data import readers as D
    from common.model.checkpoint import load_checkpoint
    from server.pretrain import pretrain
    from simulations.bench_tasks import few_class_users, resnet_input, train_resnet_vendor
    from simulations.cohorts import BenchUser

    ds = D.load_digits()
    y = ds.y.numpy()
    ck = out / "bases" / f"{network}_imb{imbalance:g}_s{seed}.pt"
    if network == "digits":
        tr, te = P.vendor_indices("digits", ds, seed, P.VENDOR_FRAC)
        if not ck.is_file():
            pretrain("digits", ck, seed=seed, ds=ds, indices=(long_tailed(y, tr, imbalance, seed), te))
        look = lambda x: x  # noqa: E731
    else:
        vendor, _ = P.vendor_and_pool("digits", ds, seed)
        look = lambda x: resnet_input(x).repeat(1, 3, 1, 1)  # noqa: E731
        if not ck.is_file():
            tr = long_tailed(y, np.asarray(vendor), imbalance, seed)
            train_resnet_vendor(ck, "resnet18", look(ds.x[tr]), ds.y[tr], ds.classes, seed, epochs=6)
    base, meta, _ = load_checkpoint(ck)
    _, pool = P.vendor_and_pool("digits", ds, seed)
    return [(base, meta, BenchUser(u.user_id, look(u.x), u.y, look(u.heldout_x), u.heldout_y))
            for u in few_class_users(ds.subset(pool), n_users, seed + 55, np.random.default_rng(seed))]


CEILING = "backprop (labels)"


def with_baselines(users, rows: list[dict]) -> None:
    """Each user's row gains AdaBN, T3A, LAME and AdaBN+T3A on the frozen base and the labelled
    ceiling (5 epochs of backprop), as the bench reports them beside the default (nothing pruned)."""
    for (base, _meta, u), row in zip(users, rows):
        label_free, row[CEILING] = BL.beside(base, u)
        row.update(label_free)
        for name in (*label_free, CEILING):
            row[f"{name} sparsity"], row[f"{name} bn"] = 0.0, None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m simulations.vendor_prior_study", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (bases cached under OUT/bases)")
    p.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated subset of: {', '.join(NETWORKS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated vendor seeds")
    p.add_argument("--imbalance", type=float, default=10.0, help="the most common class's samples over the rarest's")
    p.add_argument("--users", type=int, default=10, help="users per vendor, each also cut to 1 and 2 classes")
    p.add_argument("--baselines", action="store_true", help="also AdaBN, T3A, LAME, AdaBN+T3A and the labelled "
                   "ceiling per user")
    p.add_argument("--bench-cohorts", default="", help="the benchmark's cohorts instead (e.g. digits,resnet-few), "
                   "at each seed")
    CS.add_arms(p, ARMS)
    a = p.parse_args(argv)
    arms = CS.chosen_arms(a.arms, ARMS)
    networks = [n.strip() for n in a.networks.split(",") if n.strip()]
    if bad := [n for n in networks if n not in NETWORKS]:
        raise SystemExit(f"unknown network '{bad[0]}' (choose from: {', '.join(NETWORKS)})")
    if a.imbalance < 1:
        raise SystemExit(f"--imbalance must be at least 1, got {a.imbalance:g}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    from simulations.bench_tasks import COHORTS, cohort_users
    from simulations.prior_head_study import with_cuts

    cohorts = [c.strip() for c in a.bench_cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS or c.startswith("fsdd")]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from the image cohorts of: {', '.join(COHORTS)})")

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for name in cohorts:
            users = with_cuts(cohort_users(name, out, seed))
            rows += measured(f"{name}-s{seed}", users, arms, a.baselines)
        for net in [] if cohorts else networks:
            users = with_cuts(vendor_users(net, out, seed, a.imbalance, a.users))
            rows += measured(f"{net}-imb{a.imbalance:g}-s{seed}", users, arms, a.baselines)
    arms = {**arms, **({k: None for k in (*BL.LABEL_FREE, CEILING)} if a.baselines else {})}
    table = CS.summarize(rows, arms)
    what = "the benchmark's cohorts (balanced vendors)" if cohorts else f"vendors imbalanced {a.imbalance:g}:1"
    lines = CS.arms_table(f"The label-shift head over the vendor's counts, {what}", table, arms)
    CS.write(out, "vendor_prior", rows, table, "\n".join(lines) + "\n")
    CS.bar_plot(table, ["base", *arms], "S55: the vendor's class counts", out / "vendor_prior.png",
                figsize=(9, 4), fontsize=7)
    return rows


def measured(name: str, users, arms: dict, baselines: bool) -> list[dict]:
    """The users' rows under every arm, and, with `baselines`, the bench's baselines beside them."""
    rows = CS.run_arms(name, users, arms, setup=uniform_vendor)
    if baselines:
        with_baselines(users, rows)
    return rows


if __name__ == "__main__":
    main()
