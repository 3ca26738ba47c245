"""Flower ServerApp: distribute the base model, collect mask summaries, analyze, report."""
from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import __version__
from common.data.protocol import task_dataset, vendor_train_test
from common.model.checkpoint import load_checkpoint
from common.model.restricted import OutputRestricted
from common.wire.federation import default_out_dir, merged_config
from server.pretrain import pretrain
from server.report import earlier_reports, flatten_rounds, run_summary, write_report
from server.strategy import FinePruneStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


def base_model(cfg: dict, out: Path):
    """The run's base model: a checkpoint the run names, or one pretrained now on vendor data."""
    path = cfg["base-checkpoint"]
    if not path:
        path = out / "base.pt"
        if not path.exists():  # a restarted server reuses it
            ds = task_dataset(cfg["task"], cfg["data-path"])
            r = pretrain(cfg["task"], path, epochs=cfg["pretrain-epochs"] or None, seed=cfg["seed"], ds=ds,
                         indices=vendor_train_test(cfg["task"], ds, cfg["seed"]))
            log(INFO, "pretrained base model on %d vendor samples: test accuracy %.3f", r["train_samples"],
                r["test_accuracy"])
    model, meta, _ = load_checkpoint(path)
    if isinstance(model, OutputRestricted):
        raise ValueError(f"{path} is a personalized model; the run needs a base model")
    return model, meta


def run_server(grid: Grid, run_config: dict, overrides: dict | None = None) -> dict:
    t0 = time.time()
    cfg = merged_config(run_config, overrides)
    out = Path(cfg["out-dir"] or default_out_dir())
    out = out.expanduser().resolve()
    cfg["out-dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    base, meta = base_model(cfg, out)
    strategy = FinePruneStrategy(base, meta, cfg)
    report = {"fineprune_version": __version__, "config": cfg, "rounds": strategy.rounds,
              "previous_runs": earlier_reports(out)}

    def save(_round_record):  # after every round: a crash later loses nothing already reported
        report["wall_seconds"] = time.time() - t0
        report.update(flatten_rounds(strategy.rounds))
        write_report(out, report)

    strategy.on_round = save
    strategy.start(grid, initial_arrays=ArrayRecord(), num_rounds=cfg["num-rounds"],
                   timeout=cfg["round-timeout"])
    report["wall_seconds"] = time.time() - t0
    report.update(flatten_rounds(strategy.rounds))
    return conclude(out, report)


def conclude(out: Path, report: dict) -> dict:
    """The run's last word: the final report (marked finished, so whoever waits on it, such as
    `fineprune simulate`, may stop the run) and a summary a person reads. A run in which no device
    did the work in any round says so and fails, so Flower marks it failed (`flwr list`)."""
    report["finished"] = True
    idle = not any(r["clients"] for r in report["rounds"])
    if idle:
        report["error"] = "no device did the work"
    paths = write_report(out, report)
    print(run_summary(dict(report, files={k: str(v) for k, v in paths.items()})), flush=True)
    if idle:
        failed = sum(len(r["failed"]) for r in report["rounds"])
        rejected = sum(len(r["rejected"]) for r in report["rounds"])
        raise RuntimeError(f"no device did the work in any round ({failed} failed, {rejected} rejected); "
                           f"see {paths['markdown']}")
    return report
