"""`fineprune` console script: pretrain (vendor side), personalize (the edge device), simulate a
federation, and the benchmarks."""
from __future__ import annotations

import argparse
import json
import os
import sys

from common.checkpoint import CheckpointError
from common.data import DataError
from common.mask import MaskError
from common import settings as ST
from common.prune import PruneConfig
from common.tasks import TASKS

USER_ERRORS = (CheckpointError, DataError, MaskError, ValueError, FileNotFoundError, PermissionError)


def _bar(desc: str):
    """A tqdm progress callback: progress(done, total, text)."""
    from tqdm import tqdm

    state = {}

    def update(done, total, text=""):
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.n = done
        bar.set_postfix_str(text[:60])
        bar.refresh()
        if done >= total:
            bar.close()
    return update


def cmd_pretrain(args) -> dict:
    from common.pretrain import pretrain

    return pretrain(args.task, args.out, data=args.data, epochs=args.epochs, seed=args.seed,
                    device=_device(args.device), exclude_speaker=args.exclude_speaker,
                    vendor_frac=args.vendor_frac, progress=_bar("pretrain"))


def cmd_personalize(args) -> dict:
    import os
    from dataclasses import asdict

    from client.personalize import load_inputs, personalize
    from common.checkpoint import load_checkpoint

    device = _device(ST.given_options(args, ST.CLI)["device"])
    cfg = PruneConfig.from_settings(ST.given_options(args, ST.PRUNE))
    base, meta, _ = load_checkpoint(args.model)
    x = load_inputs(args.data, meta["features"])
    mask, info = personalize(base, meta, x, cfg, args.out, device, args.compact, _bar("fine-prune"))
    report = {"out": str(args.out), **{k: v for k, v in asdict(info).items() if k not in ("hist", "settings")},
              "layer_sparsity": mask.layer_sparsity(), "file_bytes": os.path.getsize(args.out)}
    if args.report:
        from common.io import atomic_write_text
        atomic_write_text(args.report, json.dumps(report, indent=2))
    return report


def cmd_simulate(args) -> dict:
    from simulations.simulate import simulate

    overrides = {"task": args.task, "num-clients": args.clients, "out-dir": args.out}
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    if args.data:
        overrides["data-path"] = args.data
    report = simulate(overrides, verbose=args.verbose)
    a = report["analysis"] or {}
    return {"report": report["files"]["json"], "clients": len(report["clients"]),
            "failed": len(report["failed"]), "rejected": len(report["rejected"]),
            "mean_sparsity": sum(c["sparsity"] for c in report["clients"]) / max(len(report["clients"]), 1),
            "mean_pairwise_similarity": a.get("mean_pairwise_similarity"), "clusters": a.get("clusters"),
            "wall_seconds": report["wall_seconds"]}


def _device(name):
    from client.personalize import resolve_device
    return resolve_device(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fineprune", description="Label-free personalization by pruning.")
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="train a base model with labels (vendor side) and save a checkpoint")
    pt.add_argument("--task", default="digits", help=f"one of: {', '.join(TASKS)} (default digits)")
    pt.add_argument("--data", help="dataset directory (fsdd, speechcommands, imagefolder)")
    pt.add_argument("--out", required=True, help="checkpoint file to write")
    pt.add_argument("--epochs", type=int, help="training epochs (task default if omitted)")
    pt.add_argument("--exclude-speaker", help="fsdd/speechcommands: leave this speaker out of training")
    pt.add_argument("--vendor-frac", type=float, default=0.5,
                    help="digits: share of the images the vendor trains on; the rest are users' (default 0.5)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pt.set_defaults(func=cmd_pretrain)

    pz = sub.add_parser("personalize", help="fine-prune a base model on a user's unlabeled data (edge device)")
    pz.add_argument("--model", required=True, help="base checkpoint from `fineprune pretrain`")
    pz.add_argument("--data", required=True,
                    help="directory of the user's WAV or image files, or a .npy/.pt array of inputs")
    pz.add_argument("--out", required=True, help="personalized checkpoint to write")
    ST.add_options(pz, (ST.PRUNE, ST.CLI))  # every engine setting, from the one settings table
    pz.add_argument("--compact", action="store_true", help="physically remove pruned units (smaller, faster)")
    pz.add_argument("--report", help="also write the report as JSON here")
    pz.set_defaults(func=cmd_personalize)
    sm = sub.add_parser("simulate", help="federated personalization on Flower's simulation engine")
    sm.add_argument("--task", default="digits", help=f"one of: {', '.join(TASKS)} (default digits)")
    sm.add_argument("--clients", type=int, default=10, help="number of simulated devices (default 10)")
    sm.add_argument("--out", required=True, help="directory for report.json, report.md, plots, device storage")
    sm.add_argument("--data", help="dataset directory (fsdd, speechcommands, imagefolder)")
    sm.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any run-config key of pyproject.toml, e.g. --set summary-level=bitmap")
    sm.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sm.set_defaults(func=cmd_simulate)

    from simulations import bench, bench_gpu
    bn = sub.add_parser("bench", help="the benchmark: every method on the same users, results.csv/.md and plots")
    bench.build_parser(bn).set_defaults(func=bench.main)
    bg = sub.add_parser("bench-gpu", help="engine throughput on a large model (ResNet50, 224x224) on GPU or CPU")
    bench_gpu.build_parser(bg).set_defaults(func=bench_gpu.main)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except USER_ERRORS as exc:
        print(f"fineprune: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("FINEPRUNE_DEBUG"):
            raise
        print(f"fineprune: internal error: {type(exc).__name__}: {exc} (set FINEPRUNE_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fineprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "layer_sparsity")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
