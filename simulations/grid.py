"""Experiment grid: run several federated configurations on Flower's simulation engine and
collect their reports into one table (grid.csv, grid.md).

    python -m simulations.grid --out runs/grid --set task=digits --vary summary-level=stats,sketch,bitmap \
        --vary scoring=usage,magnitude
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from common.cli import first_sentence
from common.io import atomic_write_csv, atomic_write_text
from simulations.simulate import simulate

COLUMNS = ["run", "clients", "failed", "mean_sparsity", "mean_upload_bytes", "upload_fraction",
           "mean_prune_seconds", "accuracy_base", "accuracy_personalized", "mean_similarity",
           "consensus_sparsity", "clusters", "wall_seconds"]


def row_of(name: str, report: dict) -> dict:
    cs = report["clients"]
    mean = lambda k: float(np.mean([c[k] for c in cs])) if cs and k in cs[0] else None
    a = report["analysis"] or {}
    return {"run": name, "clients": len(cs), "failed": len(report["failed"]) + len(report["rejected"]),
            "mean_sparsity": mean("sparsity"), "mean_upload_bytes": mean("upload_bytes"),
            "upload_fraction": mean("upload_fraction"), "mean_prune_seconds": mean("prune_seconds"),
            "accuracy_base": mean("accuracy_base"), "accuracy_personalized": mean("accuracy_personalized"),
            "mean_similarity": a.get("mean_pairwise_similarity"), "consensus_sparsity": a.get("consensus_sparsity"),
            "clusters": len(a.get("clusters") or []), "wall_seconds": report["wall_seconds"]}


def _parse(items: list[str] | None) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"expected KEY=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run_grid(out: Path, fixed: dict, vary: dict[str, list[str]]) -> list[dict]:
    rows = []
    keys = list(vary)
    for values in itertools.product(*(vary[k] for k in keys)) if keys else [()]:
        setting = dict(zip(keys, values))
        name = ",".join(f"{k}={v}" for k, v in setting.items()) or "default"
        run_dir = out / (name.replace("=", "-").replace(",", "_") or "default")
        print(f"[grid] {name}", flush=True)
        rows.append(row_of(name, simulate({**fixed, **setting, "out-dir": str(run_dir)})))
        write_table(out, rows)  # after each run: an interrupted grid keeps what it finished
    return rows


def write_table(out: Path, rows: list[dict]) -> None:
    atomic_write_csv(out / "grid.csv", rows, COLUMNS)
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    atomic_write_text(out / "grid.md", "\n".join(md) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", help="fixed run-config KEY=VALUE (repeatable)")
    p.add_argument("--vary", action="append", help="KEY=V1,V2,... (repeatable; all combinations run)")
    a = p.parse_args(argv)
    vary = {k: v.split(",") for k, v in _parse(a.vary).items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run_grid(out, {"num-clients": 10, **_parse(a.set)}, vary)
    print((out / "grid.md").read_text())


if __name__ == "__main__":
    main()
