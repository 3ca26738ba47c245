"""A personalized model for runtimes without Python or fineprune: ONNX (onnxruntime on any edge
CPU/GPU), TorchScript (libtorch, PyTorch Mobile) and ExecuTorch .pte (XNNPACK; the optional
`pte` extra).

ONNX goes through torch's dynamo exporter (the legacy TorchScript-based exporter fails on the
audio front end's STFT); the batch dimension stays dynamic. The whole model is exported, the
log-mel front end of speech models included, and the output restriction too: classes the
personalization excluded come out as -inf, as in PyTorch. Every export is checked before it is
kept: the exported file is loaded back and must give PyTorch's predictions on probe inputs.

ONNX and .pte export a lowerable copy of the model (`lowerable`): the spectrogram is rebuilt from
real operations (RealSpectrogram: a strided convolution with the windowed DFT basis) and adaptive
pools become fixed matrix pools (MatrixPool), the same numbers up to float rounding. ExecuTorch
cannot lower the complex-valued STFT at all and its runtime has no adaptive pooling kernel; in
onnxruntime the STFT op took 0.38 ms of a KWS clip's 0.49 ms, the convolution 0.11 of 0.22.

Why ~320 lines: three formats, each exported and then checked against PyTorch's own outputs.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from common.data.tasks import input_shape
from common.io import atomic_write_bytes

FORMATS = ("onnx", "torchscript", "pte")
PTE_HINT = "pte export needs ExecuTorch: pip install -e '.[pte]'"


class RealSpectrogram(torch.nn.Module):
    """torchaudio's power spectrogram (center, reflect padding, one-sided, power 2, a window) as a
    strided convolution with the windowed DFT basis: real operations only, which ExecuTorch lowers."""

    def __init__(self, spec):
        super().__init__()
        if spec.power != 2.0 or spec.normalized or not spec.onesided or spec.pad:
            raise ValueError("only a one-sided, unnormalized power-2 spectrogram can be rebuilt for pte")
        n, win = spec.n_fft, spec.window.double()
        if len(win) < n:  # torch.stft centres a shorter window inside n_fft
            left = (n - len(win)) // 2
            win = torch.nn.functional.pad(win, (left, n - len(win) - left))
        t, k = torch.arange(n, dtype=torch.float64), torch.arange(n // 2 + 1, dtype=torch.float64)
        angle = 2 * torch.pi * k[:, None] * t[None, :] / n
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * win  # (2F, n_fft)
        self.register_buffer("basis", basis.float().unsqueeze(1))
        self.n_fft, self.hop, self.center, self.pad_mode = n, spec.hop_length, spec.center, spec.pad_mode

    def forward(self, wav):  # (N, samples) -> (N, F, frames)
        x = wav.unsqueeze(1)
        if self.center:
            x = torch.nn.functional.pad(x, (self.n_fft // 2, self.n_fft // 2), mode=self.pad_mode)
        y = torch.nn.functional.conv1d(x, self.basis, stride=self.hop)
        re, im = y.chunk(2, dim=1)
        return re * re + im * im


class MatrixPool(torch.nn.Module):
    """AdaptiveAvgPool2d for one input size, as two matrix products with the bins' averaging
    weights: ExecuTorch's runtime has no adaptive pooling kernel (KWS pools 10x25 to 4x4)."""

    def __init__(self, size_in: tuple, size_out: tuple):
        super().__init__()
        for name, n, m in (("rows", size_in[0], size_out[0]), ("cols", size_in[1], size_out[1])):
            w = torch.zeros(m, n)
            for i in range(m):  # the bins AdaptiveAvgPool uses: [floor(i*n/m), ceil((i+1)*n/m))
                lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
                w[i, lo:hi] = 1.0 / (hi - lo)
            self.register_buffer(name, w)

    def forward(self, x):
        return self.rows @ x @ self.cols.T


def lowerable(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of `model` that ExecuTorch lowers, for inputs shaped like `x`: mel spectrograms
    compute their STFT with real operations, adaptive pools become fixed matrix pools."""
    import copy

    import torchaudio

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torchaudio.transforms.MelSpectrogram):
            m.spectrogram = RealSpectrogram(m.spectrogram)
    sizes, hooks = {}, []

    def seen(name):
        def hook(_mod, args):
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.AdaptiveAvgPool2d):
            hooks.append(m.register_forward_pre_hook(seen(name)))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    for name, shape in sizes.items():
        parent, _, leaf = name.rpartition(".")
        pool = model.get_submodule(name)
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(shape[i] if o is None else o for i, o in enumerate(out))
        setattr(model.get_submodule(parent) if parent else model, leaf, MatrixPool(shape, out))
    return model.eval()


def probe_inputs(features: dict, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs to compare an export with PyTorch on: quiet noise for audio, pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *input_shape(features))
    return 0.1 * torch.randn(shape, generator=g) if features["kind"] == "audio" else torch.rand(shape, generator=g)


def _onnx_bytes(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    import warnings

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not the user's business
        path = os.path.join(d, "model.onnx")
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        return Path(path).read_bytes()


def input_doc(features: dict) -> str:
    """What the exported model takes and gives, in words: written into the file itself."""
    if features["kind"] == "audio":
        took = (f"'input': float32 (N, {features['clip_samples']}) mono waveform at {features['sample_rate']} Hz "
                f"in [-1, 1] ({features['clip_samples'] / features['sample_rate']:.2f} s; shorter clips zero-padded "
                f"at the end, longer ones cut to their start)")
    else:
        took = (f"'input': float32 (N, {features['channels']}, {features['image_size']}, {features['image_size']}) "
                f"pixels in [0, 1], {'grayscale' if features['channels'] == 1 else 'RGB'}, as the training images")
    return (f"{took}; 'logits': float32 (N, classes), the class order in metadata 'classes' "
            f"(-inf for classes the personalization excluded)")


def with_metadata(data: bytes, features: dict, classes: list | None) -> bytes:
    """The ONNX file with its classes and input described in the model's own metadata
    (metadata_props 'classes' and 'input' as JSON, doc_string in words), so that a runtime can
    label its outputs without fineprune."""
    import json

    import onnx

    proto = onnx.load_from_string(data)
    proto.doc_string = "fineprune personalized model. " + input_doc(features)
    props = {"classes": json.dumps(list(classes or [])), "input": json.dumps(features),
             "producer": "fineprune"}
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()


def onnx_metadata(path: str | Path) -> tuple[list[str], dict]:
    """(classes, input features) from an ONNX file fineprune exported, or ValueError."""
    import json

    from common.model.checkpoint import check_classes, check_features

    sess = onnx_session(str(path))
    props = sess.get_modelmeta().custom_metadata_map
    try:
        classes, features = json.loads(props["classes"]), json.loads(props["input"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} carries no fineprune metadata (classes, input): export it with "
                         f"`fineprune export`") from None
    outputs = sess.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(check_classes(classes)):
        raise ValueError(f"{path} names {len(classes)} classes for {outputs} outputs")
    return classes, check_features(features)


def onnx_session(model: bytes | str):
    """An onnxruntime CPU session on one thread, from the file's bytes or its path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _onnx_run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    sess = onnx_session(data)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _executorch():
    """ExecuTorch's exporter and runtime, or one line saying how to install them. Serializing
    needs the flatbuffer compiler: the one inside the executorch package, so a device needs no
    `flatc` on its PATH."""
    try:
        import executorch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError:
        raise ValueError(PTE_HINT) from None
    flatc = Path(list(executorch.__path__)[0]) / "data" / "bin" / "flatc"
    if flatc.is_file():
        os.environ.setdefault("FLATC_EXECUTABLE", str(flatc))
    return XnnpackPartitioner, to_edge_transform_and_lower, Runtime


def _pte_bytes(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    import warnings

    partitioner, lower, _ = _executorch()
    with warnings.catch_warnings(), native_stderr_filtered():
        warnings.simplefilter("ignore")
        # batch 1, what a device classifies (a dynamic batch lowered, but the runtime kept the
        # example's batch as the input's capacity for the audio model)
        ep = torch.export.export(model, (x[:1],))
        return bytes(lower(ep, partitioner=[partitioner()]).to_executorch().buffer)


NATIVE_NOISE = ("midr",)  # cpuinfo's "Failed to open midr file": it probes ARM registers on every CPU


class native_stderr_filtered:
    """Lines that native code (ExecuTorch's runtime, cpuinfo) writes straight to file descriptor 2
    are held back while the block runs; the ones that are not known noise are written after it."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        kept = [line for line in self.tmp.read().decode(errors="replace").splitlines()
                if not any(n in line for n in NATIVE_NOISE)]
        self.tmp.close()
        if kept:
            print("\n".join(kept), file=sys.stderr)
        return False


def pte_method(program: bytes | str):
    """The `forward` of an ExecuTorch program, from the file's bytes or its path."""
    with native_stderr_filtered():
        return _executorch()[2].get().load_program(program).load_method("forward")


def _pte_run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    method = pte_method(data)
    with native_stderr_filtered():
        return torch.cat([method.execute([row.unsqueeze(0).contiguous()])[0] for row in x])


def _script_bytes(model: torch.nn.Module, extra: dict | None = None) -> bytes:
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch 2.11 marks TorchScript deprecated; libtorch still runs it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), buf, _extra_files=extra or {})
    return buf.getvalue()


def _script_run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data))(x)


def export(model: torch.nn.Module, features: dict, fmt: str, out: str | Path, classes: list | None = None) -> dict:
    """Write `model` to `out` in `fmt` (atomically) after checking that the file gives the same
    predictions as PyTorch; returns sizes and the agreement measured."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}' (choose from: {', '.join(FORMATS)})")
    model = model.cpu().eval()
    x = probe_inputs(features)
    with torch.no_grad():
        want = model(x)
        # ONNX gets the lowerable copy too: onnxruntime's STFT op is far slower than the
        # strided-convolution spectrogram, which gives the same logits (docs/engine_cost.md)
        src = model if fmt == "torchscript" else lowerable(model, x)
        import json

        described = {"classes": list(classes or []), "input": features, "doc": input_doc(features)}
        make, run = {"onnx": (lambda m, x2: with_metadata(_onnx_bytes(m, x2), features, classes), _onnx_run),
                     "pte": (_pte_bytes, _pte_run),
                     "torchscript": (lambda m, _x: _script_bytes(m, {"fineprune.json": json.dumps(described)}),
                                     _script_run)}[fmt]
        data = make(src, x[:2])
        got = run(data, x)
    same = bool((got.argmax(1) == want.argmax(1)).all())
    finite = torch.isfinite(want)
    if not same or not torch.equal(finite, torch.isfinite(got)):
        raise RuntimeError(f"the {fmt} export does not reproduce PyTorch's predictions; nothing written")
    diff = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    atomic_write_bytes(out, data)
    return {"out": str(out), "format": fmt, "bytes": len(data), "max_abs_logit_diff": diff,
            "same_predictions": same, "restricted_classes_kept": bool((~finite).any()),
            "input": features, "input_description": input_doc(features), "note": _note(fmt, features)}


def _note(fmt: str, features: dict) -> str:
    if features["kind"] != "audio":
        return "whole model"
    if fmt == "torchscript":
        return "whole model, audio front end included"
    return "whole model, audio front end included (its STFT as a convolution with the DFT basis, checked)"
