"""Datasets and file readers: digits, FSDD, Speech Commands and image folders as a pair of tensors
(x, y) plus class names, and a user's own WAV or image files as model inputs. How users are cut
from a dataset is common/data/partition.py's."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FSDD_RATE = 8000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
MAX_CLIP_FACTOR = 10  # a WAV longer than 10 model windows is refused, not silently cut
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


class DataError(ValueError):
    """Bad or missing input data; the message names the problem."""


@dataclass
class Dataset:
    x: torch.Tensor
    y: torch.Tensor
    classes: list
    groups: np.ndarray | None = None   # e.g. speaker per sample
    takes: np.ndarray | None = None    # FSDD take index (0-4 is the official test set)

    def __len__(self):
        return len(self.y)

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.as_tensor(idx)
        return Dataset(self.x[t], self.y[t], self.classes,
                       None if self.groups is None else self.groups[idx],
                       None if self.takes is None else self.takes[idx])


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return Dataset(x, torch.tensor(d.target, dtype=torch.long), [str(c) for c in range(10)])


def read_wav(path: Path, rate: int, clip_samples: int, cut: list | None = None) -> torch.Tensor:
    """One clip as the model hears it: mono, at `rate`, padded or cut to `clip_samples`. With
    `cut` given, a path whose recording was longer than the window is appended to it (the caller
    warns once for all)."""
    import soundfile as sf

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise DataError(f"unreadable WAV file {path}: {exc}") from None
    if len(audio) > MAX_CLIP_FACTOR * clip_samples * sr / rate:  # an hour-long recording is not one utterance
        raise DataError(f"WAV file {path} is {len(audio) / sr:.1f} s long; the model hears "
                        f"{clip_samples / rate:.1f} s clips: cut it into clips first")
    wav = torch.from_numpy(audio.mean(axis=1))
    if sr != rate:  # phones record at 16, 44.1 or 48 kHz: resample (band-limited sinc), do not refuse
        if not 1000 <= sr <= 384_000:
            raise DataError(f"WAV file {path} has sample rate {sr} Hz, not a rate to resample from")
        import torchaudio.functional as AF

        wav = AF.resample(wav, int(sr), int(rate))
    if cut is not None and len(wav) > clip_samples:  # at the model's rate: a 1 s clip at 16 kHz is not cut
        cut.append(path)
    out = torch.zeros(clip_samples)
    n = min(len(wav), clip_samples)
    out[:n] = wav[:n]  # pad or crop to a fixed clip length
    return out


def load_fsdd(root: str | Path, clip_samples: int = FSDD_RATE, speakers=None) -> Dataset:
    """Free Spoken Digit Dataset from `root` (or `root`/recordings): {digit}_{speaker}_{take}.wav."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FSDD directory not found: {root}")
    rec = root / "recordings" if (root / "recordings").is_dir() else root
    files = sorted(p for p in rec.iterdir() if FSDD_NAME.match(p.name))
    if speakers is not None:
        files = [p for p in files if FSDD_NAME.match(p.name).group(2) in set(speakers)]
    if not files:
        raise DataError(f"no FSDD recordings named digit_speaker_take.wav in {rec}")
    xs, ys, spk, takes = [], [], [], []
    for p in files:
        digit, speaker, take = FSDD_NAME.match(p.name).groups()
        xs.append(read_wav(p, FSDD_RATE, clip_samples))
        ys.append(int(digit))
        spk.append(speaker)
        takes.append(int(take))
    return Dataset(torch.stack(xs), torch.tensor(ys), [str(c) for c in range(10)],
                   np.array(spk), np.array(takes))


SPEECHCOMMANDS_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def load_speechcommands(root: str | Path, subset: str = "testing", words=SPEECHCOMMANDS_WORDS,
                        download: bool = True) -> Dataset:
    """Google Speech Commands v0.02 through torchaudio's dataset class (downloads ~2.3 GB on first
    use). Read with soundfile; 16 kHz, 1 s clips; speaker id from the file name."""
    from torchaudio.datasets import SPEECHCOMMANDS

    Path(root).mkdir(parents=True, exist_ok=True)
    ds = SPEECHCOMMANDS(str(root), download=download, subset=subset)
    xs, ys, spk = [], [], []
    for i in range(len(ds)):
        path, _rate, label, speaker, _n = ds.get_metadata(i)
        if label in words:
            xs.append(read_wav(Path(ds._archive) / path, 16000, 16000))
            ys.append(words.index(label))
            spk.append(speaker)
    if not xs:
        raise DataError(f"no Speech Commands clips for {words} under {root}")
    return Dataset(torch.stack(xs), torch.tensor(ys), list(words), np.array(spk))


def load_imagefolder(root: str | Path, image_size: int = 224, classes=None) -> Dataset:
    """A user's own images in ImageFolder layout (root/class_name/*.jpg), resized and normalized
    with ImageNet statistics for ResNet models."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    try:
        ds = ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"not an ImageFolder directory ({root}): {exc}") from None
    xs, ys = [], []
    for i in range(len(ds)):
        try:
            img, label = ds[i]
        except Exception as exc:
            raise DataError(f"unreadable image {ds.samples[i][0]}: {exc}") from None
        xs.append(img)
        ys.append(label)
    names = list(classes) if classes else ds.classes
    return Dataset(torch.stack(xs), torch.tensor(ys), names)


def load_unlabeled_dir(root: str | Path, kind: str, **kw) -> torch.Tensor:
    """Inputs only, for the edge device: a directory of WAV files (speech) or images."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file; --data takes a directory of the user's "
                        f"{'WAV' if kind == 'audio' else 'image'} files (or one .npy/.pt array of model inputs)")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if kind == "audio":
        files = sorted(p for p in root.rglob("*.wav") if p.is_file())  # not a FIFO named a.wav
        if not files:
            images = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            raise DataError(f"no .wav files in {root}: this is a speech model (WAV clips, {kw['sample_rate']} Hz, "
                            f"{kw['clip_samples'] / kw['sample_rate']:.1f} s)"
                            + (f"; the folder holds {images} images: is this the right model?" if images else ""))
        longer = []
        x = torch.stack([read_wav(p, kw["sample_rate"], kw["clip_samples"], longer) for p in files])
        if longer:  # cropped, and said so: the model hears the first window of each
            warnings.warn(f"{len(longer)} of {len(files)} WAV files are longer than the model's "
                          f"{kw['clip_samples'] / kw['sample_rate']:.1f} s window and were cut to their start "
                          f"(first: {longer[0].name})", stacklevel=2)
        return x
    if kind == "image":
        return load_image_files(root, kw["image_size"], kw.get("channels", 3))
    raise DataError(f"unknown input kind '{kind}'")


def load_image_files(root: Path, image_size: int, channels: int) -> torch.Tensor:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())  # a FIFO or device named like an image would block the read
    if not files:
        wavs = sum(1 for p in root.rglob("*.wav"))
        raise DataError(f"no image files (.png/.jpg/.jpeg/.bmp) in {root}: this is an image model "
                        f"({image_size}x{image_size}, {channels} channel{'s' if channels > 1 else ''})"
                        + (f"; the folder holds {wavs} WAV files: is this the right model?" if wavs else ""))
    colour = []
    out = [load_image(p, image_size, channels, colour) for p in files]
    if colour:
        warnings.warn(f"{len(colour)} of {len(files)} images are in colour; the model expects grayscale "
                      f"{image_size}x{image_size} inputs, so they were converted (first: {colour[0].name})",
                      stacklevel=2)
    return torch.stack(out)


def load_image(p: Path, image_size: int, channels: int, colour: list | None = None) -> torch.Tensor:
    """One image as the model takes it; a colour photo for a grayscale model is converted and, when
    `colour` is given, recorded there (the caller warns once for all)."""
    import torchvision.transforms.functional as F
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow's decompression-bomb guard: an error, not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
            if channels == 1 and img.mode not in ("L", "1", "I", "I;16", "F", "LA", "P"):
                if colour is None:
                    warnings.warn(f"{p.name} is in colour; the model expects grayscale "
                                  f"{image_size}x{image_size} inputs, so it was converted", stacklevel=2)
                else:
                    colour.append(p)
            img = img.convert("L" if channels == 1 else "RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"image {p} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"unreadable image {p}: {exc}") from None
    if min(img.size) < image_size:  # upscaling would invent the detail the model looks at
        raise DataError(f"image {p} is {img.size[0]}x{img.size[1]}, smaller than the model's "
                        f"{image_size}x{image_size} input")
    img = img.resize((image_size, image_size))  # larger photos are scaled down
    return F.to_tensor(img)
