"""How the federation scales with the number of simulated devices: `fineprune simulate` at 10, 100,
1,000 and 5,000 digits clients on this machine, each run's wall time, the peak memory of every
process that runs it (Flower's SuperLink, its simulation process, Ray's workers and this one,
summed as PSS so that shared libraries count once), and the cost per client beside the engine's
own. Results: scale.csv, scale.json, scale.md and scale.png under --out.

    fineprune bench-scale --clients 10,100,1000,5000 --out runs/scale

Users come from partitioning=sampled (each draws client-samples images from its own 2-3 classes;
users overlap), the only partitioning that gives 5,000 clients data from digits' 899 pool images.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import threading
import time
from pathlib import Path

from common.io import atomic_write_bytes, atomic_write_png, atomic_write_text

WATCH = ("flower-superlink", "flwr-simulation", "flwr-serverapp", "flower-superexec", "ray::", "raylet",
         "gcs_server", "ray/dashboard", "ray/_private", "default_worker.py")


def _pss_mb(pid: str) -> float:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def federation_pss_mb() -> float:
    """PSS of this process and of every process of the simulation (matched by command line)."""
    total = _pss_mb(str(os.getpid()))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(w in cmd for w in WATCH):
            total += _pss_mb(pid)
    return total


class PeakSampler:
    """The highest `measure()` (default: federation_pss_mb) seen every `every` seconds."""

    def __init__(self, every: float = 0.5, measure=None):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self.measure = measure or federation_pss_mb
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_one(n: int, out: Path, workers: int, samples: int, overrides: dict | None = None) -> dict:
    from simulations.simulate import simulate

    d = out / f"n{n}"
    with PeakSampler() as peak:
        t0 = time.time()
        report = simulate({"num-clients": n, "min-clients": max(1, int(0.9 * n)), "partitioning": "sampled",
                           "client-samples": samples, "research-accuracy": False, "out-dir": str(d),
                           "round-timeout": 3600.0, **(overrides or {})}, backend_cpus=max(1, 2 // workers),
                          timeout=6 * 3600)
        wall = time.time() - t0
    engine = [c.get("prune_seconds", 0.0) for c in report["clients"]]
    per_client = wall * workers / n
    mean_engine = sum(engine) / max(len(engine), 1)
    device_bytes = sum(p.stat().st_size for p in (d / "devices").rglob("*") if p.is_file())
    return {"clients": n, "replied": len(report["clients"]), "failed": len(report["failed"]),
            "rejected": len(report["rejected"]), "wall_s": round(wall, 1), "peak_pss_mb": round(peak.peak),
            "cpu_s_per_client": round(per_client, 4), "engine_s_per_client": round(mean_engine, 4),
            "overhead_s_per_client": round(per_client - mean_engine, 4),
            "analysis_clusters": len(report["analysis"]["clusters"]) if report.get("analysis") else None,
            "device_storage_mb": round(device_bytes / 2**20, 1),
            "report_json_kb": round((d / "report.json").stat().st_size / 1024, 1),
            "similarity_png_kb": round((d / "similarity.png").stat().st_size / 1024, 1)
            if (d / "similarity.png").exists() else None,
            "mean_sparsity": round(sum(c["sparsity"] for c in report["clients"]) / max(len(report["clients"]), 1), 3),
            "rounds": len(report["rounds"]),
            "prior_voters": (report["rounds"][0].get("prior") or {}).get("voters") if report["rounds"] else None}


def write_results(rows: list[dict], out: Path, meta: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "scale.csv", buf.getvalue())
    atomic_write_bytes(out / "scale.json", json.dumps({"meta": meta, "rows": rows}, indent=2).encode())
    cols = ["clients", "rounds", "replied", "wall_s", "peak_pss_mb", "cpu_s_per_client", "engine_s_per_client",
            "overhead_s_per_client", "device_storage_mb", "report_json_kb"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    atomic_write_text(out / "scale.md", "\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].loglog(n, [r["wall_s"] for r in rows], "o-")
    axes[0].set_title("wall time (s)")
    axes[1].semilogx(n, [r["peak_pss_mb"] / 1024 for r in rows], "o-")
    axes[1].set_title("peak memory, all processes (GiB PSS)")
    axes[2].semilogx(n, [r["cpu_s_per_client"] for r in rows], "o-", label="all, per client")
    axes[2].semilogx(n, [r["engine_s_per_client"] for r in rows], "s-", label="engine, per client")
    axes[2].set_title("seconds per client (x workers)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("simulated clients")
    fig.tight_layout()
    atomic_write_png(out / "scale.png", fig)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--clients", default="10,100,1000,5000", help="comma-separated client counts")
    p.add_argument("--out", required=True, help="directory for the runs and scale.csv/json/md/png")
    p.add_argument("--workers", type=int, default=2, help="simulation workers (one CPU each; default 2)")
    p.add_argument("--client-samples", type=int, default=40, help="images per simulated user (default 40)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, e.g. --set num-rounds=2 --set summary-level=bitmap (the prior)")
    return p


def main(args) -> dict:
    try:
        counts = [int(c) for c in str(args.clients).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--clients must be comma-separated integers, got '{args.clients}'") from None
    if not counts or min(counts) < 1:
        raise ValueError("--clients needs at least one count >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    meta = {"cpus": os.cpu_count(), "workers": args.workers, "client_samples": args.client_samples,
            "partitioning": "sampled", "task": "digits", "overrides": overrides}
    for n in counts:
        print(f"bench-scale: {n} clients ...", flush=True)
        rows.append(run_one(n, out, args.workers, args.client_samples, overrides))
        print(json.dumps(rows[-1]), flush=True)
        write_results(rows, out, meta)  # after every size: a long run keeps what it measured
    return {"results": str(out / "scale.md"), "rows": rows}
