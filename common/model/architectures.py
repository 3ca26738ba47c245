"""Model builders. Every prunable chain model lists its prunable layers in order
(`prunable_chain`) so masks can be compacted into a physically smaller model."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torchaudio


class SmallCNN(nn.Module):
    """CNN for 8x8 grey images (scikit-learn digits); `batchnorm=False` builds it without its two
    BatchNorm layers (a network whose features cannot follow a user by recalibration)."""

    def __init__(self, num_classes: int = 10, widths: tuple = (16, 32, 64), in_channels: int = 1,
                 image_size: int = 8, batchnorm: bool = True):
        super().__init__()
        c1, c2, h = widths
        norm = nn.BatchNorm2d if batchnorm else (lambda _c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.bn1 = norm(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = norm(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (image_size // 2) ** 2, h)
        self.fc2 = nn.Linear(h, num_classes)

    prunable_chain = ("conv1", "conv2", "fc1", "fc2")

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LogMel(nn.Module):
    """Waveform -> log-mel spectrogram, computed inside the model so a device only needs audio."""

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 80, n_mels: int = 40):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)

    def forward(self, wav):  # (N, samples) -> (N, 1, n_mels, frames)
        x = torch.log(self.mel(wav) + 1e-4)
        # Per-clip normalization: removes loudness and microphone differences between speakers.
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        return x.unsqueeze(1)


class KWSNet(nn.Module):
    """Keyword-spotting CNN on log-mel features (speech digits / Speech Commands); `batchnorm=False`
    builds it without its BatchNorm layers, the spectrogram's own included."""

    def __init__(self, num_classes: int = 10, widths: tuple = (16, 32, 64, 64), sample_rate: int = 8000,
                 n_mels: int = 40, clip_samples: int = 8000, batchnorm: bool = True):
        super().__init__()
        c1, c2, c3, h = widths
        norm = nn.BatchNorm2d if batchnorm else (lambda _c: nn.Identity())
        self.frontend = LogMel(sample_rate=sample_rate, n_mels=n_mels, hop_length=sample_rate // 100,
                               n_fft=2 ** math.ceil(math.log2(sample_rate * 0.032)))
        self.norm = norm(1)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = norm(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = norm(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.bn3 = norm(c3)
        self.pool = nn.MaxPool2d(2)
        # Keep a coarse 4x4 time-frequency layout: spoken digits differ in their temporal order.
        self.gap = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(c3 * 16, h)
        self.fc2 = nn.Linear(h, num_classes)

    prunable_chain = ("conv1", "conv2", "conv3", "fc1", "fc2")

    def forward(self, wav):
        x = self.norm(self.frontend(wav))
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.fc1(self.gap(x).flatten(1)))
        return self.fc2(x)


def _resnet(depth: int, num_classes: int = 1000, weights_path: str | None = None, **_):
    import torchvision

    model = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](
        weights=None, num_classes=num_classes)
    if weights_path:  # a local file the user gives; never a hub download
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"ResNet weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
    return model


ARCHITECTURES = {
    "smallcnn": SmallCNN,
    "kws": KWSNet,
    "resnet18": lambda **kw: _resnet(18, **kw),
    "resnet50": lambda **kw: _resnet(50, **kw),
}


def build_model(arch: str, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model '{arch}' (choose from: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](**kwargs)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv layers in registration order: the connections fine-pruning may remove."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


def prunable_shapes(model: nn.Module) -> dict[str, tuple]:
    """Each prunable layer's weight shape: what a summary or a prior is checked against."""
    return {name: tuple(m.weight.shape) for name, m in prunable_layers(model).items()}


def following_batchnorm(model: nn.Module) -> dict[str, str]:
    """Map each prunable layer to the BatchNorm registered right after it (conv -> bn pattern),
    used to silence a channel whose incoming connections are all pruned."""
    names = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    out = {}
    for (n, m), (n2, m2) in zip(names, names[1:]):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and isinstance(
                m2, (nn.BatchNorm1d, nn.BatchNorm2d)) and m2.num_features == m.weight.shape[0]:
            out[n] = n2
    return out


def reader_links(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, reader) pairs of prunable layers where the reader is the only layer that reads
    the producer's units (through its BatchNorm and ReLU): consecutive layers of a chain model;
    inside each ResNet block, conv1 -> conv2 (and conv2 -> conv3 in a bottleneck). A residual
    stream channel has several readers and writers and is in no pair."""
    if hasattr(model, "prunable_chain"):
        chain = list(model.prunable_chain)
        return list(zip(chain, chain[1:]))
    from torchvision.models.resnet import BasicBlock, Bottleneck

    links = []
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            links.append((f"{name}.conv1", f"{name}.conv2"))
        elif isinstance(m, Bottleneck):
            links += [(f"{name}.conv1", f"{name}.conv2"), (f"{name}.conv2", f"{name}.conv3")]
    return links


def require_reader_links(model: nn.Module, what: str) -> list[tuple[str, str]]:
    """reader_links(model), or one clear error saying that `what` needs such layers."""
    links = reader_links(model)
    if not links:
        raise ValueError(f"{what} needs layers whose units have one reader (a chain model, or the inside "
                         "of ResNet blocks)")
    return links


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
