"""The federation's prior on the wire: per prunable layer, the share of devices that pruned each
connection, one byte per connection (0-255), in an array record beside a small record that says how
many devices it aggregates. The server builds it from at least slim-min-clients masks; the device
checks every field against its own base before any of it is used (names, dtypes, shapes, values),
and refuses a prior that does not fit with one line saying why."""
from __future__ import annotations

import json

import numpy as np
import torch

from common.engine.prior import Prior

LEVELS = 255  # a share is sent as round(255 x share)


class PriorError(ValueError):
    """A prior from the server that this device will not use."""


def to_records(shares: dict, voters: int, round_: int):
    """The prior as Flower records: (ArrayRecord of uint8 shares, ConfigRecord of its metadata)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(np.rint(v.detach().cpu().double().clamp(0, 1).numpy() * LEVELS).astype(np.uint8))
                          for k, v in shares.items()})
    return arrays, ConfigRecord({"meta": json.dumps({"voters": int(voters), "round": int(round_)})})


def from_records(arrays, meta_record, shapes: dict, samples: float, min_voters: int = 2) -> Prior:
    """The prior a device received, checked against its base's prunable layers (`shapes`: name ->
    weight shape): exactly those layers, each a uint8 array of the weight's shape, and at least
    `min_voters` devices behind it. `samples`: what the device counts it as (prior-samples)."""
    try:
        meta = json.loads(meta_record["meta"])
        voters = meta["voters"]
    except (KeyError, TypeError, ValueError):
        raise PriorError("the prior's metadata is not JSON with a voter count") from None
    if not isinstance(voters, int) or isinstance(voters, bool) or voters < min_voters:
        raise PriorError(f"the prior aggregates {voters!r} devices, fewer than {min_voters}")
    names = set(arrays.keys())
    if names != set(shapes):
        raise PriorError(f"the prior names {len(names)} layers, this model has {len(shapes)} prunable ones "
                         f"(first unknown: {sorted(names - set(shapes))[:1] or sorted(set(shapes) - names)[:1]})")
    pruned = {}
    for k, shape in shapes.items():
        a = arrays[k]
        if a.dtype != "uint8" or tuple(a.shape) != tuple(shape):
            raise PriorError(f"the prior's layer {k} is {a.dtype} {tuple(a.shape)}, not uint8 {tuple(shape)}")
        try:
            v = a.numpy()
        except Exception:
            raise PriorError(f"the prior's layer {k} is not a readable array") from None
        if v.dtype != np.uint8 or tuple(v.shape) != tuple(shape):  # the bytes, not only what they claim
            raise PriorError(f"the prior's layer {k} holds {v.dtype} {tuple(v.shape)}, not uint8 {tuple(shape)}")
        pruned[k] = torch.from_numpy(v.astype(np.float32) / LEVELS)
    return Prior(pruned, float(samples), voters)
