"""The benchmark's tasks: base models (pretrained once per benchmark directory) and their users,
from the data protocol (common/protocol.py) and the cohorts (simulations/cohorts.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common import data as D
from common import protocol as P
from common.checkpoint import load_checkpoint
from common.pretrain import pretrain
from simulations import cohorts as CO
from simulations.cohorts import BenchUser


def _cached_pretrain(ck: Path, *args, **kw) -> dict | None:
    """Pretrain once per benchmark directory: tasks that share a base (and a rerun) reuse it."""
    if ck.is_file():
        return None
    return pretrain(*args, **kw)


def digits_task(out: Path, seed: int, n_users: int, epochs: int | None, style: bool = False):
    ds = D.load_digits()
    ck = out / "bases" / f"digits_s{seed}_e{epochs or 0}.pt"
    _cached_pretrain(ck, "digits", ck, seed=seed, ds=ds, epochs=epochs)
    base, meta, _ = load_checkpoint(ck)
    if style:
        _, pool = P.vendor_and_pool("digits", ds, seed)
        return [(base, meta, u) for u in CO.image_style_users(ds, pool, seed)]
    _, pool = P.vendor_and_pool("digits", ds, seed)
    sub = ds.subset(pool)
    rng = np.random.default_rng(seed)
    users = []
    for i, g in enumerate(D.partition_class_subsets(sub.y.numpy(), n_users, (2, 3), seed)):
        pers, ev = D.split_heldout(np.asarray(g), 0.3, rng)
        users.append((base, meta, _user(f"user{i}", sub, pers, ev)))
    return users


def _user(uid, ds: D.Dataset, pers, ev) -> BenchUser:
    p, e = torch.as_tensor(np.asarray(pers)), torch.as_tensor(np.asarray(ev))
    return BenchUser(str(uid), ds.x[p], ds.y[p], ds.x[e], ds.y[e])


def fsdd_loso_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, few: bool = False):
    """Leave one speaker out; `few`: that speaker has 24 clips of 4 digits (CO.few_data_user)."""
    users, rng = [], np.random.default_rng(seed)
    for spk in sorted(set(ds.groups.tolist())):
        ck = out / "bases" / f"fsdd_without_{spk}_s{seed}_e{epochs or 0}.pt"
        r = _cached_pretrain(ck, "fsdd", ck, seed=seed, exclude_speaker=spk, ds=ds, epochs=epochs)
        if r:
            log(f"  fsdd base without {spk}: seen-speaker test accuracy {r['test_accuracy']:.3f} "
                f"({r['train_seconds']:.0f} s)")
        user = CO.few_data_user(ds, spk, rng) if few else _user(spk, ds, *P.speaker_user(ds, spk))
        users.append((*load_checkpoint(ck)[:2], user))
    return users


def fsdd_seen_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, conditions: bool = False):
    """The vendor trains on takes 25-49 of every speaker; each speaker is then a user holding 3-4
    digits: takes 5-24 unlabeled, takes 0-4 held out (never seen by the vendor either)."""
    ck = out / "bases" / f"fsdd_seen_s{seed}_e{epochs or 0}.pt"
    r = _cached_pretrain(ck, "fsdd", ck, seed=seed, ds=ds, epochs=epochs, indices=P.seen_speaker_split(ds))
    if r:
        log(f"  fsdd base on takes 25-49: test accuracy {r['test_accuracy']:.3f} ({r['train_seconds']:.0f} s)")
    base, meta, _ = load_checkpoint(ck)
    if conditions:  # the same clean-speech base; users speak under their own acoustic condition
        return [(base, meta, u) for u in CO.speech_condition_users(ds, seed)]
    rng = np.random.default_rng(seed)
    users = []
    for spk in sorted(set(ds.groups.tolist())):
        digits = rng.choice(10, size=int(rng.integers(3, 5)), replace=False)
        pers, ev = (i[np.isin(ds.y.numpy()[i], digits)] for i in P.speaker_user(ds, spk, (P.TEST_TAKES, P.VENDOR_TAKE)))
        users.append((base, meta, _user(f"{spk}:{''.join(map(str, sorted(digits)))}", ds, pers, ev)))
    return users


