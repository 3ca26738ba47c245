"""The engine's GPU path against its CPU path on the same users: same masks (or how many
connections differ), same sparsity, and the personalized model's predictions. Run where a GPU is:

    python -m simulations.gpu_check
"""
from __future__ import annotations

import copy
import json
import sys
import warnings

import torch


def main() -> dict:
    import tempfile
    from pathlib import Path

    from common.engine.prune import fine_prune
    from common.settings import PruneConfig
    from simulations.bench_cost import load_workload

    warnings.simplefilter("ignore")
    out = {}
    with tempfile.TemporaryDirectory() as d:
        base, x, _y, _ = load_workload("digits", Path(d), 0)
        cases = [("digits", base, x)]
        r18, xr, _, _ = load_workload("resnet18", Path(d), 0, 64, size=112)
        cases.append(("resnet18-112", r18, xr))
        for name, model, data in cases:
            for cfg_name, cfg in (("default", PruneConfig()), ("fixed 0.7", PruneConfig(target_sparsity=0.7))):
                res = {}
                for dev in ("cpu", "cuda"):
                    m = copy.deepcopy(model)
                    r = fine_prune(m, data, cfg, dev)
                    with torch.no_grad():
                        pred = m.to(dev).eval()(data[:32].to(dev)).argmax(1).cpu()
                    res[dev] = (r, pred)
                (a, pa), (b, pb) = res["cpu"], res["cuda"]
                differ = int(a.mask.hamming(b.mask, normalized=False))
                out[f"{name} {cfg_name}"] = {"cpu_sparsity": round(a.sparsity, 4), "cuda_sparsity": round(b.sparsity, 4),
                                             "connections_differing": differ, "total": a.mask.total(),
                                             "same_predictions_32": bool(torch.equal(pa, pb)),
                                             "cpu_history": a.history, "cuda_history": b.history}
                print(name, cfg_name, {k: v for k, v in out[f"{name} {cfg_name}"].items() if "history" not in k},
                      flush=True)
    return out


if __name__ == "__main__":
    r = main()
    if len(sys.argv) > 1:
        from common.io import atomic_write_text
        atomic_write_text(sys.argv[1], json.dumps(r, indent=2))
