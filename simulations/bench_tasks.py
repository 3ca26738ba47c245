"""The benchmark's tasks: base models (pretrained once per benchmark directory) and their users,
from the data protocol (common/data/protocol.py) and the cohorts (simulations/cohorts.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.data import partition as PT
from common.data import protocol as P
from common.data import readers as D
from common.model.checkpoint import VENDOR_META, load_checkpoint
from server.pretrain import add_vendor_record, pretrain, training_split
from simulations import cohorts as CO
from simulations.cohorts import BenchUser


def _cached_pretrain(ck: Path, *args, **kw) -> dict | None:
    """Pretrain once per benchmark directory: tasks that share a base (and a rerun) reuse it. A
    base from before vendor records gets its record from the same training data."""
    if ck.is_file():
        task, ds = args[0], kw["ds"]
        tr, _ = training_split(task, ds, kw.get("seed", 0), kw.get("vendor_frac", 0.5), kw.get("exclude_speaker"),
                               kw.get("indices"))
        add_vendor_record(ck, ds, tr)
        return None
    return pretrain(*args, **kw)


def digits_task(out: Path, seed: int, n_users: int, epochs: int | None, style: bool = False,
                batchnorm: bool = True, every_class: bool = False):
    """Users of the digits CNN (`batchnorm` False: the same CNN without its BatchNorm layers):
    n_users holding 2-3 classes, or with `style` the styled users, or with `every_class` n_users
    holding every class as the vendor's data looks (no shift of any kind: 150 images, 40 held out)."""
    ds = D.load_digits()
    ck = out / "bases" / f"digits{'' if batchnorm else '_nobn'}_s{seed}_e{epochs or 0}.pt"
    _cached_pretrain(ck, "digits", ck, seed=seed, ds=ds, epochs=epochs,
                     arch_kwargs=None if batchnorm else {"batchnorm": False})
    base, meta, _ = load_checkpoint(ck)
    if style:
        _, pool = P.vendor_and_pool("digits", ds, seed)
        return [(base, meta, u) for u in CO.image_style_users(ds, pool, seed)]
    _, pool = P.vendor_and_pool("digits", ds, seed)
    if every_class:
        rng = np.random.default_rng([seed, 36])  # a stream of its own: no other cohort's draws move
        draws = [rng.choice(np.asarray(pool), 190, replace=False) for _ in range(n_users)]
        return [(base, meta, _user(f"user{i}", ds, d[40:], d[:40])) for i, d in enumerate(draws)]
    return [(base, meta, u) for u in few_class_users(ds.subset(pool), n_users, seed, np.random.default_rng(seed))]


def few_class_users(sub: D.Dataset, n_users: int, partition_seed: int, rng) -> list[BenchUser]:
    """n_users of `sub` holding 2-3 classes each (partition_class_subsets at `partition_seed`), 30%
    of each user's samples held out (drawn from `rng`)."""
    users = []
    for i, g in enumerate(PT.partition_class_subsets(sub.y.numpy(), n_users, (2, 3), partition_seed)):
        pers, ev = PT.split_heldout(np.asarray(g), 0.3, rng)
        users.append(_user(f"user{i}", sub, pers, ev))
    return users


def _user(uid, ds: D.Dataset, pers, ev) -> BenchUser:
    p, e = torch.as_tensor(np.asarray(pers)), torch.as_tensor(np.asarray(ev))
    return BenchUser(str(uid), ds.x[p], ds.y[p], ds.x[e], ds.y[e])


def _nobn(batchnorm: bool) -> tuple[str, dict | None]:
    """A base's file-name tag and pretrain's arch_kwargs: the network with or without BatchNorm."""
    return ("", None) if batchnorm else ("_nobn", {"batchnorm": False})


def fsdd_loso_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, few: bool = False,
                   batchnorm: bool = True):
    """Leave one speaker out; `few`: that speaker has 24 clips of 4 digits (CO.few_data_user);
    `batchnorm` False: the speech network without its BatchNorm layers."""
    users, rng = [], np.random.default_rng(seed)
    tag, kw = _nobn(batchnorm)
    for spk in sorted(set(ds.groups.tolist())):
        ck = out / "bases" / f"fsdd{tag}_without_{spk}_s{seed}_e{epochs or 0}.pt"
        r = _cached_pretrain(ck, "fsdd", ck, seed=seed, exclude_speaker=spk, ds=ds, epochs=epochs, arch_kwargs=kw)
        if r:
            log(f"  fsdd base without {spk}: seen-speaker test accuracy {r['test_accuracy']:.3f} "
                f"({r['train_seconds']:.0f} s)")
        user = CO.few_data_user(ds, spk, rng) if few else _user(spk, ds, *P.speaker_user(ds, spk))
        users.append((*load_checkpoint(ck)[:2], user))
    return users


def fsdd_seen_task(out: Path, ds: D.Dataset, seed: int, epochs: int | None, log, conditions: bool = False,
                   batchnorm: bool = True):
    """The vendor trains on takes 25-49 of every speaker; each speaker is then a user holding 3-4
    digits: takes 5-24 unlabeled, takes 0-4 held out (never seen by the vendor either)."""
    tag, kw = _nobn(batchnorm)
    ck = out / "bases" / f"fsdd{tag}_seen_s{seed}_e{epochs or 0}.pt"
    r = _cached_pretrain(ck, "fsdd", ck, seed=seed, ds=ds, epochs=epochs, indices=P.seen_speaker_split(ds),
                         arch_kwargs=kw)
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




# ---------------------------------------------------------------- few-class users of a BatchNorm-heavy network
RESNET_SIZE = 32  # input side: ResNet18 trains on the CPU in a few minutes at this size


def colour_images(x: torch.Tensor, ink, paper) -> torch.Tensor:
    """Grey digit images (N, 1, H, W) in [0, 1] as RGB: `ink` where the stroke is, `paper` around it."""
    ink, paper = torch.tensor(ink).view(1, 3, 1, 1), torch.tensor(paper).view(1, 3, 1, 1)
    return paper + x * (ink - paper)


def resnet_input(x: torch.Tensor, size: int = RESNET_SIZE) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resnet_few_task(out: Path, seed: int, n_users: int = 8, epochs: int = 6, style: bool = False,
                    arch: str = "resnet18"):
    """ResNet18 (BatchNorm after every convolution) trained by the vendor on white-on-black digits
    at 32x32, RGB; each user holds 2-3 classes (label shift), and every other user writes in a
    colour of their own (ink and paper drawn per user, never inverted: the covariate shift on top).
    The few-class users whose statistics full BatchNorm recalibration absorbs. `style`: other
    users (another draw), each also writing in a style of its own (thick strokes, blur, low
    contrast, rotation: a font), the shift that lives past the input side. `arch`: another
    torchvision ResNet (resnet50: bottleneck blocks) on the same protocol and the same users."""
    from common.engine.adapt import vendor_record
    from common.model.checkpoint import save_checkpoint

    ds = D.load_digits()
    ck = out / "bases" / f"{arch}_digits{RESNET_SIZE}_s{seed}_e{epochs}.pt"
    vendor, pool = P.vendor_and_pool("digits", ds, seed)
    grey = lambda x: resnet_input(x).repeat(1, 3, 1, 1)  # noqa: E731
    if not ck.is_file():
        train_resnet_vendor(ck, arch, grey(ds.x[vendor]), ds.y[vendor], ds.classes, seed, epochs)
    base, meta, _ = load_checkpoint(ck)
    if not all(k in meta for k in VENDOR_META):  # a base from before a field of the record: it again, same data
        meta = dict(meta, **vendor_record(base, grey(ds.x[vendor]), ds.y[vendor]))
        save_checkpoint(ck, base, meta)
    sub = ds.subset(pool)
    draw = seed + (100 if style else 1)
    rng = np.random.default_rng(draw)
    users = []
    for i, g in enumerate(PT.partition_class_subsets(sub.y.numpy(), n_users, (2, 3), draw)):
        pers, ev = PT.split_heldout(np.asarray(g), 0.3, rng)
        p, e = torch.as_tensor(np.asarray(pers)), torch.as_tensor(np.asarray(ev))
        st = CO.image_style(CO.IMAGE_STYLES[i % len(CO.IMAGE_STYLES)], rng) if style else None
        font = (lambda x, st=st: CO.apply_image(x, st)) if style else (lambda x: x)  # noqa: E731
        if i % 2:
            ink = rng.uniform(0.5, 1.0, 3).tolist()
            paper = (rng.uniform(0.0, 0.3, 3)).tolist()
            look = lambda x, ink=ink, paper=paper, f=font: colour_images(resnet_input(f(x)), ink, paper)  # noqa: E731
            uid = f"user{i}:ink{''.join(f'{v:.1f}' for v in ink)}"
        else:
            look, uid = (lambda x, f=font: grey(f(x))), f"user{i}"  # noqa: E731
        uid = f"user{i}:{CO._fmt(st)}" + uid[len(f"user{i}"):] if style else uid
        users.append((base, meta, BenchUser(uid, look(sub.x[p]), sub.y[p], look(sub.x[e]), sub.y[e])))
    return users


def train_resnet_vendor(ck: Path, arch: str, x: torch.Tensor, y: torch.Tensor, classes: list, seed: int,
                        epochs: int) -> None:
    """A torchvision ResNet trained by the vendor on RGB digits at RESNET_SIZE (`x`, `y`), saved to
    `ck` with its vendor record."""
    from common.engine.adapt import vendor_record
    from common.model.architectures import build_model
    from common.model.checkpoint import save_checkpoint
    from common.model.train import train_supervised

    torch.manual_seed(seed)
    kw = {"num_classes": 10}
    model = build_model(arch, **kw)
    train_supervised(model, x, y, epochs=epochs, lr=1e-3, seed=seed)
    model = model.cpu().eval()
    meta = {"arch": arch, "arch_kwargs": kw, "task": "digits-rgb32", "classes": classes,
            "features": {"kind": "image", "image_size": RESNET_SIZE, "channels": 3}, **vendor_record(model, x, y)}
    save_checkpoint(ck, model, meta)


# the benchmark's cohorts, in the order it runs them; the speech ones need the FSDD dataset
COHORTS = ("digits", "digits-style", "resnet-few", "fsdd-loso", "fsdd-seen", "fsdd-cond", "fsdd-few",
           "digits-nobn", "digits-style-nobn", "resnet-style", "digits-all-nobn")
# cohorts studies may name beside them (not run by the bench)
STUDY_COHORTS = ("fsdd-loso-nobn", "fsdd-cond-nobn", "fsdd-seen-nobn")


def cohort_users(name: str, out: Path, seed: int, ds: D.Dataset | None = None, digits_users: int = 10,
                 digits_epochs: int | None = None, fsdd_epochs: int | None = 12, log=print) -> list:
    """One cohort's [(base, its metadata, BenchUser)], the bases pretrained (or read) under out/bases;
    `ds`: the FSDD dataset, for the fsdd cohorts."""
    makers = {
        "digits": lambda: digits_task(out, seed, digits_users, digits_epochs),
        "digits-style": lambda: digits_task(out, seed, digits_users, digits_epochs, style=True),
        "resnet-few": lambda: resnet_few_task(out, seed),
        "resnet-style": lambda: resnet_few_task(out, seed, style=True),
        "fsdd-loso": lambda: fsdd_loso_task(out, ds, seed, fsdd_epochs, log),
        "fsdd-seen": lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log),
        "fsdd-cond": lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log, conditions=True),
        "fsdd-few": lambda: fsdd_loso_task(out, ds, seed, fsdd_epochs, log, few=True),
        "digits-nobn": lambda: digits_task(out, seed, digits_users, digits_epochs, batchnorm=False),
        "digits-style-nobn": lambda: digits_task(out, seed, digits_users, digits_epochs, style=True, batchnorm=False),
        "digits-all-nobn": lambda: digits_task(out, seed, digits_users, digits_epochs, batchnorm=False,
                                               every_class=True),
    }
    makers.update({  # studies' cohorts, not the bench's: the speech network without BatchNorm
        "fsdd-loso-nobn": lambda: fsdd_loso_task(out, ds, seed, fsdd_epochs, log, batchnorm=False),
        "fsdd-cond-nobn": lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log, conditions=True, batchnorm=False),
        "fsdd-seen-nobn": lambda: fsdd_seen_task(out, ds, seed, fsdd_epochs, log, batchnorm=False),
    })
    if name not in makers:
        raise ValueError(f"unknown cohort '{name}' (choose from: {', '.join(COHORTS + STUDY_COHORTS)})")
    if name.startswith("fsdd") and ds is None:
        raise ValueError(f"cohort {name} needs --fsdd DIR")
    return makers[name]()
