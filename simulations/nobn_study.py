"""The default on networks without BatchNorm (S57, S58): the first layer's channel means moved to
the vendor's under the user's class mix (common/engine/input_shift.py), and the head S26 refuses
kept still where it spreads the predictions wider (heads.spreads_wider), each against the default
without it. The bench's BatchNorm-free cohorts over several seeds (bases trained per seed), each
user whole and cut to its first one and two classes (the label shift a class-blind move would
absorb); `--baselines` adds T3A, LAME, AdaBN+T3A, AdaBN (the base, with no BatchNorm) and the
labelled ceiling on the frozen base beside them. The speech network without BatchNorm (new
speakers, seen speakers holding 3-4 digits, seen speakers under acoustic conditions) with `--fsdd`.
`--sensors N`: N users per sensor of an MLP without BatchNorm on Gaussian classes (an offset, a
scale per coordinate, coordinates mixed), the "classes held" column naming the sensor.

    python -m simulations.nobn_study --seeds 0,1,2,3 --sensors 24 --out runs/nobn
    python -m simulations.nobn_study --cohorts fsdd-cond-nobn,fsdd-loso-nobn --fsdd ../shared/data/fsdd \
        --out runs/nobn
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from functools import partial

import torch

from simulations import baselines as BL
from simulations import cohort_study as CS

ARMS = {"before S57": {"no_shift": True, "no_head_check": True}, "S57": {"no_head_check": True},
        "S57 without its check": {"no_check": True, "no_head_check": True}, "S57+S58 (default)": {}}
COHORTS = ("digits-nobn", "digits-style-nobn", "digits-all-nobn", "fsdd-loso-nobn", "fsdd-cond-nobn", "fsdd-seen-nobn")


@contextlib.contextmanager
def no_shift(change: dict):
    """Takes "no_shift", "no_check", "no_head_check" and "evidence" out of an arm's `change` and,
    for the arm's run, moves no first layer, or keeps its move without checking it, or keeps the
    base's layer wherever S26 refuses the head (no S58), or weights the move by n / (n + evidence)."""
    from common.engine import heads as HD
    from common.engine import input_shift as IS

    before = IS.applies, IS.EVIDENCE, IS.keep, HD.spreads_wider
    if change.pop("no_shift", False):
        IS.applies = lambda _model, _meta: False
    if change.pop("no_check", False):
        IS.keep = partial(before[2], check=False)
    if change.pop("no_head_check", False):
        HD.spreads_wider = lambda *_a: (False, 0.0, 0.0)
    IS.EVIDENCE = change.pop("evidence", IS.EVIDENCE)
    try:
        yield
    finally:
        IS.applies, IS.EVIDENCE, IS.keep, HD.spreads_wider = before


SENSORS = ("offset", "scale", "contract", "mixing-0.3", "mixing-0.6")


def sensor_users(n_users: int) -> list:
    """[(base, meta, user, sensor)]: an MLP without BatchNorm trained on ten Gaussian classes in 16
    dimensions (3000 samples), and n_users per sensor, each holding every class (120 unlabeled, 60
    held out) seen through a sensor of its own: every input moved by one offset, each coordinate
    scaled, every input pulled toward one point (a gain of 0.4), or the coordinates mixed (identity
    plus a random matrix of that scale) and moved."""
    import torch.nn as nn

    from common.engine.adapt import vendor_record
    from common.model.train import train_supervised
    from simulations.cohorts import BenchUser

    dim, k = 16, 10
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(k, dim, generator=gen) * 1.5

    def sample(n, g):
        y = torch.randint(k, (n,), generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    x, y = sample(3000, gen)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(dim, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, k))
    train_supervised(base, x, y, epochs=15, lr=3e-3, batch_size=128)
    base.eval()
    meta = vendor_record(base, x, y)
    users = []
    for sensor in SENSORS:
        for i in range(n_users):
            g = torch.Generator().manual_seed(10 + i)
            if sensor == "offset":
                a, b = torch.eye(dim), 1.5 * torch.randn(dim, generator=g)
            elif sensor == "scale":
                a, b = torch.diag(torch.rand(dim, generator=g) * 1.5 + 0.5), torch.zeros(dim)
            elif sensor == "contract":  # a low gain: every input pulled toward one point
                a, b = 0.4 * torch.eye(dim), torch.randn(dim, generator=g)
            else:
                a = torch.eye(dim) + float(sensor.split("-")[1]) * torch.randn(dim, dim, generator=g)
                b = torch.randn(dim, generator=g)
            (xu, yu), (xh, yh) = sample(120, g), sample(60, g)
            users.append((base, meta, BenchUser(f"{sensor}:{i}", xu @ a + b, yu, xh @ a + b, yh), sensor))
    return users


def held_users(users: list) -> list:
    """[(base, meta, user, classes held)]: each user whole ("all") and cut to 1 and 2 classes."""
    from simulations.few_class_study import held

    return [(b, m, v, k) for b, m, u in users for k, v in held(u)]


def summary(rows: list[dict], arms, baselines: bool) -> list[dict]:
    """Per cohort and classes held: users, base, and per arm (and baseline) the mean, the users
    more than 2 points below their base and the worst user against it; arms with their sparsity."""
    names = list(arms) + (list(BL.LABEL_FREE) + ["ceiling"] if baselines else [])
    out = []
    for key in dict.fromkeys((r["cohort"], r["held"]) for r in rows):
        sel = [r for r in rows if (r["cohort"], r["held"]) == key]
        s = {"cohort": key[0], "held": key[1], "users": len(sel), "base": statistics.mean(r["base"] for r in sel)}
        for a in names:
            s[a] = statistics.mean(r[a] for r in sel)
            s[f"{a} below"] = sum(r[a] - r["base"] < -0.02 - 1e-9 for r in sel)
            s[f"{a} worst"] = min(r[a] - r["base"] for r in sel)
            if a in arms:
                s[f"{a} sparsity"] = statistics.mean(r[f"{a} sparsity"] for r in sel)
        out.append(s)
    return out


def markdown(table: list[dict], arms, baselines: bool, seeds) -> str:
    names = list(arms) + (list(BL.LABEL_FREE) + ["ceiling"] if baselines else [])
    lines = [f"# S57 and S58 on the BatchNorm-free cohorts, seeds {','.join(map(str, seeds))}: mean held-out accuracy "
             "(sparsity; users more than 2 points below their base; worst user vs its base)", "",
             "| cohort | classes held | users | base | " + " | ".join(names) + " |", "|---" * (4 + len(names)) + "|"]
    for s in table:
        cells = [f"{s[a]:.3f} ({s[a + ' sparsity']:.2f}; {s[a + ' below']}; {s[a + ' worst']:+.3f})" if a in arms
                 else f"{s[a]:.3f} ({s[a + ' below']}; {s[a + ' worst']:+.3f})" for a in names]
        lines.append(f"| {s['cohort']} | {s['held']} | {s['users']} | {s['base']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdd", help="FSDD directory (e.g. ../shared/data/fsdd), for the speech cohorts")
    p.add_argument("--out", required=True, help="output folder (bases cached under OUT/bases)")
    p.add_argument("--cohorts", default=",".join(COHORTS[:3]), help=f"comma-separated subset of: {', '.join(COHORTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (bases and users)")
    p.add_argument("--whole", action="store_true", help="users whole only, not cut to one and two classes")
    p.add_argument("--sensors", type=int, default=0, help="also N users per sensor of a Gaussian-class MLP without "
                   f"BatchNorm ({', '.join(SENSORS)})")
    p.add_argument("--evidence", default="", help="comma-separated weights N: an arm each whose move is weighted "
                   "n / (n + N) on n samples")
    p.add_argument("--baselines", action="store_true", help="T3A, LAME, AdaBN+T3A, AdaBN and the ceiling beside")
    a = p.parse_args(argv)
    cohorts = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from: {', '.join(COHORTS)})")
    if not a.fsdd and any(c.startswith("fsdd") for c in cohorts):
        raise SystemExit("the speech cohorts need --fsdd DIR")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, not '{a.seeds}'") from None
    try:
        arms = dict(ARMS, **{f"S57, evidence {int(v)}": {"evidence": int(v), "no_head_check": True}
                             for v in a.evidence.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--evidence must be comma-separated integers, not '{a.evidence}'") from None
    from simulations.bench_tasks import cohort_users

    def row(cohort, base, meta, user, seed, held):
        """One user's row: every arm, and the baselines where asked."""
        r = CS.run_arms(cohort, [(base, meta, user)], arms, setup=no_shift)[0]
        r.update(seed=seed, held=held)
        if a.baselines:
            label_free, ceiling = BL.beside(base, user)
            r.update(label_free, ceiling=ceiling)
        return r

    out, ds = CS.prepared(a, cohorts)
    rows = []
    for seed in seeds:
        for c in cohorts:
            users = cohort_users(c, out, seed, ds, log=print)
            users = [(b, m, u, "all") for b, m, u in users] if a.whole else held_users(users)
            rows += [row(c, b, m, u, seed, k) for b, m, u, k in users]
    rows += [row("gaussian-mlp-nobn", b, m, u, 0, sensor)
             for b, m, u, sensor in (sensor_users(a.sensors) if a.sensors > 0 else [])]
    table = summary(rows, arms, a.baselines)
    CS.write(out, "nobn", rows, table, markdown(table, arms, a.baselines, seeds))
    bars = [dict(t, cohort=f"{t['cohort'].replace('-nobn', '')}\n{t['held']}") for t in table]
    CS.bar_plot(bars, ["base", *[k for k in arms if "evidence" not in k]],
                "S57, S58: the default on networks without BatchNorm", out / "nobn.png",
                figsize=(max(9, len(bars)), 4), fontsize=7)
    return rows


if __name__ == "__main__":
    main()
