"""Flower ClientApp: one edge device. Gets the base model once, fine-prunes it on the device's own
unlabeled data, keeps the personalized model locally and replies with a mask summary only."""
from __future__ import annotations

import math
import threading
import time
import traceback
from logging import ERROR
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.device import Device, device_inputs, research_accuracy
from client.faults import injected_fault
from common.data.protocol import simulated_user
from common.engine.class_prior import class_shape
from common.engine.prior import Prior
from common.memory import set_memory
from common.model.architectures import prunable_shapes
from common.wire import envelope as E
from common.wire import prior as PW
from common.wire.federation import merged_config, model_bytes, records_to_base

app = ClientApp()
STALL_SECONDS = 900.0


def _device_root(context: Context, cfg_run: dict) -> tuple[Path, int | None]:
    """A real device names its storage in node config (device-dir); a simulated one gets a
    folder per partition under the run's output directory."""
    nc = context.node_config
    if "device-dir" in nc:
        return Path(str(nc["device-dir"])), None
    pid = int(nc["partition-id"])
    return Path(cfg_run["out-dir"]) / "devices" / f"node-{pid:03d}", pid


class RoundTimeout(TimeoutError):
    """The device's work outlived the round: the server stopped waiting for it."""


def within(seconds: float, work):
    """work(cancel) in a worker thread, given `seconds`: then the ClientApp returns (an error
    reply) and frees its slot, instead of holding the simulation worker or the SuperNode while the
    work hangs (Flower's engine waits for a ClientApp without a timeout). The engine checks
    `cancel` at each step and stops; work that hangs outside it (a stuck read) is left behind in
    a daemon thread, asleep or blocked, and writes nothing once cancelled."""
    cancel, box = threading.Event(), {}

    def run():
        try:
            box["value"] = work(cancel)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
    t = threading.Thread(target=run, name="fineprune-round-work", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        cancel.set()
        raise RoundTimeout(f"no reply within the round's {seconds:g} s (round-timeout); work abandoned")
    if "error" in box:
        raise box["error"]
    return box["value"]


def device_choices(node_config) -> None:
    """The device's own process-wide choices, from its SuperNode's node config: torch's thread
    count (Ray already gives a simulated client 1) and whether freed memory stays in the process
    for the next pass (common/memory.py: 'keep' or 'release')."""
    if "threads" in node_config:
        torch.set_num_threads(max(1, int(node_config["threads"])))
    if "memory" in node_config:
        set_memory(str(node_config["memory"]))


def _privacy(device, cfg: dict, context: Context) -> float | None:
    """The epsilon of this device's summary: the device's own limit (node config
    max-privacy-epsilon, not the server's) decides, see Device.privacy."""
    max_eps = context.node_config.get("max-privacy-epsilon")
    return device.privacy(cfg["privacy-epsilon"] or None, None if max_eps is None else float(max_eps))


@app.train()
def train(msg: Message, context: Context) -> Message:
    c = msg.content[E.CONFIG]
    cfg = merged_config({k: c[k] for k in c.keys() if k not in E.ROUND_KEYS})
    cfg["out-dir"] = str(c[E.OUT_DIR])
    device_choices(context.node_config)
    private = context.node_config.get("max-privacy-epsilon") is not None or bool(cfg["privacy-epsilon"])
    t0 = time.monotonic()
    reply = error_reply(lambda: within(cfg["round-timeout"], lambda cancel: _train(msg, context, cfg, cancel)),
                        msg, private)
    if private:
        whole_seconds(reply, t0)
    return reply


def whole_seconds(reply: Message, t0: float) -> None:
    """A private device's reply leaves a whole number of seconds after its work began, stamped with
    that time: its timing says no more than its prune_seconds, which is rounded to the second."""
    elapsed = time.monotonic() - t0
    time.sleep(math.ceil(elapsed) - elapsed if elapsed > 0 else 0.0)
    now = time.time()
    # the reply still expires when the message it answers does (Flower drops a reply whose
    # created_at + ttl outlives the instruction's)
    reply.metadata.ttl = max(reply.metadata.ttl - (now - reply.metadata.created_at), 0.0)
    reply.metadata.created_at = now


def error_reply(work, msg: Message, private: bool) -> Message:
    """work(), or the error reply that tells the server the failure's kind as its code. The reason
    is the exception's first line; a private device sends its type only (a message can name the
    user's files: the path of a corrupt photo). The traceback stays in the device's log."""
    try:
        return work()
    except Exception as exc:
        log(ERROR, "this device's round failed:\n%s", traceback.format_exc())
        kind = "timeout" if isinstance(exc, RoundTimeout) else "client-error"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = (f"{type(exc).__name__} on a private device (details stay on the device)" if private
                  else f"{type(exc).__name__}: {first}")
        return Message(Error(E.failure_code(kind), reason), reply_to=msg)


def _check(cancel: threading.Event):
    if cancel.is_set():
        raise RoundTimeout("cancelled: the round is over")


def _train(msg: Message, context: Context, cfg: dict, cancel: threading.Event) -> Message:
    c = msg.content[E.CONFIG]
    base_fp = str(c[E.BASE_FINGERPRINT])
    root, pid = _device_root(context, cfg)
    name = str(pid) if pid is not None else str(context.node_config.get("device-name", root.name))
    fault = injected_fault(context.node_config, pid)
    if fault == "crash":
        raise RuntimeError(f"injected crash on {'partition' if pid is not None else 'device'} {name}")
    # simulated devices share one base store (one file per base), real devices keep their own
    device = Device(root, None if pid is None else Path(cfg["out-dir"]) / "devices" / "bases")
    if E.BASE in msg.content.array_records:
        model, meta = records_to_base(msg.content[E.BASE], msg.content[E.BASE_META])
        got = device.store_base(model, meta)
        if got != base_fp:
            raise RuntimeError(f"received base {got[:12]} does not match announced {base_fp[:12]}")
    base, meta = device.load_base(base_fp)
    if fault == "stall":
        time.sleep(STALL_SECONDS)  # a device stuck after it got the model: the server must go on
    _check(cancel)

    if pid is not None:
        user = simulated_user(cfg, pid, int(context.node_config["num-partitions"]))
        x, user_id = user.unlabeled, user.user_id
    else:
        x = device_inputs(str(context.node_config["data-dir"]), meta["features"])
        user_id = name
    mask, info = device.personalize(base, meta, base_fp, x, cfg, progress=lambda *a: _check(cancel),
                                    prior=received_prior(msg, base, cfg))
    _check(cancel)
    epsilon = _privacy(device, cfg, context)
    payload = device.upload(mask, info, cfg["summary-level"], base_fp, model_bytes(base), cfg["seed"], epsilon,
                            cfg["sketch-frac"], classes=cfg["class-sums"])

    reply = RecordDict({
        E.SUMMARY: ConfigRecord({E.SUMMARY_DATA: payload, E.SUMMARY_LEVEL: cfg["summary-level"]}),
        E.INFO: ConfigRecord({E.CLIENT: user_id,
                              E.STOP_REASON: info.stop_reason if epsilon is None else E.PRIVATE_STOP_REASON}),
        E.METRICS: MetricRecord(reply_metrics(info, len(payload), len(x), epsilon is not None)),
    })
    if pid is not None and cfg["research-accuracy"]:  # simulation only: labeled research accuracy
        reply[E.METRICS].update(research_accuracy(base, device, user.heldout_x, user.heldout_y))
    return Message(content=reply, reply_to=msg)


def received_prior(msg: Message, base, cfg: dict):
    """The federation's prior this round's message carries (the mask shares, the class directions,
    or both), checked against this device's base (common/wire/prior.py), or None: without one the
    device works as in a one-round run."""
    records = msg.content.array_records
    if E.PRIOR not in records and E.CLASSES not in records:
        return None
    shares = classes = None
    if E.PRIOR in records:
        if E.PRIOR_META not in msg.content.config_records:
            raise PW.PriorError("the prior comes without its metadata")
        shares = PW.from_records(msg.content[E.PRIOR], msg.content[E.PRIOR_META], prunable_shapes(base),
                                 cfg["prior-samples"], epsilon=cfg["privacy-epsilon"] or None)
    if E.CLASSES in records:
        if cfg["privacy-epsilon"]:
            raise PW.PriorError("a private run has no class directions: the server built them from exact means")
        if E.CLASSES_META not in msg.content.config_records:
            raise PW.PriorError("the class prior comes without its metadata")
        classes = PW.classes_from_records(msg.content[E.CLASSES], msg.content[E.CLASSES_META], class_shape(base))
    if shares is None:
        return Prior(None, float(cfg["prior-samples"]), classes.voters, classes)
    shares.classes = classes
    return shares


def reply_metrics(info, upload_bytes: int, num_samples: int, private: bool) -> dict:
    """What a device reports beside its summary. In private mode nothing but the noisy summary
    tells anything about the user: no exact sparsity (the stop reason goes too), no sample count,
    and the pruning time only to the second."""
    if private:
        return {"prune_seconds": float(round(info.prune_seconds)), "upload_bytes": upload_bytes,
                "resumed": int(info.resumed)}
    return {"prune_seconds": float(info.prune_seconds), "upload_bytes": upload_bytes, "num_samples": num_samples,
            "resumed": int(info.resumed), "sparsity": float(info.sparsity)}

