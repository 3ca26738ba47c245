"""Label shift on a BatchNorm-heavy network that no threshold was chosen on: the resnet-few
protocol (the vendor trains on white-on-black digits at 32x32; users hold 2-3 classes, every other
one in a colour of its own; `--style` adds the fonts) on another torchvision ResNet, ResNet50 by
default (bottleneck blocks, four times ResNet18's BatchNorm layers). Each user whole and cut to its
first one and two classes, personalized by the default, beside AdaBN, T3A, LAME, AdaBN+T3A and the
backprop-with-labels ceiling. An out-of-sample check of the default, not a set to tune on.

    python -m simulations.arch_study --out runs/arch_study
    python -m simulations.arch_study --style --seed 1 --epochs 20 --out runs/arch_study

Writes OUT/arch_study.{csv,json,md,png}: per user every method's held-out accuracy; per number of
classes held, the mean, the users more than 2 points below their base and the worst user against
its base, per method (docs/personalization.md, out of sample).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from pathlib import Path

import torch

from common.cli import first_sentence
from simulations.bench_report import BACKPROP

METHODS = ("default", "adabn", "t3a", "lame", "adabn+t3a", BACKPROP)


def measure(base, meta, user) -> dict:
    """One user's held-out accuracy per method, the default's sparsity and BatchNorm mode."""
    from common.engine.prune import fine_prune, personalized_model
    from common.model.train import accuracy
    from common.settings import PruneConfig
    from simulations import baselines as BL

    m = copy.deepcopy(base)
    res = fine_prune(m, user.x, PruneConfig(), base_meta=meta)
    row = {"user": user.user_id, "samples": len(user.x), "heldout": len(user.heldout_y),
           "base": accuracy(base, user.heldout_x, user.heldout_y),
           "default": accuracy(personalized_model(m, res), user.heldout_x, user.heldout_y),
           "sparsity": round(res.sparsity, 4), "bn": res.adaptation.get("bn"), "head": res.adaptation.get("head")}
    label_free, ceiling = BL.beside(base, user)
    return {**row, **label_free, BACKPROP: ceiling}


def summary(rows: list[dict]) -> list[dict]:
    """Per number of classes held ('all': the user whole): users, the base's mean, and per method
    the mean, the users more than 2 points below their base and the worst user against it."""
    out = []
    for k in dict.fromkeys(r["classes held"] for r in rows):
        sel = [r for r in rows if r["classes held"] == k]
        s = {"cohort": f"classes held: {k}", "classes held": k, "users": len(sel),
             "base": statistics.mean(r["base"] for r in sel), "sparsity": statistics.mean(r["sparsity"] for r in sel)}
        for a in METHODS:
            s[a] = statistics.mean(r[a] for r in sel)
            s[f"{a} below"] = sum(r[a] - r["base"] < -0.02 for r in sel)
            s[f"{a} worst"] = min(r[a] - r["base"] for r in sel)
        out.append(s)
    return out


def markdown(title: str, table: list[dict]) -> str:
    lines = [f"# {title}", "", "Mean held-out accuracy (users more than 2 points below their base; worst user "
             "against its base); the default's mean sparsity.", "",
             "| classes held | users | base | " + " | ".join(METHODS) + " | sparsity |",
             "|---|---|---|" + "---|" * (len(METHODS) + 1)]
    for s in table:
        cells = [f"{s[a]:.3f} ({s[a + ' below']}; {s[a + ' worst']:+.3f})" for a in METHODS]
        lines.append(f"| {s['classes held']} | {s['users']} | {s['base']:.3f} | " + " | ".join(cells)
                     + f" | {s['sparsity']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    from simulations import cohort_study as CS
    from simulations.bench_tasks import resnet_few_task
    from simulations.few_class_study import held

    p = argparse.ArgumentParser(prog="python -m simulations.arch_study", description=first_sentence(__doc__))
    p.add_argument("--arch", default="resnet50", choices=("resnet50", "resnet18"), help="the vendor's network")
    p.add_argument("--seed", type=int, default=0, help="the base's and the users' seed")
    p.add_argument("--epochs", type=int, default=6, help="the vendor's training epochs")
    p.add_argument("--style", action="store_true", help="the users of resnet-style (fonts on top of colours)")
    p.add_argument("--out", required=True, help="output folder (the base cached under OUT/bases)")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error(f"--epochs must be at least 1, got {a.epochs}")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    users = resnet_few_task(out, a.seed, epochs=a.epochs, style=a.style, arch=a.arch)
    rows = []
    for i, (base, meta, u) in enumerate(users):
        for k, v in held(u):
            rows.append({"classes held": k, **measure(base, meta, v)})
            r = rows[-1]
            print(f"  [{i + 1}/{len(users)}] {r['user']} (n={r['samples']}): base {r['base']:.3f}, default "
                  f"{r['default']:.3f} at {r['sparsity']:.2f} ({r['bn']}, {r['head']}), T3A {r['t3a']:.3f}",
                  flush=True)
    table = summary(rows)
    setup = f"{a.arch} on the {'resnet-style' if a.style else 'resnet-few'} protocol, seed {a.seed}, {a.epochs} epochs"
    title = f"{setup}: the default against the label-free baselines"
    CS.bar_plot(table, ["base", *METHODS], setup, out / "arch_study.png", figsize=(10, 4), fontsize=7)
    CS.write(out, "arch_study", rows, table, markdown(title, table))
    return rows


if __name__ == "__main__":
    main()
