"""`fineprune bench-federation`: what the federation's prior gives back, round 1 (every device
alone) against round 2 (with the prior), per device, on the simulated digits federations of
`fineprune simulate` (10 and 50 clients, several draws), plain and private (epsilon 1 and 2).

The devices run the device path (client/personalize.py) and upload what a device uploads (the
summary bytes, randomized on the device in private mode); the server decodes them, picks its
voters and builds the prior with its own code (server/analysis.py), and the prior travels
through the wire format and the device's checks (common/wire/prior.py). Flower is left out only
to measure 300 devices in minutes: the same code runs under Flower (tests/test_simulation.py).

    fineprune bench-federation --out runs/bench_federation
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common.cli import first_sentence
from common.io import atomic_write_csv, atomic_write_png, atomic_write_text


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="runs/bench_federation", help="folder for results.md/.csv/.json and plots")
    p.add_argument("--clients", default="10,50", help="federation sizes, comma-separated (default 10,50)")
    p.add_argument("--seeds", type=int, default=3, help="draws of users per size (default 3)")
    p.add_argument("--epsilons", default="1,2", help="private arms' epsilons, comma-separated ('' for none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    return p


def federation(clients: int, seed: int, epsilon: float | None, out: Path, over: dict) -> list[dict]:
    """One federation, two rounds: per device its samples, base, round-1 and round-2 accuracy and
    sparsity, and whether round 2 had the prior."""
    from client.personalize import personalize
    from common.data.protocol import simulated_user, task_dataset, vendor_train_test
    from common.model.architectures import prunable_shapes
    from common.model.checkpoint import fingerprint, load_checkpoint
    from common.model.train import accuracy
    from common.wire import prior as PW
    from common.wire.federation import merged_config, model_bytes, prune_settings
    from common.wire.summary import build_summary, decode, encode
    from server.analysis import pruned_shares, robust_voters
    from server.pretrain import pretrain

    cfg = merged_config({}, dict(over, **{"num-clients": clients, "seed": seed}))
    base_path = out / "bases" / f"base_{cfg['task']}_s{seed}.pt"
    if not base_path.exists():
        ds = task_dataset(cfg["task"], cfg["data-path"])
        pretrain(cfg["task"], base_path, seed=seed, ds=ds, indices=vendor_train_test(cfg["task"], ds, seed))
    base, meta, _ = load_checkpoint(base_path)
    fp, size, settings = fingerprint(base), model_bytes(base), prune_settings(cfg)
    shapes = prunable_shapes(base)
    users = [simulated_user(cfg, pid, clients) for pid in range(clients)]
    rows, summaries = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for pid, u in enumerate(users):
            mask, info = personalize(base, meta, u.unlabeled, settings, Path(tmp) / f"{pid}.pt")
            data = encode(build_summary(mask, None if epsilon else info.hist, "bitmap", fp, size, epsilon=epsilon,
                                        privacy_key=pid.to_bytes(32, "big") if epsilon else None))
            summaries[pid] = decode(data, fp, shapes, epsilon=epsilon).bitmap
            model = load_checkpoint(Path(tmp) / f"{pid}.pt")[0]
            rows.append({"clients": clients, "seed": seed, "epsilon": epsilon or 0, "user": pid,
                         "samples": len(u.unlabeled), "heldout": len(u.heldout_y),
                         "base": accuracy(base, u.heldout_x, u.heldout_y),
                         "alone": accuracy(model, u.heldout_x, u.heldout_y), "sparsity_alone": info.sparsity,
                         **baselines(base, u)})
        voters, outliers = robust_voters(summaries)
        prior = None
        if len(voters) >= cfg["slim-min-clients"]:
            arrays, rec = PW.to_records(pruned_shares(voters, epsilon), len(voters), 1)
            prior = PW.from_records(arrays, rec, shapes, cfg["prior-samples"], epsilon=epsilon)
        for pid, (u, row) in enumerate(zip(users, rows)):
            row["with_prior"] = prior is not None and pid not in outliers
            if not row["with_prior"]:  # no prior: the device keeps round 1's personalization
                row["prior"], row["sparsity_prior"] = row["alone"], row["sparsity_alone"]
                continue
            _, info = personalize(base, meta, u.unlabeled, settings, Path(tmp) / f"{pid}b.pt", prior=prior)
            model = load_checkpoint(Path(tmp) / f"{pid}b.pt")[0]
            row["prior"], row["sparsity_prior"] = accuracy(model, u.heldout_x, u.heldout_y), info.sparsity
    return rows


BASELINES = ("adabn", "t3a", "lame", "adabn+t3a")


def baselines(base, u) -> dict:
    """The label-free baselines on the device's own unlabeled data, held-out accuracy. (The
    backprop ceiling needs the labels of those samples, which a simulated user does not keep.)"""
    from simulations import baselines as BL

    made = {"adabn": BL.adabn(base, u.unlabeled), "t3a": BL.t3a(base, u.unlabeled), "lame": BL.lame(base, u.unlabeled),
            "adabn+t3a": BL.t3a(base, u.unlabeled, recalibrate=True)}
    with torch.no_grad():
        return {k: float((a.predict(u.heldout_x).argmax(1) == u.heldout_y).float().mean()) for k, a in made.items()}


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for key in sorted({(r["clients"], r["epsilon"]) for r in rows}):
        sel = [r for r in rows if (r["clients"], r["epsilon"]) == key]
        row = {"clients": key[0], "epsilon": key[1], "devices": len(sel), "draws": len({r["seed"] for r in sel}),
               "median_samples": statistics.median(r["samples"] for r in sel),
               "with_prior": sum(r["with_prior"] for r in sel), "base": statistics.mean(r["base"] for r in sel)}
        for arm in ("alone", "prior"):
            d = [r[arm] - r["base"] for r in sel]
            row.update({arm: statistics.mean(r[arm] for r in sel), f"{arm}_worst": min(d),
                        f"{arm}_below_2": sum(x < -0.02 for x in d),
                        f"{arm}_sparsity": statistics.mean(r[f"sparsity_{arm}"] for r in sel)})
        for arm in BASELINES:
            row[arm] = statistics.mean(r[arm] for r in sel)
            row[f"{arm}_worst"] = min(r[arm] - r["base"] for r in sel)
        row["prior_vs_alone"] = row["prior"] - row["alone"]
        row["largest_change"] = max(abs(r["prior"] - r["alone"]) for r in sel)
        table.append(row)
    return table


def to_markdown(table: list[dict]) -> str:
    lines = ["# The federation's prior: round 1 alone against round 2 with the prior (digits)", "",
             "Mean held-out accuracy over devices and draws; worst device against its base; devices more "
             "than 2 points below their base; mean sparsity. The label-free baselines ran on the same devices' "
             "unlabeled data; the backprop ceiling is not here (a simulated user keeps no labels for them).", "",
             "| clients | epsilon | devices (draws) | median samples | with prior | base | alone | alone worst | "
             "alone < -2 | alone sparsity | prior | prior worst | prior < -2 | prior sparsity | prior - alone | "
             + " | ".join(f"{arm} (worst)" for arm in BASELINES) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(BASELINES)]
    for r in table:
        lines.append(f"| {r['clients']} | {r['epsilon'] or '-'} | {r['devices']} ({r['draws']}) | "
                     f"{r['median_samples']:g} | {r['with_prior']} | {r['base']:.4f} | {r['alone']:.4f} | "
                     f"{r['alone_worst']:+.3f} | {r['alone_below_2']} | {r['alone_sparsity']:.3f} | {r['prior']:.4f} | "
                     f"{r['prior_worst']:+.3f} | {r['prior_below_2']} | {r['prior_sparsity']:.3f} | "
                     f"{100 * r['prior_vs_alone']:+.2f} pts | "
                     + " | ".join(f"{r[arm]:.4f} ({r[arm + '_worst']:+.3f})" for arm in BASELINES) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["clients"], r["epsilon"]) for r in rows}):
        sel = [r for r in rows if (r["clients"], r["epsilon"]) == key and r["with_prior"]]
        label = f"{key[0]} clients" + (f", epsilon {key[1]:g}" if key[1] else "")
        axes[0].scatter([r["samples"] for r in sel], [r["sparsity_prior"] - r["sparsity_alone"] for r in sel],
                        s=10, alpha=0.6, label=label)
        axes[1].scatter([r["samples"] for r in sel], [100 * (r["prior"] - r["alone"]) for r in sel],
                        s=10, alpha=0.6, label=label)
    for ax, what in zip(axes, ("sparsity", "held-out accuracy (points)")):
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("device's unlabeled samples")
        ax.set_ylabel(f"{what}, round 2 - round 1")
        ax.set_title(f"{what.split(' (')[0]}: with the prior minus alone", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_png(path, fig)


def main(args) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    over = dict(kv.split("=", 1) for kv in args.set)
    epsilons = [None] + [float(e) for e in args.epsilons.split(",") if e.strip()]
    rows, t0 = [], time.time()
    for clients in (int(c) for c in args.clients.split(",")):
        for seed in range(args.seeds):
            for eps in epsilons:
                rows += federation(clients, seed, eps, out, over)
                print(f"{clients} clients, draw {seed}, epsilon {eps or '-'}: done ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    table = summarize(rows)
    atomic_write_csv(out / "devices.csv", rows)
    atomic_write_text(out / "results.json", json.dumps({"summary": table, "devices": rows}, indent=2))
    atomic_write_text(out / "results.md", to_markdown(table))
    plot(rows, out / "prior.png")
    print(to_markdown(table))
    print(f"files: {out}/results.md, results.json, devices.csv, prior.png")


if __name__ == "__main__":
    main(build_parser(argparse.ArgumentParser(description=first_sentence(__doc__))).parse_args())
