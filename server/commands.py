"""Vendor commands of `fineprune`: pretrain a base model with labels."""
from __future__ import annotations

from common.cli import progress_bar


def add_parser(sub, name: str, text: str):
    from common.tasks import TASKS

    pt = sub.add_parser(name, help=text, description=text)
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


def cmd_pretrain(args) -> dict:
    from common.forward import resolve_device
    from common.pretrain import pretrain
    from common.tasks import get_task

    get_task(args.task)  # an unknown task is refused before anything is loaded
    return pretrain(args.task, args.out, data=args.data, epochs=args.epochs, seed=args.seed,
                    device=resolve_device(args.device), exclude_speaker=args.exclude_speaker,
                    vendor_frac=args.vendor_frac, progress=progress_bar("pretrain"))
