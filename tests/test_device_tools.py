"""What an engineer at the device does around personalizing: check a model on a few labeled
examples (`evaluate`, side by side with the base), classify files (`predict`), see what a
checkpoint holds (`info`); colour photos for a grayscale model are converted with a warning."""
import json

import numpy as np
import pytest
import torch

from common.cli import main
from common.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits, digits_cli_base):
    """A base model, and one user: unlabeled photos of 4s and 9s, and a labeled held-out set of
    the same classes in class subfolders (ImageFolder layout), as the user would label a few."""
    import shutil

    from PIL import Image

    d = tmp_path_factory.mktemp("tools")
    shutil.copyfile(digits_cli_base, d / "base.pt")
    idx = np.flatnonzero(np.isin(digits.y.numpy(), [4, 9]))
    (d / "photos").mkdir()
    for i in idx[:100]:
        Image.fromarray((digits.x[i, 0].numpy() * 255).astype("uint8")).save(d / "photos" / f"img{i}.png")
    for i in idx[100:160]:
        sub = d / "labeled" / str(int(digits.y[i]))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.x[i, 0].numpy() * 255).astype("uint8")).save(sub / f"img{i}.png")
    # with output restriction (off by default): what info, evaluate and export must carry through
    assert main(["personalize", "--model", str(d / "base.pt"), "--data", str(d / "photos"),
                 "--out", str(d / "me.pt"), "--restrict-outputs"]) == 0
    return d


def test_evaluate_reports_accuracy_per_class_and_confusion_side_by_side(setup, capsys, digits):
    d = setup
    capsys.readouterr()
    assert main(["evaluate", "--model", str(d / "me.pt"), "--baseline", str(d / "base.pt"), "--data",
                 str(d / "labeled"), "--out", str(d / "eval.json"), "--plot", str(d / "eval.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    full = json.loads((d / "eval.json").read_text())
    assert printed["n"] == full["n"] == 60 and set(printed["accuracy"]) == {"model", "baseline"}
    for name, ckpt in (("model", "me.pt"), ("baseline", "base.pt")):
        r = full["results"][name]
        cm = np.array(r["confusion"]["rows_true_cols_predicted"])
        assert cm.sum() == 60 and set(r["per_class"]) == {"4", "9"}
        assert r["accuracy"] == pytest.approx(np.trace(cm) / 60, abs=1e-4)
        model, _, _ = load_checkpoint(d / ckpt)  # the same number computed directly
        x = torch.stack([_png(p)
                         for c in ("4", "9") for p in sorted((d / "labeled" / c).iterdir())])
        y = torch.tensor([int(c) for c in ("4", "9") for _ in sorted((d / "labeled" / c).iterdir())])
        with torch.no_grad():
            assert r["accuracy"] == pytest.approx(float((model(x).argmax(1) == y).float().mean()), abs=1e-4)
    assert full["accuracy"]["model"] >= 0.9  # the personalized model on its own user's classes
    assert (d / "eval.png").stat().st_size > 5000


def _png(p):
    import torchvision.transforms.functional as F
    from PIL import Image

    return F.to_tensor(Image.open(p).convert("L"))


def test_predict_prints_one_json_line_per_file_with_the_models_answer(setup, capsys):
    d = setup
    files = sorted((d / "labeled" / "9").iterdir())[:3]
    capsys.readouterr()
    assert main(["predict", "--model", str(d / "me.pt"), "--top", "2", *map(str, files)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, meta, _ = load_checkpoint(d / "me.pt")
    with torch.no_grad():
        proba = torch.softmax(model(torch.stack([_png(p) for p in files])), 1)
    assert [row["file"] for row in lines] == [str(p) for p in files]
    for row, pr in zip(lines, proba):
        assert row["class"] == meta["classes"][int(pr.argmax())]
        assert row["probability"] == pytest.approx(float(pr.max()), abs=1e-4)
        assert len(row["top"]) == 2 and row["top"][0][0] == row["class"]


def test_info_says_what_a_checkpoint_holds(setup, capsys):
    d = setup
    capsys.readouterr()
    assert main(["info", str(d / "me.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "digits" and info["input"] == {"kind": "image", "image_size": 8, "channels": 1}
    assert 0.3 < info["sparsity"] < 1 and set(info["kept_classes"]) >= {"4", "9"}
    assert info["base_fingerprint"] and info["base_fingerprint"] != info["fingerprint"]
    assert main(["info", str(d / "base.pt")]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["sparsity"] is None and base["kept_classes"] is None
    assert {"input_profile", "input_rms", "class_moments"} <= set(base["vendor_record"])  # pretrain records them


@pytest.mark.badinput
@pytest.mark.parametrize("case", ["unlabeled data", "labels not the model's", "baseline of another task",
                                  "out is a directory", "predict a missing file"])
def test_evaluate_and_predict_bad_input_is_one_line_exit_2(setup, tmp_path, capsys, case):
    from PIL import Image

    d = setup
    (tmp_path / "cats").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "cats" / "a.png")
    from common.model.architectures import build_model
    from common.model.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "kws.pt", build_model("kws"), {
        "arch": "kws", "arch_kwargs": {}, "task": "fsdd", "classes": list("0123456789"),
        "features": {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}})
    argv, msg = {
        "unlabeled data": (["evaluate", "--model", str(d / "me.pt"), "--data", str(d / "photos")], "no labeled data"),
        "labels not the model's": (["evaluate", "--model", str(d / "me.pt"), "--data", str(tmp_path)],
                                   "found labels ['cats']"),
        "baseline of another task": (["evaluate", "--model", str(d / "me.pt"), "--baseline", str(tmp_path / "kws.pt"),
                                      "--data", str(d / "labeled")], "other classes or inputs"),
        "out is a directory": (["evaluate", "--model", str(d / "me.pt"), "--data", str(d / "labeled"),
                                "--out", str(tmp_path)], "is a directory"),
        "predict a missing file": (["predict", "--model", str(d / "me.pt"), str(d / "labeled" / "4"),
                                    str(tmp_path / "nope.png")], "is not a file"),
    }[case]
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and msg in out.err and len(out.err.strip().splitlines()) == 1


def test_colour_photos_for_a_grayscale_model_are_converted_with_a_warning(tmp_path):
    from PIL import Image

    from common.data import readers as D

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "b.png")
    with pytest.warns(UserWarning, match="1 of 2 images are in colour; the model expects grayscale 8x8"):
        x = D.load_image_files(tmp_path, 8, 1)
    assert x.shape == (2, 1, 8, 8)


def test_labeled_wavs_are_read_from_fsdd_style_names(tmp_path):
    import soundfile as sf

    from client.labeled import labeled_files

    for name in ("3_jackson_0.wav", "7_nicolas_12.wav", "x_noise.wav", "readme.wav"):
        sf.write(tmp_path / name, np.zeros(800, dtype="float32"), 8000)
    files, labels = labeled_files(tmp_path, {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000},
                                  list("0123456789"))
    assert [f.name for f in files] == ["3_jackson_0.wav", "7_nicolas_12.wav"] and labels == [3, 7]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_personalized_model_predicts_as_pytorch_on_real_inputs(setup, tmp_path, fmt, capsys):
    """The exported file, run by onnxruntime or loaded as TorchScript, gives the personalized
    model's predictions on the user's own photos, and keeps its output restriction (-inf)."""
    import onnxruntime as ort

    d = setup
    out = tmp_path / f"me.{fmt}"
    assert main(["export", "--model", str(d / "me.pt"), "--format", fmt, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["same_predictions"] and printed["restricted_classes_kept"] and printed["bytes"] == out.stat().st_size
    model, _, _ = load_checkpoint(d / "me.pt")
    x = torch.stack([_png(p) for p in sorted((d / "labeled").rglob("*.png"))])
    with torch.no_grad():
        want = model(x)
    if fmt == "onnx":
        got = torch.from_numpy(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0])
    else:
        got = torch.jit.load(str(out))(x)
    assert torch.equal(got.argmax(1), want.argmax(1))
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and (~finite).any()
    assert torch.allclose(got[finite], want[finite], atol=1e-4)
    _, meta, _ = load_checkpoint(d / "me.pt")
    if fmt == "onnx":  # the file says what it takes and what its outputs are, without fineprune
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        props = session.get_modelmeta().custom_metadata_map
        assert json.loads(props["classes"]) == meta["classes"] and json.loads(props["input"]) == meta["features"]
        assert "pixels in [0, 1]" in session.get_modelmeta().description
        assert main(["predict", "--model", str(out), *map(str, sorted((d / "labeled").rglob("*.png"))[:3])]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["class"] for r in rows] == [meta["classes"][int(i)] for i in want.argmax(1)[:3]]
    else:
        import zipfile

        with zipfile.ZipFile(out) as z:
            extra = json.loads(z.read(next(n for n in z.namelist() if n.endswith("extra/fineprune.json"))))
        assert extra["classes"] == meta["classes"] and extra["input"] == meta["features"]


def test_native_noise_is_held_back_and_other_native_errors_still_shown(capfd):
    """ExecuTorch's runtime (cpuinfo) writes 'Failed to open midr file' straight to fd 2."""
    import os

    from client.export import native_stderr_filtered

    with native_stderr_filtered():
        os.write(2, b"Error in cpuinfo: Failed to open midr file /sys/devices/system/cpu/cpu0/regs\nreal trouble\n")
    err = capfd.readouterr().err
    assert "midr" not in err and "real trouble" in err


def test_a_speech_model_exports_with_its_front_end(tmp_path):
    """The STFT/log-mel front end goes into the ONNX graph: raw samples in, logits out."""
    import onnxruntime as ort

    from client.export import export
    from common.model.architectures import build_model

    m = build_model("kws").eval()
    feats = {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}
    export(m, feats, "onnx", tmp_path / "kws.onnx")
    x = 0.1 * torch.randn(3, 8000)
    got = ort.InferenceSession(str(tmp_path / "kws.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, m(x).numpy(), atol=1e-4)


def test_the_lowerable_copy_computes_what_the_model_computes():
    """What .pte export lowers instead of the model: the log-mel front end's STFT as a strided
    convolution with the windowed DFT basis, adaptive pools as matrix pools. Same outputs as
    PyTorch's own modules, for speech (10x25 pooled to 4x4: uneven bins) and for odd sizes."""
    from client.export import MatrixPool, lowerable
    from common.model.architectures import build_model

    torch.manual_seed(0)
    m = build_model("kws").eval()
    x = 0.1 * torch.randn(4, 8000)
    low = lowerable(m, x)
    assert not any(isinstance(mod, torch.nn.AdaptiveAvgPool2d) for mod in low.modules())
    with torch.no_grad():
        assert torch.allclose(low(x), m(x), atol=1e-4)
        spec = m.frontend.mel.spectrogram
        assert torch.allclose(low.frontend.mel.spectrogram(x), spec(x), rtol=1e-4, atol=1e-4 * float(spec(x).max()))
    for h, w, oh, ow in ((10, 25, 4, 4), (7, 7, 3, 2), (5, 9, 5, 9), (3, 8, 1, 1)):
        t = torch.randn(2, 3, h, w)
        assert torch.allclose(MatrixPool((h, w), (oh, ow))(t), torch.nn.functional.adaptive_avg_pool2d(t, (oh, ow)),
                              atol=1e-6)


def test_a_personalized_model_exported_to_executorch_predicts_as_pytorch(setup, tmp_path, capsys):
    """.pte through XNNPACK (the optional `pte` extra; CI installs only `test`, so this runs where
    ExecuTorch is installed): the user's photos get the personalized model's predictions, the
    restriction included."""
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra: pip install -e '.[pte]'")
    from client.export import _pte_run

    d = setup
    out = tmp_path / "me.pte"
    assert main(["export", "--model", str(d / "me.pt"), "--format", "pte", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["same_predictions"] and printed["restricted_classes_kept"]
    model, _, _ = load_checkpoint(d / "me.pt")
    x = torch.stack([_png(p) for p in sorted((d / "labeled").rglob("*.png"))])
    with torch.no_grad():
        want = model(x)
    got = _pte_run(out.read_bytes(), x)
    finite = torch.isfinite(want)
    assert torch.equal(got.argmax(1), want.argmax(1)) and torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite], want[finite], atol=1e-4)


@pytest.mark.badinput
def test_pte_export_without_executorch_says_how_to_install_it(setup, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "executorch", None)  # import fails, as where it is not installed
    capsys.readouterr()
    assert main(["export", "--model", str(setup / "me.pt"), "--format", "pte", "--out", str(tmp_path / "x.pte")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[pte]'" in err[0] and not (tmp_path / "x.pte").exists()


@pytest.mark.badinput
def test_export_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, capsys):
    d = setup
    for argv, msg in ((["--format", "tflite"], "unknown export format 'tflite'"),
                      (["--format", "onnx", "--out", str(tmp_path)], "is a directory"),
                      (["--format", "onnx", "--model", str(tmp_path / "none.pt")], "not found")):
        full = ["export", "--model", str(d / "me.pt"), "--out", str(tmp_path / "x.onnx")]
        for i in range(0, len(argv), 2):  # later options override the defaults above
            full += argv[i:i + 2]
        capsys.readouterr()
        assert main(full) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.badinput
@pytest.mark.security
def test_an_onnx_file_whose_metadata_lies_is_refused_before_any_input_is_read(setup, tmp_path, capsys):
    """predict reads classes and the input's size from the file: a huge image size or a class list
    that does not match the outputs is one line and exit 2, not an allocation or an index error."""
    import onnx

    d = setup
    good = tmp_path / "me.onnx"
    assert main(["export", "--model", str(d / "me.pt"), "--format", "onnx", "--out", str(good)]) == 0
    photo = str(sorted((d / "labeled").rglob("*.png"))[0])
    for key, value, said in (("input", json.dumps({"kind": "image", "image_size": 10 ** 6, "channels": 1}),
                              "image_size=1000000 outside"),
                             ("classes", json.dumps(["a", "b"]), "names 2 classes for 10 outputs")):
        proto = onnx.load(str(good))
        next(p for p in proto.metadata_props if p.key == key).value = value
        bad = tmp_path / f"bad-{key}.onnx"
        onnx.save(proto, str(bad))
        capsys.readouterr()
        assert main(["predict", "--model", str(bad), photo]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
