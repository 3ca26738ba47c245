"""Vendor and operator commands of `fineprune`: pretrain a base model with labels; make the
operator's app-signing key and sign the app that devices will run."""
from __future__ import annotations

from common.cli import progress_bar


def add_parser(sub, name: str, text: str):
    {"pretrain": _add_pretrain, "keygen": _add_keygen, "sign-app": _add_sign_app}[name](sub, name, text)


def _add_keygen(sub, name: str, text: str):
    pk = sub.add_parser(name, help=text, description=text)
    pk.add_argument("--out", required=True, help="directory for NAME (private, 0600) and NAME.pub")
    pk.add_argument("--name", default="operator", help="file name of the key (default operator)")
    pk.set_defaults(func=cmd_keygen)


def cmd_keygen(args) -> dict:
    from pathlib import Path

    from common.wire.appsign import load_public_keys, make_signing_key

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory for the key pair")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise ValueError(f"--name {args.name!r} is not a file name")
    for p in (Path(args.out) / args.name, Path(args.out) / f"{args.name}.pub"):
        if p.exists():
            raise ValueError(f"{p} exists already: a key is never overwritten (choose another --out or --name)")
    paths = make_signing_key(args.out, args.name)
    (kid,) = load_public_keys(paths["public"])
    return {"private": str(paths["private"]), "public": str(paths["public"]), "key_id": kid}


def _add_sign_app(sub, name: str, text: str):
    ps = sub.add_parser(name, help=text, description=text + ". Devices started with fineprune-superexec "
                        "--trusted-keys KEY.pub run only apps signed this way.")
    ps.add_argument("--key", required=True, help="the operator's Ed25519 private key (fineprune keygen)")
    ps.add_argument("--app", default=".", help="the Flower app directory to sign (default .)")
    ps.add_argument("--out", required=True, help="directory to write the signed app to (replaced); "
                    "then: flwr run OUT FEDERATION")
    ps.set_defaults(func=cmd_sign_app)


def cmd_sign_app(args) -> dict:
    from pathlib import Path

    from common.wire.appsign import sign_app

    app, out = Path(args.app).resolve(), Path(args.out).resolve()
    if not (app / "pyproject.toml").is_file():
        raise ValueError(f"--app {app} has no pyproject.toml: not a Flower app")
    if out == app or app in out.parents or out in app.parents:
        raise ValueError("--out must be a directory outside the app (it is replaced)")
    if not Path(args.key).is_file():
        raise FileNotFoundError(f"--key {args.key} does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory for the signed app")
    return sign_app(app, args.key, out)


def _add_pretrain(sub, name: str, text: str):
    from common.data.protocol import VENDOR_FRAC
    from common.data.tasks import TASKS

    pt = sub.add_parser(name, help=text, description=text)
    pt.add_argument("--task", default="digits", help=f"one of: {', '.join(TASKS)} (default digits)")
    pt.add_argument("--data", help="dataset directory (fsdd, speechcommands, imagefolder)")
    pt.add_argument("--out", required=True, help="checkpoint file to write")
    pt.add_argument("--epochs", type=int, help="training epochs (task default if omitted)")
    pt.add_argument("--exclude-speaker", help="fsdd/speechcommands: leave this speaker out of training")
    pt.add_argument("--vendor-frac", type=float, default=VENDOR_FRAC,
                    help=f"digits: share of the images the vendor trains on; the rest are users' (default {VENDOR_FRAC})")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pt.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> dict:
    from common.data.tasks import get_task
    from common.model.batches import resolve_device
    from server.pretrain import pretrain

    get_task(args.task)  # an unknown task is refused before anything is loaded
    return pretrain(args.task, args.out, data=args.data, epochs=args.epochs, seed=args.seed,
                    device=resolve_device(args.device), exclude_speaker=args.exclude_speaker,
                    vendor_frac=args.vendor_frac, progress=progress_bar("pretrain"))
