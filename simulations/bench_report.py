"""The benchmark's tables and plots: per-task summaries, the personalization comparison (label-free
baselines, fine-pruning, the backprop ceiling), results.md and the PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write_png

LEVELS = (0.5, 0.7, 0.9)
SCORERS = ("usage", "usage-share", "discriminative", "firing", "magnitude", "random")
WITH_BN = ("usage+bn", "magnitude+bn", "discriminative+bn")  # criteria compared with BatchNorm recalibration
DEFAULT = ("default", "stop")                  # the engine's defaults, whatever they are
SECOND = ("default+second probe", "stop")      # the same, its stop judged again on a second probe (S31)
# the engine's default before the safe one: every BatchNorm layer recalibrated, the base's output
# layer, output restriction, no search bound, no back-off and no second probe
PREVIOUS_DEFAULT = dict(bn_adapt="full", head="linear", restrict_outputs=True, evidence_samples=0, stop_margin=0,
                        confirm="off", compensate="off", paired_bn=False)
HEADLINE = ("usage+bn+restrict", "stop")       # the previous default: usage, full recalibration, restriction
DISC = ("discriminative+bn+restrict", "stop")  # the same with pseudo-class-discriminative magnitude
BACKPROP = "backprop-5ep (labels)"


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for key in dict.fromkeys((r["method"], r["level"]) for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and (r["method"], r["level"]) == key]
            mem = [r["peak_mb"] for r in rs if r["peak_mb"] is not None]
            out.append({"task": task, "method": key[0], "level": key[1], "users": len(rs),
                        **{k: float(np.mean([r[k] for r in rs])) for k in
                           ("accuracy_base", "accuracy", "sparsity", "seconds", "x_inference", "forward_passes",
                            "backward_passes", "upload_bytes")},
                        "accuracy_min": float(np.min([r["accuracy"] for r in rs])),
                        "delta_min": float(np.min([r["accuracy"] - r["accuracy_base"] for r in rs])),
                        "peak_mb": float(np.mean(mem)) if mem else None})
    return out


def headline(summary: list[dict]) -> list[dict]:
    """Per task: the label-free stop vs the paper's ~70% / ~90%, the winner at 70%, and costs."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        at70 = {m: get[(m, "0.7")]["accuracy"] for m in SCORERS + WITH_BN if (m, "0.7") in get}
        stop, bp = get[DEFAULT], get[(BACKPROP, "-")]
        out.append({"task": task, "base_accuracy": get[("base", "-")]["accuracy"],
                    "stop_accuracy": stop["accuracy"], "stop_sparsity": stop["sparsity"],
                    "winner_at_0.7": max(at70, key=at70.get), "accuracy_at_0.7": at70,
                    "stop_x_inference": stop["x_inference"], "backprop_x_inference": bp["x_inference"],
                    "backprop_over_stop_time": bp["seconds"] / stop["seconds"],
                    "target_0.7_x_inference": get[("usage", "0.7")]["x_inference"],
                    "backprop_over_target_0.7_time": bp["seconds"] / get[("usage", "0.7")]["seconds"],
                    "backprop_accuracy": bp["accuracy"]})
    return out


BASELINES4 = ("adabn", "t3a", "lame", "adabn+t3a")
PERSONALIZATION = [("base", "-"), ("adabn", "-"), ("t3a", "-"), ("lame", "-"), ("adabn+t3a", "-"),
                   ("stem-bn+t3a", "-"), ("tent (backprop, no labels)", "-"), DEFAULT, SECOND, HEADLINE,
                   ("usage+bn (base stats)", "0.7"),
                   ("usage+bn", "0.7"), ("magnitude+bn", "0.7"), ("discriminative+bn", "0.7"),
                   ("discriminative+bn", "stop"), DISC, ("discriminative+bn+proto", "0.7"),
                   ("discriminative+bn+proto", "stop"), (BACKPROP, "-")]


def personalization_table(summary) -> list[dict]:
    """Per task, one row per method of the personalization comparison: mean accuracy, sparsity,
    the worst user's change from the base, and the margin over the best label-free baseline."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        best = max(get[(b, "-")]["accuracy"] for b in BASELINES4)
        for key in PERSONALIZATION:
            s = get[key]
            out.append({"task": task, "method": key[0], "level": key[1], "accuracy": s["accuracy"],
                        "sparsity": s["sparsity"], "worst_user_delta": s["delta_min"],
                        "over_best_baseline": s["accuracy"] - best, "x_inference": s["x_inference"]})
    return out


def _grouped_bars(ax, rows: list[dict], keys: list, value: str):
    """One group of bars per task, one bar per (method, level) key."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    width = 0.85 / len(keys)
    colors = __import__("matplotlib").colormaps["tab20"].colors  # 20 distinct colours: no bar shares one
    for i, key in enumerate(keys):
        vals = [next(r[value] for r in rows if r["task"] == t and (r["method"], r["level"]) == key) for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, color=colors[i % len(colors)],
               label=f"{key[0]} {key[1] if key[1] != '-' else ''}")
    ax.set_xticks(np.arange(len(tasks)) + width * (len(keys) - 1) / 2, tasks)


def plot_personalization(table, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["method"], r["level"]) for r in table))
    tasks = list(dict.fromkeys(r["task"] for r in table))
    fig, ax = plt.subplots(figsize=(max(9, 2.2 * len(tasks)), 4.5))
    _grouped_bars(ax, table, keys, "accuracy")
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0.4, 1.02)
    ax.set_title("Personalization: label-free baselines, fine-pruning and the backprop ceiling")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    atomic_write_png(path, fig)


def default_table(summary) -> list[dict]:
    """Per task, the default against its base and the label-free baselines: mean held-out accuracy,
    the worst user's change from the base, the gap to the best of AdaBN, T3A, LAME and AdaBN+T3A,
    sparsity at the label-free stop, and the backprop-with-labels ceiling."""
    out = []
    for task in dict.fromkeys(s["task"] for s in summary):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        best = max(BASELINES4, key=lambda b: get[(b, "-")]["accuracy"])
        d = get[DEFAULT]
        out.append({"task": task, "users": d["users"], "base": get[("base", "-")]["accuracy"],
                    "default": d["accuracy"], "worst_user_delta": d["delta_min"], "sparsity": d["sparsity"],
                    "best_baseline": best, "best_baseline_accuracy": get[(best, "-")]["accuracy"],
                    "gap_to_best_baseline": d["accuracy"] - get[(best, "-")]["accuracy"],
                    "previous_default": get[HEADLINE]["accuracy"],
                    "previous_default_worst_user_delta": get[HEADLINE]["delta_min"],
                    "safe_baseline": get[("stem-bn+t3a", "-")]["accuracy"],
                    "backprop_ceiling": get[(BACKPROP, "-")]["accuracy"], "x_inference": d["x_inference"]})
    return out


def to_markdown(summary, heads, comps, wall: float) -> str:
    lines = ["The default per cohort (mean held-out accuracy; worst user = the largest drop below its own base):", "",
             "| task | users | base | default | worst user vs base | sparsity | best of AdaBN/T3A/LAME/AdaBN+T3A | "
             "default vs it | stem-BN+T3A (safe baseline) | previous default (worst user) | backprop ceiling | "
             "x one inference pass |", "|" + "---|" * 12]
    for r in default_table(summary):
        lines.append(f"| {r['task']} | {r['users']} | {r['base']:.3f} | **{r['default']:.3f}** | "
                     f"{r['worst_user_delta']:+.3f} | {r['sparsity']:.2f} | {r['best_baseline']} "
                     f"{r['best_baseline_accuracy']:.3f} | {r['gap_to_best_baseline']:+.3f} | {r['safe_baseline']:.3f} | "
                     f"{r['previous_default']:.3f} ({r['previous_default_worst_user_delta']:+.3f}) | "
                     f"{r['backprop_ceiling']:.3f} | {r['x_inference']:.2f} |")
    lines += ["", "| task | method | level | acc | sparsity | worst user vs base | vs best of AdaBN/T3A/LAME/AdaBN+T3A "
              "| x one inference pass |", "|" + "---|" * 8]
    for r in personalization_table(summary):
        lines.append(f"| {r['task']} | {r['method']} | {r['level']} | {r['accuracy']:.3f} | {r['sparsity']:.2f} | "
                     f"{r['worst_user_delta']:+.3f} | {r['over_best_baseline']:+.3f} | {r['x_inference']:.2f} |")
    lines += ["", "| task | method | sparsity level | users | acc (base) | acc | min user acc | sparsity | s/user | "
             "x one inference pass | fwd passes | bwd passes | upload B | peak MB |", "|" + "---|" * 14]
    for s in summary:
        pk = f"{s['peak_mb']:.1f}" if s["peak_mb"] is not None else ""
        lines.append(f"| {s['task']} | {s['method']} | {s['level']} | {s['users']} | {s['accuracy_base']:.3f} | "
                     f"{s['accuracy']:.3f} | {s['accuracy_min']:.3f} | {s['sparsity']:.3f} | {s['seconds']:.3f} | "
                     f"{s['x_inference']:.2f} | {s['forward_passes']:.2f} | {s['backward_passes']:.1f} | "
                     f"{s['upload_bytes']:.0f} | {pk} |")
    lines += ["", "| task | base acc | the default at its label-free stop: acc @ sparsity | winner at 70% | "
              "stop: x inference | backprop / stop time | usage@0.7: x inference | backprop / usage@0.7 time | "
              "backprop acc |", "|" + "---|" * 9]
    for h in heads:
        lines.append(f"| {h['task']} | {h['base_accuracy']:.3f} | {h['stop_accuracy']:.3f} @ {h['stop_sparsity']:.3f} "
                     f"| {h['winner_at_0.7']} ({h['accuracy_at_0.7'][h['winner_at_0.7']]:.3f}) | "
                     f"{h['stop_x_inference']:.2f} | {h['backprop_over_stop_time']:.1f}x | "
                     f"{h['target_0.7_x_inference']:.2f} | {h['backprop_over_target_0.7_time']:.1f}x | "
                     f"{h['backprop_accuracy']:.3f} |")
    if comps:
        lines += ["", "| task | compacted model | sparsity | acc | widths base -> compact | latency ms (1 sample, "
                  "1 thread) | bytes | same predictions |", "|" + "---|" * 8]
        for c in comps:
            lines.append(f"| {c['task']} | {c['method']} | {c['sparsity']:.3f} | {c['accuracy']:.3f} | "
                         f"{c['widths_base']} -> {c['widths_compact']} | {c['latency_ms_base']:.3f} -> "
                         f"{c['latency_ms_compact']:.3f} | {c['bytes_base']} -> {c['bytes_compact']} | "
                         f"{c['same_predictions']} |")
    lines += ["", f"Wall time of the whole benchmark: {wall:.0f} s on {torch.get_num_threads()} CPU threads."]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_sparsity(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        get = {(s["method"], s["level"]): s for s in summary if s["task"] == task}
        start = {m: get[("bn-recal", "-")] for m in WITH_BN}
        for m in SCORERS + WITH_BN:
            pts = [start.get(m, get[("base", "-")])] + [get[(m, str(lv))] for lv in LEVELS]
            line, = ax.plot([p["sparsity"] for p in pts], [p["accuracy"] for p in pts], "o-", label=m)
            st = get[(m, "stop")]
            ax.plot(st["sparsity"], st["accuracy"], "*", ms=12, color=line.get_color())
        h = get[DEFAULT]
        ax.plot(h["sparsity"], h["accuracy"], "kP", ms=11, label="the default, label-free stop")
        ax.axhline(get[(BACKPROP, "-")]["accuracy"], color="grey", ls="--", label="backprop 5 ep (labels)")
        ax.axhline(get[("base", "-")]["accuracy"], color="black", ls=":", label="base model")
        ax.set_title(f"{task} (stars: label-free stop / matched)")
        ax.set_xlabel("sparsity of prunable weights")
        ax.set_ylabel("mean held-out accuracy")
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=7, loc="lower left")
    atomic_write_png(path, fig)


def plot_compute(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [("base", "-"), ("bn-recal", "-"), ("usage", "0.7"), ("usage", "stop"), DEFAULT, HEADLINE, (BACKPROP, "-")]
    fig, ax = plt.subplots(figsize=(9, 4))
    _grouped_bars(ax, summary, show, "x_inference")
    ax.set_yscale("log")
    ax.set_ylabel("wall time / one inference pass (log)")
    ax.set_title("Compute per user, in units of one plain inference pass over the same data")
    ax.legend(fontsize=7)
    atomic_write_png(path, fig)


