"""The federation's prior on the wire: per prunable layer, the share of devices that pruned each
connection, one byte per connection (0-255), in an array record beside a small record that says how
many devices it aggregates; and the class directions (common/engine/class_prior.py), float32 means
and class frequencies, likewise. The server builds each from at least slim-min-clients devices; the
device checks every field against its own base before any of it is used (names, dtypes, shapes,
values), and refuses a prior that does not fit with one line saying why."""
from __future__ import annotations

import json

import numpy as np
import torch

from common.engine import class_prior as CPR
from common.engine.prior import Prior
from common.wire.privacy import effective_voters, keep_probability

LEVELS = 255  # a share is sent as round(255 x share)
NOISE_Z = 2.0  # a private prior's share counts only beyond this many standard errors of its noise


class PriorError(ValueError):
    """A prior from the server that this device will not use."""


def to_records(shares: dict, voters: int, round_: int):
    """The prior as Flower records: (ArrayRecord of uint8 shares, ConfigRecord of its metadata)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(np.rint(v.detach().cpu().double().clamp(0, 1).numpy() * LEVELS).astype(np.uint8))
                          for k, v in shares.items()})
    return arrays, ConfigRecord({"meta": json.dumps({"voters": int(voters), "round": int(round_)})})


def from_records(arrays, meta_record, shapes: dict, samples: float, min_voters: int = 2,
                 epsilon: float | None = None) -> Prior:
    """The prior a device received, checked against its base's prunable layers (`shapes`: name ->
    weight shape): exactly those layers, each a uint8 array of the weight's shape, and at least
    `min_voters` devices behind it (randomized masks counted for what their bits still tell, P11).
    `samples`: what the device counts it as (prior-samples).
    `epsilon`: the run's privacy (the prior was built from randomized masks): see denoise."""
    try:
        meta = json.loads(meta_record["meta"])
        voters = meta["voters"]
    except (KeyError, TypeError, ValueError):
        raise PriorError("the prior's metadata is not JSON with a voter count") from None
    if not isinstance(voters, int) or isinstance(voters, bool) or voters < min_voters:
        raise PriorError(f"the prior aggregates {voters!r} devices, fewer than {min_voters}")
    worth = effective_voters(voters, epsilon)
    if worth < min_voters:  # randomized masks count for what their bits still tell (P11)
        raise PriorError(f"the prior aggregates {voters} randomized masks at epsilon {epsilon:g}, worth "
                         f"{worth:.1f} exact ones, fewer than {min_voters}")
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
    if epsilon:
        pruned = {k: denoise(v, voters, epsilon) for k, v in pruned.items()}
    return Prior(pruned, float(samples), voters)


def denoise(share: torch.Tensor, voters: int, epsilon: float) -> torch.Tensor:
    """A share debiased from `voters` randomized masks, less NOISE_Z standard errors of the
    randomized response's noise at that share (floored at 0). Beyond what the devices pruned, the
    true shares are 0 and the debiased ones noise of about 0.14 (epsilon 1, 50 devices): that
    noise would rank the connections the device's own ranking should. In the digits federation
    of 50 at epsilon 1 it cost 7 devices more than 2 points; without noise nothing is removed."""
    p = keep_probability(epsilon)
    q = share * p + (1 - share) * (1 - p)  # how often a device reports the connection pruned
    se = torch.sqrt(q * (1 - q) / voters) / (2 * p - 1)
    return (share - NOISE_Z * se).clamp_min(0)


def classes_to_records(prior: CPR.ClassPrior, round_: int):
    """The class directions as Flower records: (ArrayRecord of the means and frequencies, ConfigRecord)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({"means": Array(prior.means.float().numpy()), "freq": Array(prior.freq.float().numpy())})
    return arrays, ConfigRecord({"meta": json.dumps({"voters": int(prior.voters), "round": int(round_)})})


def classes_from_records(arrays, meta_record, shape: tuple, min_voters: int = 2) -> CPR.ClassPrior:
    """The class directions a device received, checked against its base's output layer (`shape`:
    classes, features): two float32 arrays of those shapes, finite, frequencies a distribution,
    no mean longer than a centred feature's can be, and at least `min_voters` devices behind them."""
    try:
        voters = json.loads(meta_record["meta"])["voters"]
    except (KeyError, TypeError, ValueError):
        raise PriorError("the class prior's metadata is not JSON with a voter count") from None
    if not isinstance(voters, int) or isinstance(voters, bool) or voters < min_voters:
        raise PriorError(f"the class prior pools {voters!r} devices, fewer than {min_voters}")
    if set(arrays.keys()) != {"means", "freq"}:
        raise PriorError(f"the class prior holds {sorted(arrays.keys())[:4]}, not means and freq")
    got = {}
    for k, want in (("means", tuple(shape)), ("freq", (shape[0],))):
        try:
            v = arrays[k].numpy()
        except Exception:
            raise PriorError(f"the class prior's {k} is not a readable array") from None
        if v.dtype != np.float32 or tuple(v.shape) != want:
            raise PriorError(f"the class prior's {k} is {v.dtype} {tuple(v.shape)}, not float32 {want}")
        got[k] = torch.from_numpy(v.copy())
    prior = CPR.ClassPrior(got["means"], got["freq"], voters)
    try:
        CPR.check_class_prior(prior, *shape)
    except ValueError as exc:
        raise PriorError(str(exc)) from None
    return prior
