"""The frame of a study over the benchmark's cohorts: its command line (--fsdd, --out, --cohorts),
each chosen cohort's users (bases cached under OUT/bases), and its outputs (csv, json, md and a
bar plot of the mean held-out accuracy per arm and cohort)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import first_sentence
from common.data import readers as D
from common.io import atomic_write_csv, atomic_write_png, atomic_write_text
from simulations.bench_tasks import COHORTS, cohort_users


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=first_sentence(doc))
    p.add_argument("--fsdd", help="FSDD directory (e.g. ../shared/data/fsdd), for the speech cohorts")
    p.add_argument("--out", required=True, help="output folder (bases cached under OUT/bases)")
    p.add_argument("--cohorts", default=",".join(COHORTS), help=f"comma-separated subset of: {', '.join(COHORTS)}")
    return p


def run(a: argparse.Namespace, run_cohort) -> list[dict]:
    """`run_cohort(name, users)`'s rows over every cohort --cohorts names (an unknown one: one line
    and exit), on one thread."""
    cohorts = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from: {', '.join(COHORTS)})")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = D.load_fsdd(a.fsdd) if a.fsdd and any(c.startswith("fsdd") for c in cohorts) else None
    rows = []
    for c in cohorts:
        rows += run_cohort(c, cohort_users(c, out, 0, ds))
    return rows


def bar_plot(table: list[dict], names: list, title: str, path: Path, figsize=(8, 4), fontsize: int = 8) -> None:
    """One bar per name (a key of each summary row) per cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    w = 0.8 / len(names)
    for i, a in enumerate(names):
        ax.bar([k + i * w for k in range(len(table))], [s[a] for s in table], w, label=a)
    ax.set_xticks([k + w * (len(names) - 1) / 2 for k in range(len(table))], [s["cohort"] for s in table])
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=fontsize)
    ax.set_title(title)
    atomic_write_png(path, fig)


def write(out: Path, stem: str, rows: list[dict], table: list[dict], markdown: str) -> None:
    """OUT/stem.csv (a row per user), .json (rows and summary) and .md; the markdown printed too."""
    out = Path(out)
    atomic_write_csv(out / f"{stem}.csv", rows)
    atomic_write_text(out / f"{stem}.json", json.dumps({"rows": rows, "summary": table}, indent=2))
    atomic_write_text(out / f"{stem}.md", markdown)
    print(markdown)
