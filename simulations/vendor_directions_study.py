"""S59: the vendor's own class directions against the default without them, on data-poor devices
(too few samples per class for prototypes of their own): FSDD devices of one speaker under one
acoustic condition (20, 40 or 80 clips), styled digits devices of 20 images on the digits CNN with
and without BatchNorm, and the digits federation's few-class users (the spread gate's). Each device
runs the default twice, with its base's record and with `class_directions` taken out of it.

    python -m simulations.vendor_directions_study --fsdd ../shared/data/fsdd --out runs/vendor_dirs
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

COHORTS = ("speech-20", "speech-40", "speech-80", "styled", "styled-nobn", "digits-50")


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cohorts", default=",".join(COHORTS), help=f"comma-separated subset of: {', '.join(COHORTS)}")
    p.add_argument("--seeds", default="0,1", help="draws, comma-separated")
    p.add_argument("--per", type=int, default=5, help="devices per condition or style (speech-40/80: 3)")
    p.add_argument("--fsdd", default=None, help="the FSDD folder (speech cohorts)")
    p.add_argument("--out", required=True)
    return p


def devices(cohort: str, seed: int, per: int, bases: Path, fsdd):
    """(base, meta, [(unlabeled, held-out x, held-out y)], run config) of one cohort's draw."""
    from common.data import protocol as P
    from common.data import readers as D
    from common.model.checkpoint import load_checkpoint
    from common.wire.federation import merged_config
    from simulations import federation_prior_study as FS
    from simulations.bench_federation import styled_devices
    from simulations.bench_tasks import _cached_pretrain

    if cohort.startswith("speech"):
        ck = bases / "fsdd_seen_s0_e12.pt"
        _cached_pretrain(ck, "fsdd", ck, seed=0, ds=fsdd, epochs=12, indices=P.seen_speaker_split(fsdd))
        clips = int(cohort.split("-")[1])
        k = per if clips == 20 else 3
        users = [(d["x"], d["hx"], d["hy"]) for c in FS.CONDITIONS for d in FS.devices(fsdd, c, k, clips, seed)]
        return (*load_checkpoint(ck)[:2], users, merged_config({}, {"num-clients": len(users), "seed": seed,
                                                                    "task": "fsdd"}))
    ds = D.load_digits()
    nobn = cohort.endswith("nobn")
    ck = bases / f"digits{'_nobn' if nobn else ''}_s0_e0.pt"
    _cached_pretrain(ck, "digits", ck, seed=0, ds=ds, epochs=None, arch_kwargs={"batchnorm": False} if nobn else None)
    base, meta, _ = load_checkpoint(ck)
    if cohort.startswith("styled"):
        users = [(d.unlabeled, d.heldout_x, d.heldout_y) for d in styled_devices(ds, per, seed)]
        return base, meta, users, merged_config({}, {"num-clients": len(users), "seed": seed})
    cfg = merged_config({}, {"num-clients": 50, "seed": seed})
    made = [P.simulated_user(cfg, pid, 50) for pid in range(50)]
    return base, meta, [(u.unlabeled, u.heldout_x, u.heldout_y) for u in made], cfg


def compare(base, meta, users, cfg) -> list[dict]:
    """Per device: base, the default without the vendor's directions and with them, sparsity, head."""
    from client.personalize import personalize
    from common.model.checkpoint import load_checkpoint
    from common.model.train import accuracy
    from common.wire.federation import prune_settings

    settings, rows = prune_settings(cfg), []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (x, hx, hy) in enumerate(users):
            row = {"samples": len(x), "base": accuracy(base, hx, hy)}
            for arm, m in (("without", dict(meta, class_directions=None)), ("with", meta)):
                _, info = personalize(base, m, x, settings, Path(tmp) / f"{i}{arm}.pt")
                row[arm] = accuracy(load_checkpoint(Path(tmp) / f"{i}{arm}.pt")[0], hx, hy)
                row[f"sparsity_{arm}"], row[f"head_{arm}"] = info.sparsity, info.adaptation.get("head")
            rows.append(row)
    return rows


def summary(name: str, rows: list[dict]) -> dict:
    gain = [r["with"] - r["without"] for r in rows]
    below = {a: sum(r[a] - r["base"] < -0.02 for r in rows) for a in ("without", "with")}
    return {"cohort": name, "devices": len(rows), "base": statistics.mean(r["base"] for r in rows),
            "without": statistics.mean(r["without"] for r in rows), "with": statistics.mean(r["with"] for r in rows),
            "gain_points": 100 * statistics.mean(gain), "worst_points": 100 * min(gain), "best_points": 100 * max(gain),
            "below_base_without": below["without"], "below_base_with": below["with"],
            "used": sum(r["head_with"] == "class-prior" for r in rows)}


def to_markdown(table: list[dict]) -> str:
    lines = ["The default with the vendor's class directions (S59) against the default without them; mean held-out "
             "accuracy over each draw's devices; devices more than 2 points below their base; how many devices "
             "blended the directions.", "",
             "| cohort, draw | devices | base | without | with | gain (points) | worst device | best device | "
             "below base without -> with | used |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['cohort']} | {t['devices']} | {t['base']:.3f} | {t['without']:.3f} | {t['with']:.3f} | "
                     f"{t['gain_points']:+.2f} | {t['worst_points']:+.1f} | {t['best_points']:+.1f} | "
                     f"{t['below_base_without']} -> {t['below_base_with']} | {t['used']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from common.data import readers as D
    from common.io import atomic_write_text

    a = build_parser(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    cohorts = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from: {', '.join(COHORTS)})")
    if any(c.startswith("speech") for c in cohorts) and not a.fsdd:
        raise SystemExit("the speech cohorts need --fsdd (the FSDD folder)")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be whole numbers, comma-separated, not '{a.seeds}'") from None
    torch.set_num_threads(1)
    out = Path(a.out)
    (out / "bases").mkdir(parents=True, exist_ok=True)
    fsdd = D.load_fsdd(a.fsdd) if any(c.startswith("speech") for c in cohorts) else None
    table, rows = [], {}
    for cohort in cohorts:
        for seed in seeds:
            got = compare(*devices(cohort, seed, a.per, out / "bases", fsdd))
            rows[f"{cohort} s{seed}"] = got
            table.append(summary(f"{cohort} s{seed}", got))
            t = table[-1]
            print(f"{t['cohort']}: {t['without']:.3f} -> {t['with']:.3f} ({t['gain_points']:+.2f} points, worst "
                  f"{t['worst_points']:+.1f}; below base {t['below_base_without']} -> {t['below_base_with']}; "
                  f"used {t['used']} of {t['devices']})", flush=True)
    atomic_write_text(out / "vendor_directions.json", json.dumps({"table": table, "rows": rows}, indent=1))
    atomic_write_text(out / "vendor_directions.md", to_markdown(table))
    return table


if __name__ == "__main__":
    main()
