"""The federation's personalization without Flower: the same base the ServerApp pretrains, the
same simulated users the ClientApps build, the same device path (client/personalize.py), one
process. For measuring what the default does to every user of `fineprune simulate --clients N`
in minutes, not for federating (the engine is Flower's: simulations/simulate.py).

    python -m simulations.federation_check --clients 10,50 --out runs/fedcheck
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from common.cli import first_sentence
from common.io import atomic_write_text
from common.wire.federation import merged_config, prune_settings


def run(clients: int, out: Path, overrides: dict | None = None) -> dict:
    from client.personalize import personalize
    from common.data.protocol import simulated_user, task_dataset, vendor_train_test
    from common.model.checkpoint import load_checkpoint
    from common.model.train import accuracy
    from server.pretrain import pretrain

    cfg = merged_config({}, dict(overrides or {}, **{"num-clients": clients}))
    base_path = out / f"base_{cfg['task']}_s{cfg['seed']}.pt"
    if not base_path.exists():
        ds = task_dataset(cfg["task"], cfg["data-path"])
        pretrain(cfg["task"], base_path, seed=cfg["seed"], ds=ds, indices=vendor_train_test(cfg["task"], ds, cfg["seed"]))
    base, meta, _ = load_checkpoint(base_path)
    users = []
    with tempfile.TemporaryDirectory() as tmp:
        for pid in range(clients):
            u = simulated_user(cfg, pid, clients)
            path = Path(tmp) / f"u{pid}.pt"
            personalize(base, meta, u.unlabeled, prune_settings(cfg), path)
            model, pmeta, _ = load_checkpoint(path)
            info = pmeta["personalization"]
            users.append({"user": pid, "samples": len(u.unlabeled), "heldout": len(u.heldout_y),
                          "base": accuracy(base, u.heldout_x, u.heldout_y),
                          "personalized": accuracy(model, u.heldout_x, u.heldout_y),
                          "sparsity": info["sparsity"], "adaptation": info.get("adaptation", {})})
            print(json.dumps({k: v for k, v in users[-1].items() if k != "adaptation"}), file=sys.stderr, flush=True)
    d = [u["personalized"] - u["base"] for u in users]
    res = {"clients": clients, "mean_base": sum(u["base"] for u in users) / clients,
           "mean_personalized": sum(u["personalized"] for u in users) / clients,
           "worse": sum(x < -1e-9 for x in d), "better": sum(x > 1e-9 for x in d), "worst": min(d),
           "mean_sparsity": sum(u["sparsity"] for u in users) / clients, "users": users}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--clients", default="10,50")
    p.add_argument("--out", default="runs/fedcheck")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE run-config override")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    over = dict(kv.split("=", 1) for kv in a.set)
    results = [run(int(n), out, over) for n in a.clients.split(",")]
    for r in results:
        print(f"{r['clients']} clients: base {r['mean_base']:.3f} -> {r['mean_personalized']:.3f}; worse "
              f"{r['worse']}, better {r['better']}, worst {r['worst']:+.3f}; sparsity {r['mean_sparsity']:.2f}")
    atomic_write_text(out / "federation_check.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
