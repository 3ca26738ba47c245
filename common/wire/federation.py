"""What the ServerApp and the ClientApp agree on: run-config defaults, how a base model travels
(ArrayRecord + metadata). Which users a simulation has is common/data/protocol.py's."""
from __future__ import annotations

import json

import torch

from common import settings as ST
from common.wire.privacy import check_epsilon

# Every key of [tool.flwr.app.config], spelled as in TOML ("auto" for a value the data decides);
# the ServerApp fills in what a run leaves out. Derived from the one settings table.
DEFAULTS = ST.run_config_defaults()
CLIENT_KEYS = ST.names(ST.CLIENT)  # what the server sends every ClientApp
PARTITIONINGS = ST.BY_NAME["partitioning"].choices


def default_out_dir():
    """Where a run writes when its config names no out-dir: ~/fineprune-runs/<time>."""
    from datetime import datetime
    from pathlib import Path

    return Path.home() / "fineprune-runs" / datetime.now().strftime("%Y%m%d-%H%M%S")


def merged_config(run_config: dict, overrides: dict | None = None) -> dict:
    """The run's settings: the table's defaults, then the run config, then overrides; every value
    checked. Values stay in TOML spelling ("auto"), so the dict can travel in a ConfigRecord."""
    merged = {**(run_config or {}), **(overrides or {})}
    unknown = [k for k in merged if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown run-config key '{unknown[0]}' (known: {', '.join(DEFAULTS)})")
    cfg = {k: ST.AUTO if v is None else v for k, v in ST.parse_values(merged, ST.RUN).items()}
    if cfg["classes-min"] > cfg["classes-max"]:
        raise ValueError(f"classes-min ({cfg['classes-min']}) is above classes-max ({cfg['classes-max']})")
    if cfg["privacy-epsilon"] != 0:
        check_epsilon(cfg["privacy-epsilon"])
        if cfg["summary-level"] != "bitmap":
            raise ValueError(f"privacy-epsilon needs summary-level 'bitmap', not '{cfg['summary-level']}'")
        if cfg["slim-base"]:
            # sybils that prune a chosen set make "pruned by a quorum" read back one device's mask
            # on it (README: what the slim base reveals): nothing of it in a private run
            raise ValueError("slim-base is off in private runs (privacy-epsilon > 0): colluding devices could "
                             "read one device's mask back from it")
    if cfg["prior"] == "on" and cfg["summary-level"] != "bitmap":
        raise ValueError(f"prior 'on' is built from masks: it needs summary-level 'bitmap', not "
                         f"'{cfg['summary-level']}'")
    if cfg["prior"] == "on" and cfg["slim-base"]:
        raise ValueError("prior 'on' and slim-base exclude each other: the prior is per connection of the base "
                         "the devices pruned, and a slim base has other connections")
    prune_settings(cfg)  # invalid engine combinations fail here, before any client runs
    return cfg


def prior_enabled(cfg: dict) -> bool:
    """Whether the server sends the prior in the rounds after the first (setting prior)."""
    return cfg["prior"] == "on" or (cfg["prior"] == "auto" and cfg["summary-level"] == "bitmap"
                                    and not cfg["slim-base"])


def class_prior_enabled(cfg: dict, meta: dict | None = None) -> bool:
    """Whether devices upload class means and the server gives back their pool in the rounds after
    the first (settings prior and class-sums): never in a private run (the means are exact), nor
    with a slim base (its output layer reads other features), nor where the base's metadata (`meta`)
    carries the vendor's own class directions, which its devices blend alone (S59): the pool's add
    nothing to them (P13, docs/federation.md)."""
    return (cfg["prior"] != "off" and cfg["class-sums"] and cfg["num-rounds"] > 1 and not cfg["privacy-epsilon"]
            and not cfg["slim-base"] and not (meta or {}).get("class_directions"))


def prune_settings(cfg: dict):
    """The engine's PruneConfig from a run's settings, checked as the engine will check it."""
    from common.engine.prune import check_config

    return check_config(ST.PruneConfig.from_settings(ST.parse_values({k: cfg[k] for k in ST.names(ST.PRUNE)},
                                                                     ST.PRUNE)))


# ---------------------------------------------------------------- base model transport
def base_to_records(model: torch.nn.Module, meta: dict):
    from flwr.app import ArrayRecord, ConfigRecord

    from common.model.checkpoint import model_meta

    keep = model_meta(meta)
    return ArrayRecord.from_torch_state_dict(model.state_dict()), ConfigRecord({"meta": json.dumps(keep)})


def records_to_base(arrays, meta_record):
    """The base model a device received: its metadata checked against the device's limits before
    anything is built (a server cannot make a device allocate 20 GB or open a path of its own)."""
    from common.model.architectures import build_model
    from common.model.checkpoint import CheckpointError, check_model_fits, check_model_meta

    try:
        meta = json.loads(meta_record["meta"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("the base model's metadata is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch_kwargs"), dict):
        raise CheckpointError("the base model's metadata is malformed")
    meta["arch_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["arch_kwargs"].items()}
    meta = check_model_meta(meta)
    model = build_model(meta["arch"], **meta["arch_kwargs"])
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"the base model's weights do not fit its metadata: {str(exc)[:200]}") from None
    check_model_fits(model, meta, "the base model")
    return model.eval(), meta


def model_bytes(model: torch.nn.Module) -> int:
    """Size of the dense fp32 model: the yardstick for upload sizes."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
