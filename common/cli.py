"""`fineprune`, the command line: a dispatcher only. Each command lives with its part and is
imported when it runs: device commands in client/commands.py, vendor commands in
server/commands.py, experiments in simulations/commands.py, so the edge path loads neither the
benchmark nor Ray. Errors from bad input are one line and exit 2."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys

from common import memory

COMMANDS = {  # name: (module that builds and runs it, one-line help)
    "pretrain": ("server.commands", "train a base model with labels (vendor side) and save a checkpoint"),
    "keygen": ("server.commands", "make the operator's app-signing key pair (Ed25519)"),
    "sign-app": ("server.commands", "sign the Flower app for devices that run only signed apps"),
    "personalize": ("client.commands", "fine-prune a base model on a user's unlabeled data (edge device)"),
    "evaluate": ("client.commands", "accuracy of a model on labeled examples, per class, with a confusion matrix"),
    "predict": ("client.commands", "classify WAV or image files: one JSON line per file"),
    "info": ("client.commands", "what a checkpoint holds: task, classes, input, sparsity, restriction, fingerprints"),
    "export": ("client.commands", "write a model as ONNX, TorchScript or ExecuTorch .pte for runtimes without Python"),
    "simulate": ("simulations.commands", "federated personalization on Flower's simulation engine"),
    "bench": ("simulations.commands", "the benchmark: every method on the same users, results.csv/.md and plots"),
    "bench-scale": ("simulations.commands", "federation scaling: wall time, peak memory and cost per client at 10-5,000 clients"),
    "bench-federation": ("simulations.commands", "what the federation's prior gives back: round 1 alone against round 2, per device, plain and private"),
    "bench-cost": ("simulations.commands", "what personalization costs, in inference passes, per workload, with where the time goes"),
    "bench-gpu": ("simulations.commands", "engine throughput on a large model (ResNet50, 224x224) on GPU or CPU"),
}


# commands whose work runs in this process, so that the process's memory policy (--memory) is
# theirs; a simulation's clients run in Ray's worker processes, which it does not reach
IN_PROCESS = ("pretrain", "personalize", "evaluate", "predict", "export", "bench", "bench-cost", "bench-gpu",
              "bench-federation")

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def first_sentence(doc: str) -> str:
    """A module docstring's first sentence, whole (for `--help`), however it is wrapped."""
    text = " ".join(doc.split())
    m = re.search(r"\.(\s|$)", text)
    return text[:m.start() + 1] if m else text


def auto_threads() -> int:
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def set_threads(value) -> int:
    """torch's intra-op thread count, chosen rather than inherited (torch takes every core)."""
    import torch

    if str(value) == "auto":
        n = auto_threads()
    else:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"--threads must be a positive integer or auto, got '{value}'") from None
        if not 1 <= n <= 1024:
            raise ValueError(f"--threads must be between 1 and 1024, got {n}")
    torch.set_num_threads(n)
    return n


def user_errors() -> tuple:
    from common.data.readers import DataError
    from common.model.checkpoint import CheckpointError
    from common.model.mask import MaskError

    return CheckpointError, DataError, MaskError, ValueError, FileNotFoundError, PermissionError


def progress_bar(desc: str):
    """A tqdm progress callback: progress(done, total, text)."""
    from tqdm import tqdm

    state = {}

    def update(done, total, text=""):
        if state.get("closed"):
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.n = done
        bar.set_postfix_str(text[:60])
        bar.refresh()
        if done >= total:
            bar.close()
            state["closed"] = True
    return update


class RunFailed(RuntimeError):
    """The command ran as asked, but its work did not happen (no device replied): exit 1."""


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full options of the command being run (argv's first word); the others by name and help
    only, so that their modules are not imported."""
    from common import __version__

    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    p = argparse.ArgumentParser(prog="fineprune", description="Label-free personalization by pruning.")
    p.add_argument("--version", action="version", version=f"fineprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(sub, name, text)
            sub.choices[name].add_argument(
                "--threads", default="auto", metavar="N",
                help="torch CPU threads (default auto: half the cores, at most 4; 1 on a 2-core machine). Small "
                     "models on a busy machine run faster on 1: intra-op threads spin-wait for each other")
            if name in IN_PROCESS:
                sub.choices[name].add_argument(
                    "--memory", default="release", choices=memory.CHOICES,
                    help="keep: freed memory stays in the process for the next pass (Linux, glibc): ResNet50 "
                         "over 64 images on the CPU 2.1-2.4x faster, no page faults, for 2.7 GB resident instead "
                         "of a 1.6 GB peak; release (default): the C library's own behaviour")
        else:
            sub.add_parser(name, help=text, add_help=False)
    p.commands = sub.choices  # each command's own parser, for parse's hints
    return p


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The --options a parser accepts, read from its help's usage (argparse has no public list)."""
    import re

    return list(dict.fromkeys(re.findall(r"(--[A-Za-z0-9][A-Za-z0-9-]*)", parser.format_help())))


def parse(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """argparse, except that an unknown option names the command it was given to and the options
    of that command it resembles (`--sparsity` -> `--target-sparsity`)."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = getattr(parser, "commands", {}).get(getattr(args, "command", None))
    known = _long_options(sub or parser)
    hints = []
    for word in (e.split("=", 1)[0] for e in extra if e.startswith("--")):
        close = [o for o in known if word[2:] and word[2:] in o] or difflib.get_close_matches(word, known, n=2, cutoff=0.6)
        if close:
            hints.append(f"{word}: did you mean {' or '.join(close[:3])}?")
    (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(build_parser(argv), argv)
    if not hasattr(args, "func"):  # a command whose module was not loaded: only for --help of it
        return main([args.command, "--help"])
    import warnings

    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning  # no file names and source lines for a user to read
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fineprune: warning: {message}", file=file or sys.stderr)


def _run(args) -> int:
    try:
        set_threads(args.threads)
        if hasattr(args, "memory"):
            memory.set_memory(args.memory)
        result = args.func(args)
    except user_errors() as exc:
        print(f"fineprune: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fineprune: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:  # the machine's fault: disk full...
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"fineprune: error{where}: {os.strerror(exc.errno)}; nothing was half-written "
                  f"(files are replaced whole or not at all)", file=sys.stderr)
            return 74  # EX_IOERR (sysexits.h)
        if os.environ.get("FINEPRUNE_DEBUG"):
            raise
        print(f"fineprune: internal error: {type(exc).__name__}: {exc} (set FINEPRUNE_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fineprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    if result is not None:  # predict prints its own JSON lines
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "layer_sparsity")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
