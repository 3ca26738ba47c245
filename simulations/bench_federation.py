"""`fineprune bench-federation`: what the federation's prior gives back, round 1 (every device
alone) against round 2 (with the prior), per device, on the simulated digits federations of
`fineprune simulate` (10 and 50 clients, several draws) and, with --fsdd, the data-poor speech
federations (20 clips per device, 2, 5 and 10 devices sharing each of four acoustic conditions)
and, with --styled, data-poor styled-digits federations (20 images per device, four styles, the
digits CNN with and without BatchNorm), plain and private (epsilon 1 and 2).

The devices run the device path (client/personalize.py) and upload what a device uploads (the
summary bytes, randomized on the device in private mode, with the class means where the run pools
them); the server decodes them, picks its voters and builds the prior with its own code
(server/analysis.py), and the prior travels through the wire format and the device's checks
(common/wire/prior.py). Flower is left out only to measure 300 devices in minutes: the same code
runs under Flower (tests/test_simulation.py). Why ~355 lines: three federations share one two-round
protocol, its table and its plot.

    fineprune bench-federation --fsdd ../shared/data/fsdd --styled --out runs/bench_federation
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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
    p.add_argument("--fsdd", default="", help="FSDD directory: adds the data-poor speech federations (20 clips "
                   "per device, four acoustic conditions)")
    p.add_argument("--per-condition", default="2,5,10", help="speech and styled: devices sharing each condition "
                   "or style")
    p.add_argument("--styled", action="store_true", help="adds the data-poor styled-digits federations (20 images "
                   "per device, four styles), on the digits CNN with and without BatchNorm")
    return p


def federation(clients: int, seed: int, epsilon: float | None, out: Path, over: dict) -> list[dict]:
    """One digits federation of `fineprune simulate`, two rounds (two_rounds)."""
    from common.data.protocol import simulated_user, task_dataset, vendor_train_test
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config
    from simulations.bench_tasks import _cached_pretrain

    cfg = merged_config({}, dict(over, **{"num-clients": clients, "seed": seed, "num-rounds": 2}))
    base_path = out / "bases" / f"base_{cfg['task']}_s{seed}.pt"
    ds = task_dataset(cfg["task"], cfg["data-path"])
    _cached_pretrain(base_path, cfg["task"], base_path, seed=seed, ds=ds,
                     indices=vendor_train_test(cfg["task"], ds, seed))
    base, meta, _ = load_checkpoint(base_path)
    users = []
    for pid in range(clients):
        u = simulated_user(cfg, pid, clients)
        users.append(Device(pid, u.unlabeled, u.heldout_x, u.heldout_y))
    return two_rounds(base, meta, users, cfg, epsilon, {"federation": cfg["task"], "clients": clients,
                                                        "per_condition": "-", "seed": seed})


def speech_federation(per_condition: int, seed: int, epsilon: float | None, out: Path, over: dict,
                      fsdd: str) -> list[dict]:
    """The data-poor speech federation of simulations/federation_prior_study.py: 20 clips of one
    FSDD speaker under one of four acoustic conditions per device, `per_condition` devices sharing
    each, on a base that never heard these conditions; two rounds (two_rounds)."""
    from common.data import protocol as P
    from common.data import readers as D
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config
    from simulations import federation_prior_study as FS
    from simulations.bench_tasks import _cached_pretrain

    ds = D.load_fsdd(fsdd)
    ck = out / "bases" / "fsdd_seen_s0_e12.pt"
    _cached_pretrain(ck, "fsdd", ck, seed=0, ds=ds, epochs=12, indices=P.seen_speaker_split(ds))
    base, meta, _ = load_checkpoint(ck)
    users = [Device(d["id"], d["x"], d["hx"], d["hy"], d["slot"]) for cond in FS.CONDITIONS
             for d in FS.devices(ds, cond, per_condition, SPEECH_CLIPS, seed)]
    cfg = merged_config({}, dict(over, **{"num-clients": len(users), "seed": seed, "num-rounds": 2, "task": "fsdd"}))
    return two_rounds(base, meta, users, cfg, epsilon, {"federation": "speech", "clients": len(users),
                                                        "per_condition": per_condition, "seed": seed})


def styled_federation(per_style: int, seed: int, epsilon: float | None, out: Path, over: dict,
                      batchnorm: bool = True) -> list[dict]:
    """Data-poor devices of styled digits: 20 unlabeled images (of all ten classes) per device in a
    style of its own (thick strokes, blur, low contrast or rotation, cycled), `per_style` devices
    per style, 40 held-out images each, on the digits CNN (`batchnorm` False: without its
    BatchNorm layers); two rounds (two_rounds). No choice of the class directions was made on them.
    Nested draws, as the speech devices': the first 8 devices at 5 or 10 per style are those at 2."""
    from common.data import readers as D
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config
    from simulations.bench_tasks import _cached_pretrain

    ds = D.load_digits()
    ck = out / "bases" / f"digits{'' if batchnorm else '_nobn'}_s0_e0.pt"
    _cached_pretrain(ck, "digits", ck, seed=0, ds=ds, epochs=None,
                     arch_kwargs=None if batchnorm else {"batchnorm": False})
    base, meta, _ = load_checkpoint(ck)
    users = styled_devices(ds, per_style, seed)
    cfg = merged_config({}, dict(over, **{"num-clients": len(users), "seed": seed, "num-rounds": 2}))
    tags = {"federation": "styled" + ("" if batchnorm else "-nobn"), "clients": len(users),
            "per_condition": per_style, "seed": seed}
    return two_rounds(base, meta, users, cfg, epsilon, tags)


def styled_devices(ds, per_style: int, seed: int) -> list:
    """`per_style` devices per style, 20 unlabeled and 40 held-out images each; nested: the first
    devices of each style are the same whatever `per_style`."""
    from common.data import protocol as P
    from simulations import cohorts as CO

    _, pool = P.vendor_and_pool("digits", ds, 0)
    made = CO.image_style_users(ds, pool, 1000 * seed + 1, n_users=len(CO.IMAGE_STYLES) * per_style, n_images=60,
                                heldout=40)
    return [Device(u.user_id, u.x, u.heldout_x, u.heldout_y, i // len(CO.IMAGE_STYLES)) for i, u in enumerate(made)]


SPEECH_CLIPS = 20  # the data-poor speech devices


@dataclass
class Device:
    id: object
    unlabeled: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    slot: int | None = None  # the device's place among those sharing its condition (nested draws)


def two_rounds(base, meta, users: list, cfg: dict, epsilon: float | None, tags: dict) -> list[dict]:
    """Round 1 alone and round 2 with the prior, every device: per device its samples, base,
    round-1 and round-2 accuracy and sparsity, whether round 2 had the prior and which head it
    took. The summaries travel as bytes (bitmaps, randomized in private mode; with the class means
    where the run pools them), the priors as the server's records through the device's checks."""
    from client.personalize import personalize
    from common.engine.class_prior import class_shape
    from common.engine.prior import Prior
    from common.model.architectures import prunable_shapes
    from common.model.checkpoint import fingerprint, load_checkpoint
    from common.model.train import accuracy
    from common.wire import prior as PW
    from common.wire.federation import class_prior_enabled, model_bytes, prune_settings
    from common.wire.privacy import effective_voters
    from common.wire.summary import build_summary, decode, encode
    from server.analysis import class_directions, pruned_shares, robust_voters

    fp, size, settings = fingerprint(base), model_bytes(base), prune_settings(cfg)
    shapes = prunable_shapes(base)
    cshape = class_shape(base) if class_prior_enabled(dict(cfg, **{"privacy-epsilon": epsilon or 0}), meta) else None
    rows, summaries = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for pid, u in enumerate(users):
            mask, info = personalize(base, meta, u.unlabeled, settings, Path(tmp) / f"{pid}.pt")
            data = encode(build_summary(mask, None if epsilon else info.hist, "bitmap", fp, size, epsilon=epsilon,
                                        privacy_key=pid.to_bytes(32, "big") if epsilon else None,
                                        classes=info.class_means() if cshape else None))
            summaries[pid] = decode(data, fp, shapes, epsilon=epsilon, classes_shape=cshape)
            model = load_checkpoint(Path(tmp) / f"{pid}.pt")[0]
            rows.append({**tags, "epsilon": epsilon or 0, "user": str(u.id), "slot": u.slot,
                         "samples": len(u.unlabeled),
                         "heldout": len(u.heldout_y), "upload_bytes": len(data),
                         "base": accuracy(base, u.heldout_x, u.heldout_y),
                         "alone": accuracy(model, u.heldout_x, u.heldout_y), "sparsity_alone": info.sparsity,
                         "head_alone": info.adaptation.get("head", "-"),
                         **baselines(base, u)})
        voters, outliers = robust_voters({k: v.bitmap for k, v in summaries.items()})
        shares = classes = None
        k = cfg["slim-min-clients"]
        if effective_voters(len(voters), epsilon) >= k:  # the server's release rule (P11)
            arrays, rec = PW.to_records(pruned_shares(voters, epsilon), len(voters), 1)
            shares = PW.from_records(arrays, rec, shapes, cfg["prior-samples"], epsilon=epsilon)
        if cshape is not None:
            pooled, _ = class_directions(summaries, outliers, k)
            if pooled is not None:
                classes = PW.classes_from_records(*PW.classes_to_records(pooled, 1), cshape)
        for pid, (u, row) in enumerate(zip(users, rows)):
            # an outlier's mask does not vote and its device gets no shares, but the class directions
            mine = None if shares is None or pid in outliers else shares.pruned
            prior = (None if mine is None and classes is None
                     else Prior(mine, float(cfg["prior-samples"]), len(voters), classes))
            row["with_prior"] = prior is not None
            if not row["with_prior"]:  # no prior: the device keeps round 1's personalization
                row["prior"], row["sparsity_prior"], row["head_prior"] = row["alone"], row["sparsity_alone"], "-"
                row["prior_source"] = "-"
                continue
            _, info = personalize(base, meta, u.unlabeled, settings, Path(tmp) / f"{pid}b.pt", prior=prior)
            model = load_checkpoint(Path(tmp) / f"{pid}b.pt")[0]
            row["prior"], row["sparsity_prior"] = accuracy(model, u.heldout_x, u.heldout_y), info.sparsity
            row["head_prior"] = info.adaptation.get("head", "-")
            row["prior_source"] = info.adaptation.get("class_prior", {}).get("source", "-")
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


def _key(r: dict) -> tuple:
    return r["federation"], r["clients"], r["epsilon"]


def shared_slots(rows: list[dict]) -> dict:
    """Per federation and epsilon, how many devices per condition every size of the run holds: the
    nested draws make those devices the same at every size, so their gain compares sizes paired."""
    out = {}
    for r in rows:
        if r.get("slot") is not None:
            k = (r["federation"], r["epsilon"])
            out[k] = min(out.get(k, r["per_condition"]), r["per_condition"])
    return out


def summarize(rows: list[dict]) -> list[dict]:
    table, shared = [], shared_slots(rows)
    for key in sorted({_key(r) for r in rows}):
        sel = [r for r in rows if _key(r) == key]
        row = {"federation": key[0], "clients": key[1], "epsilon": key[2], "devices": len(sel),
               "draws": len({r["seed"] for r in sel}), "median_samples": statistics.median(r["samples"] for r in sel),
               "with_prior": sum(r["with_prior"] for r in sel),
               "class_prior_used": sum(r.get("head_prior") == "class-prior" and r.get("prior_source") == "federation"
                                       for r in sel),
               "vendor_used_alone": sum(r.get("head_alone") == "class-prior" for r in sel),
               "upload_bytes": statistics.mean(r["upload_bytes"] for r in sel),
               "base": statistics.mean(r["base"] for r in sel)}
        for arm in ("alone", "prior"):
            d = [r[arm] - r["base"] for r in sel]
            row.update({arm: statistics.mean(r[arm] for r in sel), f"{arm}_worst": min(d),
                        f"{arm}_below_2": sum(x < -0.02 for x in d),
                        f"{arm}_sparsity": statistics.mean(r[f"sparsity_{arm}"] for r in sel)})
        for arm in BASELINES:
            row[arm] = statistics.mean(r[arm] for r in sel)
            row[f"{arm}_worst"] = min(r[arm] - r["base"] for r in sel)
        row["prior_vs_alone"] = row["prior"] - row["alone"]
        row["worst_vs_alone"] = min(r["prior"] - r["alone"] for r in sel)
        row["largest_change"] = max(abs(r["prior"] - r["alone"]) for r in sel)
        k = shared.get((key[0], key[2]))
        common = [r["prior"] - r["alone"] for r in sel if k is not None and r.get("slot") is not None and r["slot"] < k]
        row["shared_devices"] = len(common)
        row["shared_prior_vs_alone"] = statistics.mean(common) if common else None
        table.append(row)
    return table


def to_markdown(table: list[dict]) -> str:
    lines = ["# The federation's prior: round 1 alone against round 2 with the prior", "",
             "Mean held-out accuracy over devices and draws; worst device against its base; devices more "
             "than 2 points below their base; mean sparsity; how many devices blended the federation's class "
             "directions into their head in round 2, and the vendor's own alone in round 1 (S59); the mean upload. The label-free baselines ran on the same devices' unlabeled data; the "
             "backprop ceiling is not here (a simulated user keeps no labels for them). The speech and styled "
             "draws are nested: the first devices of each condition are the same at every size, and 'devices of "
             "every size' is the gain on them alone (their count in brackets), the same devices compared across "
             "sizes.", "",
             "| federation | devices per run | epsilon | devices (draws) | median samples | with prior | class prior "
             "used | vendor's directions alone | upload (bytes) | base | alone | alone worst | alone < -2 | alone sparsity | prior | prior worst | "
             "prior < -2 | prior sparsity | prior - alone | prior - alone, devices of every size | "
             "worst device, prior - alone | "
             + " | ".join(f"{arm} (worst)" for arm in BASELINES) + " |",
             "|---" * 21 + "|" + "---|" * len(BASELINES)]
    for r in table:
        lines.append(f"| {r['federation']} | {r['clients']} | {r['epsilon'] or '-'} | {r['devices']} ({r['draws']}) | "
                     f"{r['median_samples']:g} | {r['with_prior']} | {r['class_prior_used']} | {r['vendor_used_alone']} | "
                     f"{r['upload_bytes']:.0f} | {r['base']:.4f} | {r['alone']:.4f} | "
                     f"{r['alone_worst']:+.3f} | {r['alone_below_2']} | {r['alone_sparsity']:.3f} | {r['prior']:.4f} | "
                     f"{r['prior_worst']:+.3f} | {r['prior_below_2']} | {r['prior_sparsity']:.3f} | "
                     f"{100 * r['prior_vs_alone']:+.2f} pts | {_shared(r)} | {100 * r['worst_vs_alone']:+.1f} | "
                     + " | ".join(f"{r[arm]:.4f} ({r[arm + '_worst']:+.3f})" for arm in BASELINES) + " |")
    return "\n".join(lines) + "\n"


def _shared(r: dict) -> str:
    v = r.get("shared_prior_vs_alone")
    return "-" if v is None else f"{100 * v:+.2f} pts ({r['shared_devices']})"


def plot(rows: list[dict], path: Path) -> None:
    """Per federation, the change from round 1 to round 2 of every device (sparsity above, held-out
    accuracy below): against its sample count where devices differ in it (digits), else against
    the federation's size (jittered); private runs in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    feds = sorted({r["federation"] for r in rows})
    fig, axes = plt.subplots(2, len(feds), figsize=(4.2 * len(feds), 6.5), squeeze=False)
    rng = np.random.default_rng(0)
    for j, fed in enumerate(feds):
        sel = [r for r in rows if r["federation"] == fed and r["with_prior"]]
        by_samples = len({r["samples"] for r in sel}) > 1
        for private in (True, False):
            pts = [r for r in sel if bool(r["epsilon"]) == private]
            x = np.array([r["samples"] if by_samples else r["clients"] for r in pts], dtype=float)
            if not by_samples:
                x = x * np.exp(rng.uniform(-0.08, 0.08, len(x)))
            style = {"color": "0.7", "label": "private (epsilon 1, 2)"} if private else {"color": "C0", "label": "plain"}
            axes[0, j].scatter(x, [r["sparsity_prior"] - r["sparsity_alone"] for r in pts], s=8, alpha=0.5, **style)
            axes[1, j].scatter(x, [100 * (r["prior"] - r["alone"]) for r in pts], s=8, alpha=0.5, **style)
        for i, what in enumerate(("sparsity", "held-out accuracy (points)")):
            ax = axes[i, j]
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xscale("log")
            ax.set_xlabel("device's unlabeled samples" if by_samples else "devices in the federation")
            ax.set_ylabel(f"{what}, round 2 - round 1", fontsize=8)
            ax.set_title(f"{fed}: {what.split(' (')[0]}", fontsize=10)
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
    for clients in (int(c) for c in args.clients.split(",") if c.strip()):
        for seed in range(args.seeds):
            for eps in epsilons:
                rows += federation(clients, seed, eps, out, over)
                print(f"{clients} clients, draw {seed}, epsilon {eps or '-'}: done ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    for k in (int(c) for c in args.per_condition.split(",") if c.strip() and args.fsdd):
        for seed in range(args.seeds):
            for eps in epsilons:
                rows += speech_federation(k, seed, eps, out, over, args.fsdd)
                print(f"speech, {k} per condition, draw {seed}, epsilon {eps or '-'}: done "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    for k in (int(c) for c in args.per_condition.split(",") if c.strip() and args.styled):
        for bn in (True, False):
            for seed in range(args.seeds):
                for eps in epsilons:
                    rows += styled_federation(k, seed, eps, out, over, bn)
                    print(f"styled{'' if bn else ' without BatchNorm'}, {k} per style, draw {seed}, "
                          f"epsilon {eps or '-'}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    table = summarize(rows)
    atomic_write_csv(out / "devices.csv", rows)
    atomic_write_text(out / "results.json", json.dumps({"summary": table, "devices": rows}, indent=2))
    atomic_write_text(out / "results.md", to_markdown(table))
    plot(rows, out / "prior.png")
    print(to_markdown(table))
    print(f"files: {out}/results.md, results.json, devices.csv, prior.png")


if __name__ == "__main__":
    main(build_parser(argparse.ArgumentParser(description=first_sentence(__doc__))).parse_args())
