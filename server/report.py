"""Run report: report.json (per-client rows and the analysis), report.md and PNG plots."""
from __future__ import annotations

import json
import os
from datetime import datetime
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from common.io import atomic_write_png, atomic_write_text
from server import rounds as R


def write_report(out: Path, report: dict) -> dict:
    """Writes report.json, report.md, layer_sparsity.png and similarity.png under out; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    last = report["rounds"][-1] if report["rounds"] else None
    if last and last["clients"]:
        paths["layer_sparsity_png"] = out / "layer_sparsity.png"
        plot_layer_sparsity(last["analysis"], paths["layer_sparsity_png"])
        if last["analysis"].get("similarity_view"):
            paths["similarity_png"] = out / "similarity.png"
            plot_similarity(last["analysis"], paths["similarity_png"])
    compared = R.compare_rounds(report["rounds"])
    report["rounds_compared"] = compared
    if compared:
        paths["rounds_png"] = out / "rounds.png"
        R.plot(compared, len(report["rounds"]), paths["rounds_png"])
    report["files"] = {k: str(v) for k, v in paths.items()}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=_jsonable))
    atomic_write_text(paths["markdown"], to_markdown(report))
    return paths


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def plot_layer_sparsity(analysis: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = analysis["layer_names"]
    rows = analysis["layer_sparsity"]
    fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 3, 4))
    data = np.array(list(rows.values()))
    ax.boxplot(data, tick_labels=layers, showfliers=False)
    for i in range(len(layers)):
        ax.scatter(np.full(len(data), i + 1) + np.linspace(-0.15, 0.15, len(data)), data[:, i], s=12, alpha=0.7)
    if analysis.get("consensus_layer_sparsity"):
        ax.plot(range(1, len(layers) + 1), [analysis["consensus_layer_sparsity"][n] for n in layers], "k_",
                markersize=20, label=f"consensus (q={analysis['consensus_quorum']})")
        ax.legend()
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity (share of weights pruned)")
    ax.set_title(f"Per-layer sparsity across {len(rows)} clients")
    atomic_write_png(path, fig)


def plot_similarity(analysis: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = analysis["similarity_view"]
    sim, labels = np.array(view["matrix"]), view["labels"]
    side = min(0.45 * len(sim) + 3, 11)  # bounded: 200 cells per side at most (server/analysis.py)
    fig, ax = plt.subplots(figsize=(side, side - 0.5))
    im = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    if labels is not None and len(labels) <= 60:
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
    else:
        per = view["clients_per_cell"]
        ax.set_xlabel(f"{len(analysis['similarity_ids'])} clients ordered by cluster" +
                      (f", {per} per cell (block means)" if per > 1 else ""))
    for b in view["cluster_bounds"] if len(view["cluster_bounds"]) <= 40 else []:
        cell = b / view["clients_per_cell"] - 0.5 if view["clients_per_cell"] > 1 else b - 0.5
        ax.axhline(cell, color="w", lw=0.6)
        ax.axvline(cell, color="w", lw=0.6)
    fig.colorbar(im, ax=ax, label="Jaccard similarity of pruned sets")
    ax.set_title(f"Mask similarity, {analysis['similarity_method']}, by cluster")
    atomic_write_png(path, fig)


def to_markdown(report: dict) -> str:
    lines = ["# fineprune run report", "", f"- task: {report['config']['task']}, clients asked: "
             f"{report['config']['num-clients']}, summary level: {report['config']['summary-level']}, "
             f"scoring: {report['config']['scoring']}", f"- wall time: {report.get('wall_seconds', 0):.1f} s"]
    eps = report["config"].get("privacy-epsilon", 0)
    if eps:
        lines.append(f"- private summaries: randomized response on mask bits, epsilon {eps:g} per connection; "
                     "sparsity, similarity and consensus below are debiased estimates")
    if report.get("previous_runs"):
        lines.append(f"- earlier runs in this directory, kept in report.json: {len(report['previous_runs'])}")
    lines.append("")
    for rnd in report["rounds"]:
        a = rnd["analysis"]
        lines += [f"## Round {rnd['round']} (base {rnd['base_fingerprint'][:12]}, {rnd['base_bytes']} bytes)", "",
                  "| client | sparsity | upload bytes | upload / model | prune s | acc base | acc personal | stop |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in rnd["clients"]:
            lines.append(f"| {md_text(c['id'])} | {c['sparsity']:.3f} | {c['upload_bytes']} | "
                         f"{c['upload_fraction']:.4%} | {c['prune_seconds']:.2f} | {_fmt(c.get('accuracy_base'))} | "
                         f"{_fmt(c.get('accuracy_personalized'))} | {md_text(c['stop_reason'], 200)} |")
        lines += ["", f"- accepted {len(rnd['clients'])}, rejected {len(rnd['rejected'])} {rnd['incidents']['rejected']}, "
                      f"failed {len(rnd['failed'])} {rnd['incidents']['failed']}"]
        for r in rnd["rejected"] + rnd["failed"]:
            lines.append(f"  - node {r['node']}: {md_text(r['reason'])}")
        lines += [f"- similarity: {a['similarity_method']}; mean pairwise Jaccard {_fmt(a['mean_pairwise_similarity'])}",
                  f"- clusters: {md_text(a['clusters'], 2000)}",
                  f"- consensus (q={a['consensus_quorum']}) sparsity: {_fmt(a['consensus_sparsity'])}; "
                  f"pruned by all, upper bound: {_fmt(a['consensus_all_upper_bound'])}"]
        if "layer_agreement" in a:
            lines.append(f"- layers users agree on most / least: {a['layer_agreed_most']} / {a['layer_agreed_least']}")
        if "slim_base" in rnd:
            lines.append(f"- slim shared base: {rnd['slim_base']}")
        if "prior" in rnd:
            lines.append(f"- prior for the next round: {md_text(rnd['prior'], 2000)}")
        if "class_prior" in rnd:
            lines.append(f"- class directions for the next round: {md_text(rnd['class_prior'], 2000)}")
        lines.append("")
    if report.get("rounds_compared"):
        lines += R.to_markdown(report["rounds_compared"], len(report["rounds"]), md_text)
    return "\n".join(lines)


def run_summary(report: dict) -> str:
    """The few lines a person reads when a run ends: who replied, what it did to held-out accuracy
    (simulation with research-accuracy only), sparsity, and where the report is."""
    clients = report.get("clients") or []
    failed, rejected = report.get("failed") or [], report.get("rejected") or []
    asked = report.get("config", {}).get("num-clients", "?")
    lines = [f"clients: {len(clients)} replied, {len(failed)} failed, {len(rejected)} rejected "
             f"(of {asked} asked, {len(report.get('rounds') or [])} round(s), {report.get('wall_seconds', 0):.0f} s)"]
    pairs = [(c["accuracy_base"], c["accuracy_personalized"]) for c in clients
             if c.get("accuracy_base") is not None and c.get("accuracy_personalized") is not None]
    if pairs:
        deltas = [b - a for a, b in pairs]
        worse = sum(d < -1e-9 for d in deltas)
        better = sum(d > 1e-9 for d in deltas)
        lines.append(f"held-out accuracy: base {sum(a for a, _ in pairs) / len(pairs):.3f} -> personalized "
                     f"{sum(b for _, b in pairs) / len(pairs):.3f}; worst user {min(deltas):+.3f}, "
                     f"{worse} worse / {len(pairs) - worse - better} same / {better} better")
    if report.get("rounds_compared"):
        lines.append(R.summary_line(report["rounds_compared"], len(report["rounds"])))
    if clients:
        sp = sorted(c["sparsity"] for c in clients)
        lines.append(f"sparsity: mean {sum(sp) / len(sp):.2f} (min {sp[0]:.2f}, max {sp[-1]:.2f})")
    else:
        lines.append("no device did the work: see the failed and rejected reasons in report.md")
    files = report.get("files") or {}
    if files.get("json"):
        lines.append(f"report: {files['json']} (report.md and PNG plots beside it)")
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


_MD_SPECIAL = set("\\`*_{}[]()#+-.!|$~:")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}


def md_text(value, limit: int = 300) -> str:
    """Text a device gave (an id, a reason, an error), safe in Markdown and in the HTML it renders
    to: one line, control characters gone, HTML's specials as entities, every Markdown special
    (tables, links, emphasis, code, math) backslash-escaped. Shows as the characters it holds."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))[:limit]
    return "".join(_HTML.get(ch) or ("\\" + ch if ch in _MD_SPECIAL else ch) for ch in text)


def earlier_reports(out: Path) -> list[dict]:
    """What a run in this directory reported before (a restarted server): kept, never overwritten.
    An unreadable report.json is moved aside under a new name, not deleted."""
    path = out / "report.json"
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        aside = out / f"report.unreadable-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        os.replace(path, aside)
        log(WARNING, "earlier report.json unreadable (%s); kept as %s", exc, aside.name)
        return []
    previous = old.pop("previous_runs", None) or []
    old.pop("files", None)
    return previous + [old]


def flatten_rounds(rounds: list[dict]) -> dict:
    """Top-level view of the last round: per-client rows and the analysis."""
    if not rounds:
        return {"clients": [], "analysis": None}
    last = rounds[-1]
    return {"clients": last["clients"], "analysis": last["analysis"], "rejected": last["rejected"],
            "failed": last["failed"]}
