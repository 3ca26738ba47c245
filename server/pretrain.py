"""Vendor-side pretraining of a base model (labels allowed here), saved with its metadata."""
from __future__ import annotations

from common.data import protocol as P
from common.data import readers as D
from common.data.tasks import get_task, load_task_data, shift_augment
from common.engine.adapt import vendor_record
from common.model.architectures import build_model
from common.model.checkpoint import fingerprint, save_checkpoint
from common.model.train import accuracy, train_supervised


def pretrain(task_name: str, out, data=None, epochs=None, seed: int = 0, device: str = "cpu",
             exclude_speaker=None, vendor_frac: float = P.VENDOR_FRAC, progress=None, ds: D.Dataset | None = None,
             indices=None, arch_kwargs: dict | None = None) -> dict:
    """Train the task's base model on the vendor's labeled data and save it with its metadata.
    `indices` = (train, test) overrides the default vendor split; `arch_kwargs` the task's model
    arguments (e.g. {"batchnorm": False} for the digits CNN)."""
    import torch

    if not 0 < vendor_frac < 1:
        raise ValueError(f"--vendor-frac must be in (0, 1), got {vendor_frac}")
    task = get_task(task_name)
    ds = ds if ds is not None else load_task_data(task, data)
    tr, te = training_split(task.name, ds, seed, vendor_frac, exclude_speaker, indices)
    torch.manual_seed(seed)
    kwargs = dict(task.arch_kwargs, **(arch_kwargs or {}), num_classes=len(ds.classes))  # every one takes it
    model = build_model(task.arch, **kwargs)
    epochs = epochs or task.pretrain_epochs
    cost = train_supervised(model, ds.x[tr], ds.y[tr], epochs, lr=task.lr, seed=seed, device=device,
                            progress=progress, augment=shift_augment if task.features["kind"] == "audio" else None)
    model = model.cpu()
    acc = accuracy(model, ds.x[te], ds.y[te])
    meta = {"arch": task.arch, "arch_kwargs": kwargs, "task": task.name, "classes": ds.classes,
            "features": task.features, **vendor_record(model, ds.x[tr], ds.y[tr]),
            "training": {"epochs": epochs, "seed": seed, "samples": int(len(tr)), "vendor_frac": vendor_frac,
                         "exclude_speaker": exclude_speaker, "test_accuracy": acc, "seconds": cost["seconds"]}}
    save_checkpoint(out, model, meta)
    return {"out": str(out), "task": task.name, "train_samples": int(len(tr)), "test_accuracy": acc,
            "train_seconds": cost["seconds"], "fingerprint": fingerprint(model)}


def training_split(task_name: str, ds: D.Dataset, seed: int = 0, vendor_frac: float = P.VENDOR_FRAC, exclude_speaker=None,
                   indices=None):
    """(train, test) indices pretrain uses: `indices` where given, else the vendor's split."""
    return indices if indices is not None else P.vendor_indices(task_name, ds, seed, vendor_frac, exclude_speaker)


def add_vendor_record(path, ds: D.Dataset, train_idx) -> bool:
    """Give an existing base checkpoint the vendor record a device's adaptation checks read
    (common/engine/adapt.py), from the data it was trained on; False where it already has one."""
    import torch

    from common.model.checkpoint import VENDOR_META, load_checkpoint

    model, meta, mask = load_checkpoint(path)
    if all(k in meta for k in VENDOR_META):  # the record's every field, as the device reads them
        return False
    idx = torch.as_tensor(train_idx)
    meta = dict(meta, **vendor_record(model, ds.x[idx], ds.y[idx]))
    save_checkpoint(path, model, meta, mask=mask, restricted=meta.get("restricted_classes"))
    return True
