"""Tasks: which model, which input features and which data a use case has. One place maps a
task name to everything the rest of the pipeline needs (Flower's task.py idea)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.data import readers as D


@dataclass
class Task:
    name: str
    arch: str
    arch_kwargs: dict
    features: dict                   # what a device needs to turn raw files into model inputs
    pretrain_epochs: int
    lr: float = 2e-3
    extra: dict = field(default_factory=dict)


TASKS = {
    "digits": Task("digits", "smallcnn", {"num_classes": 10},
                   {"kind": "image", "image_size": 8, "channels": 1}, pretrain_epochs=40),
    "fsdd": Task("fsdd", "kws", {"num_classes": 10, "sample_rate": 8000, "n_mels": 40},
                 {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}, pretrain_epochs=25),
    "speechcommands": Task("speechcommands", "kws", {"num_classes": 10, "sample_rate": 16000, "n_mels": 40},
                           {"kind": "audio", "sample_rate": 16000, "clip_samples": 16000}, pretrain_epochs=20),
    "imagefolder": Task("imagefolder", "resnet18", {},
                        {"kind": "image", "image_size": 224, "channels": 3}, pretrain_epochs=10, lr=1e-3),
}


def input_shape(features: dict) -> tuple:
    """One input's shape as the model takes it: samples of a clip, or channels x size x size."""
    if features["kind"] == "audio":
        return (features["clip_samples"],)
    return (features["channels"], features["image_size"], features["image_size"])


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (choose from: {', '.join(TASKS)})")
    return TASKS[name]


def load_task_data(task: Task, data_path: str | None) -> D.Dataset:
    if task.name == "digits":
        return D.load_digits()
    if not data_path:
        raise D.DataError(f"task '{task.name}' needs --data PATH")
    if task.name == "fsdd":
        return D.load_fsdd(data_path)
    if task.name == "speechcommands":
        return D.load_speechcommands(data_path)
    return D.load_imagefolder(data_path, task.features["image_size"])


def shift_augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random circular time shift of up to 100 ms for waveforms: cheap speech augmentation."""
    if xb.dim() != 2:
        return xb
    shift = int(torch.randint(-800, 801, (1,), generator=gen))
    return torch.roll(xb, shift, dims=1)
