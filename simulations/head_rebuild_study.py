"""Does the output head gain from being rebuilt on the pruned model's own features? The default
writes its head (T3A's prototypes, or the blend) from the unpruned adapted model's features before
the stop rule's search; pruning then moves the features under it. This study personalizes each
benchmark user with the default, then rebuilds the same head on the pruned model's features (one
more pass over the user's data, or over the probe only) and scores both on held-out labels.

    python -m simulations.head_rebuild_study --fsdd ../shared/data/fsdd --out runs/head_rebuild

Rows per cohort: the base, the default, the head rebuilt from all of the user's data and from the
probe alone, with each one's worst user against the default (docs/personalization.md, S18).
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch

from common.engine.forward import features_and_logits
from common.engine.heads import HEADS
from common.engine.probe import probe_pick
from common.engine.prune import fine_prune
from common.model.architectures import prunable_layers
from common.model.train import accuracy
from common.settings import PruneConfig
from simulations import cohort_study as CS

ARMS = ("base", "default", "rebuilt (all data)", "rebuilt (probe)")


def rebuilt(model, res, x, head: str):
    """A copy of the personalized model whose head is written again from its own features on x;
    the restriction's rows, if any, stay pruned."""
    m = copy.deepcopy(model)
    feats, logits, last = features_and_logits(m, x)
    HEADS[head].write(last, feats, logits)
    with torch.no_grad():
        last.weight.mul_(res.mask.layers[list(prunable_layers(m))[-1]].to(last.weight))
    return m


def run_cohort(name: str, users) -> list[dict]:
    rows = []
    for base, meta, u in users:
        model = copy.deepcopy(base)
        res = fine_prune(model, u.x, PruneConfig(), base_meta=meta)
        head = res.adaptation.get("head")
        row = {"cohort": name, "user": u.user_id, "head": head, "bn": res.adaptation.get("bn"),
               "sparsity": round(res.sparsity, 4), "base": accuracy(base, u.heldout_x, u.heldout_y),
               "default": accuracy(model, u.heldout_x, u.heldout_y)}
        if HEADS[head].write is None or res.sparsity == 0:  # the base's layer, or nothing pruned
            row["rebuilt (all data)"] = row["rebuilt (probe)"] = row["default"]
        else:
            row["rebuilt (all data)"] = accuracy(rebuilt(model, res, u.x, head), u.heldout_x, u.heldout_y)
            probe = u.x[probe_pick(PruneConfig(), len(u.x))]
            row["rebuilt (probe)"] = accuracy(rebuilt(model, res, probe, head), u.heldout_x, u.heldout_y)
        rows.append(row)
        print(f"  {name} {u.user_id}: " + ", ".join(f"{a} {row[a]:.3f}" for a in ARMS), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for c in dict.fromkeys(r["cohort"] for r in rows):
        sel = [r for r in rows if r["cohort"] == c]
        s = {"cohort": c, "users": len(sel), **{a: statistics.mean(r[a] for r in sel) for a in ARMS}}
        for a in ARMS[2:]:
            s[f"{a} worst vs default"] = min(r[a] - r["default"] for r in sel)
        out.append(s)
    return out


def to_markdown(table: list[dict]) -> str:
    lines = ["# The head rebuilt on the pruned features (S18)", "",
             "| cohort | users | base | default | rebuilt (all data) | worst user vs default | rebuilt (probe) | "
             "worst user vs default |", "|---|---|---|---|---|---|---|---|"]
    for s in table:
        lines.append(f"| {s['cohort']} | {s['users']} | {s['base']:.3f} | {s['default']:.3f} | "
                     f"{s['rebuilt (all data)']:.3f} | {s['rebuilt (all data) worst vs default']:+.3f} | "
                     f"{s['rebuilt (probe)']:.3f} | {s['rebuilt (probe) worst vs default']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = CS.parser("python -m simulations.head_rebuild_study", __doc__).parse_args(argv)
    rows = CS.run(a, run_cohort)
    table = summarize(rows)
    CS.write(Path(a.out), "head_rebuild", rows, table, to_markdown(table))
    CS.bar_plot(table, list(ARMS), "The default's head, and rebuilt on the pruned features",
                Path(a.out) / "head_rebuild.png")


if __name__ == "__main__":
    main()
