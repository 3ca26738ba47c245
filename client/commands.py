"""Device commands of `fineprune`: personalize a base model on this user's data."""
from __future__ import annotations

from common import settings as ST
from common.cli import progress_bar


def add_parser(sub, name: str, text: str):
    pz = sub.add_parser(name, help=text, description=text)
    pz.add_argument("--model", required=True, help="base checkpoint from `fineprune pretrain`")
    pz.add_argument("--data", required=True,
                    help="directory of the user's WAV or image files, or a .npy/.pt array of inputs")
    pz.add_argument("--out", required=True, help="personalized checkpoint to write")
    ST.add_options(pz, (ST.PRUNE, ST.CLI))  # every engine setting, from the one settings table
    pz.add_argument("--compact", action="store_true", help="physically remove pruned units (smaller, faster)")
    pz.add_argument("--report", help="also write the report as JSON here")
    pz.set_defaults(func=cmd_personalize)


def cmd_personalize(args) -> dict:
    import json
    import os
    from dataclasses import asdict

    from client.personalize import load_inputs, personalize
    from common.checkpoint import load_checkpoint
    from common.forward import resolve_device
    from common.prune import PruneConfig

    from pathlib import Path

    out, model = Path(args.out), Path(args.model)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the personalized checkpoint file to write")
    if out.exists() and model.exists() and out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is the base model itself; write the personalized model elsewhere")
    device = resolve_device(ST.given_options(args, ST.CLI)["device"])
    cfg = PruneConfig.from_settings(ST.given_options(args, ST.PRUNE))
    base, meta, _ = load_checkpoint(args.model)
    x = load_inputs(args.data, meta["features"])
    mask, info = personalize(base, meta, x, cfg, args.out, device, args.compact, progress_bar("fine-prune"))
    report = {"out": str(args.out), **{k: v for k, v in asdict(info).items() if k not in ("hist", "settings")},
              "layer_sparsity": mask.layer_sparsity(), "file_bytes": os.path.getsize(args.out)}
    if args.report:
        from common.io import atomic_write_text
        atomic_write_text(args.report, json.dumps(report, indent=2))
    return report
