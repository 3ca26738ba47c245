"""What the later rounds changed for each device: its first round (alone) against its last (with the
federation's prior), per device, as a table, a summary line and a plot of the change against the
device's sample count (held-out accuracy where the simulation measures it, and sparsity)."""
from __future__ import annotations

from pathlib import Path

from common.io import atomic_write_png


def compare_rounds(rounds: list[dict]) -> list[dict] | None:
    """Per device present in the first and the last round: both rounds' sparsity and held-out
    accuracy, whether the last had the prior, and its sample count. None for a one-round run."""
    if len(rounds) < 2:
        return None
    first = {c["id"]: c for c in rounds[0]["clients"]}
    out = []
    for c in rounds[-1]["clients"]:
        a = first.get(c["id"])
        if a is None:
            continue
        row = {"id": c["id"], "samples": c.get("num_samples", 0), "with_prior": bool(c.get("with_prior")),
               "sparsity_first": a["sparsity"], "sparsity_last": c["sparsity"]}
        for k in ("accuracy_base", "accuracy_personalized"):
            if k in c and k in a:
                row[k + "_first"], row[k + "_last"] = a[k], c[k]
        out.append(row)
    return out


def summary_line(rows: list[dict], last_round: int) -> str:
    """One line: mean accuracy and sparsity, first round against the last, and who lost."""
    n = len(rows)
    if not n:
        return f"round 1 against round {last_round}: no device replied in both"
    text = (f"round 1 (alone) -> round {last_round} ({sum(r['with_prior'] for r in rows)} of {n} with the prior): "
            f"sparsity {sum(r['sparsity_first'] for r in rows) / n:.2f} -> {sum(r['sparsity_last'] for r in rows) / n:.2f}")
    acc = [r for r in rows if "accuracy_personalized_first" in r]
    if acc:
        d = [r["accuracy_personalized_last"] - r["accuracy_base_last"] for r in acc]
        text += (f"; held-out accuracy {sum(r['accuracy_personalized_first'] for r in acc) / len(acc):.3f} -> "
                 f"{sum(r['accuracy_personalized_last'] for r in acc) / len(acc):.3f} (base "
                 f"{sum(r['accuracy_base_last'] for r in acc) / len(acc):.3f}; worst user against its base "
                 f"{min(d):+.3f}, {sum(x < -1e-9 for x in d)} below it)")
    return text


def to_markdown(rows: list[dict], last_round: int, md_text) -> list[str]:
    lines = [f"## Round 1 (alone) against round {last_round} (with the federation's prior)", "",
             summary_line(rows, last_round), "",
             "| client | samples | prior | sparsity 1 | sparsity last | acc base | acc 1 | acc last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["samples"]):
        acc = ([f"{r['accuracy_base_last']:.3f}", f"{r['accuracy_personalized_first']:.3f}",
                f"{r['accuracy_personalized_last']:.3f}"] if "accuracy_personalized_first" in r else ["-"] * 3)
        lines.append(f"| {md_text(r['id'])} | {r['samples']} | {'yes' if r['with_prior'] else 'no'} | "
                     f"{r['sparsity_first']:.3f} | {r['sparsity_last']:.3f} | " + " | ".join(acc) + " |")
    return lines + [""]


def plot(rows: list[dict], last_round: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in rows if "accuracy_personalized_first" in r]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(11 if acc else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.scatter([r["samples"] for r in rows], [r["sparsity_last"] - r["sparsity_first"] for r in rows], s=14)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("device's samples")
    ax.set_ylabel(f"sparsity, round {last_round} minus round 1")
    ax.set_title("What the prior changed: sparsity")
    if acc:
        ax = axes[0][1]
        ax.scatter([r["samples"] for r in acc],
                   [100 * (r["accuracy_personalized_last"] - r["accuracy_personalized_first"]) for r in acc], s=14)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("device's samples")
        ax.set_ylabel(f"held-out accuracy, round {last_round} minus round 1 (points)")
        ax.set_title("What the prior changed: accuracy")
    atomic_write_png(path, fig)
