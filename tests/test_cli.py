"""The console script: end to end on digits images, and one clear line for every kind of bad input."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import main
from common.model.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_ckpt(digits_cli_base):
    return digits_cli_base


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, digits):
    """A user's own photos: 8x8 grey PNG files of two digit classes, no labels anywhere."""
    from PIL import Image

    d = tmp_path_factory.mktemp("user") / "photos"
    d.mkdir()
    idx = np.flatnonzero(np.isin(digits.y.numpy(), [4, 9]))[:120]
    for i in idx:
        Image.fromarray((digits.x[i, 0].numpy() * 255).astype("uint8")).save(d / f"img{i}.png")
    return d


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "common.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_pretrain_then_personalize_on_a_photo_directory(tmp_path, base_ckpt, user_dir, digits):
    base, meta, _ = load_checkpoint(base_ckpt)
    assert meta["task"] == "digits" and meta["features"]["image_size"] == 8 and meta["training"]["epochs"] == 8
    out = tmp_path / "personal.pt"
    rc = main(["personalize", "--model", str(base_ckpt), "--data", str(user_dir), "--out", str(out),
               "--restrict-outputs", "--recalibrate-bn", "--compact", "--tolerance", "0.03",
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sparsity"] > 0.3 and report["stop_reason"]
    assert {"4", "9"} <= set(report["kept_classes"])
    from client.commands import cmd_info
    shown = cmd_info(argparse.Namespace(checkpoint=str(out)))  # the compacted file tells the same story
    assert shown["sparsity"] == report["sparsity"] and shown["kept_classes"] == report["kept_classes"]
    assert shown["compacted"]
    model, meta2, mask = load_checkpoint(out)
    assert meta2["compacted"] and meta2["base_fingerprint"] == report["base_fingerprint"]
    assert out.stat().st_size < base_ckpt.stat().st_size
    sel = np.isin(digits.y.numpy(), [4, 9])
    x, y = digits.x[sel], digits.y[sel]
    acc = (model(x).argmax(1) == y).float().mean().item()
    base_acc = (base(x).argmax(1) == y).float().mean().item()
    assert acc >= base_acc - 0.03  # the stop rule kept >= 97% agreement with the base on the user data


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout and "personalize" in r.stdout
    r = run_cli("personalize", "--help")
    assert r.returncode == 0 and "--device" in r.stdout and "--scoring" in r.stdout


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, base_ckpt):
    """One of each kind of bad input a user can hand the command line."""
    import soundfile as sf
    from PIL import Image

    from common.model.architectures import build_model

    d = tmp_path_factory.mktemp("bad")
    (d / "junk.pt").write_bytes(b"\x00garbage")
    (d / "truncated.pt").write_bytes(base_ckpt.read_bytes()[:5000])
    (d / "empty").mkdir()
    np.save(d / "wrong.npy", np.zeros((5, 3, 32, 32), dtype="float32"))
    np.save(d / "nan.npy", np.full((5, 1, 8, 8), np.nan, dtype="float32"))
    (d / "notarray.npy").write_bytes(b"not numpy at all")
    m, meta, _ = load_checkpoint(base_ckpt)
    save_checkpoint(d / "badarch.pt", m, {**meta, "arch": "transformer9000"})
    (d / "brokenimg").mkdir()
    (d / "brokenimg" / "a.png").write_bytes(b"\x89PNG not really")
    (d / "tinyimg").mkdir()
    Image.new("L", (4, 4)).save(d / "tinyimg" / "a.png")
    kws = build_model("kws")  # an (untrained) speech model: the WAV checks come before any pruning
    save_checkpoint(d / "kws.pt", kws, {"arch": "kws", "arch_kwargs": {}, "task": "fsdd", "classes": list("0123456789"),
                                        "features": {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}})
    (d / "rate").mkdir()
    sf.write(d / "rate" / "a.wav", np.zeros(400, dtype="float32"), 500)
    (d / "badwav").mkdir()
    (d / "badwav" / "a.wav").write_bytes(b"RIFF....WAVEjunk")
    # arrays that are not a batch of numbers (each an internal error before)
    np.save(d / "zero_d.npy", np.array(3.0))
    torch.save(torch.tensor(3.0), d / "zero_d.pt")
    torch.save({"x": torch.zeros(5, 1, 8, 8)}, d / "dict.pt")
    torch.save("photos", d / "str.pt")
    torch.save(torch.zeros(5, 64).to_sparse(), d / "sparse.pt")
    np.save(d / "structured.npy", np.zeros(5, dtype=[("a", "f4"), ("b", "i4")]))
    # checkpoints whose mask or restriction is not what it says
    blob = torch.load(base_ckpt, weights_only=True)
    torch.save({**blob, "mask": "all of it"}, d / "strmask.pt")
    torch.save({**blob, "restricted_classes": [1.5]}, d / "badrestrict.pt")
    _deflated(base_ckpt, d / "bomb.pt")
    return d


def _deflated(src, dst, pad: int = 64 << 20):
    """The checkpoint with one extra entry of `pad` zero bytes, deflated (a few KB on disk)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist()
        for n in names:
            zout.writestr(zin.getinfo(n), zin.read(n))
        zout.writestr(names[0].split("/")[0] + "/pad", b"\0" * pad, compress_type=zipfile.ZIP_DEFLATED)


BAD_CLI_CASES = {  # name: (arguments with {d} = the bad files, {b} = the base, {u} = photos), message
    "missing checkpoint": (["--model", "{d}/missing.pt", "--data", "{u}"], "checkpoint not found"),
    "corrupt checkpoint": (["--model", "{d}/junk.pt", "--data", "{u}"], "checkpoint file"),
    "truncated checkpoint": (["--model", "{d}/truncated.pt", "--data", "{u}"], "checkpoint file"),
    "unknown model": (["--model", "{d}/badarch.pt", "--data", "{u}"], "unknown model 'transformer9000'"),
    "empty data directory": (["--model", "{b}", "--data", "{d}/empty"], "no image files"),
    "missing data directory": (["--model", "{b}", "--data", "{d}/nowhere"], "not found"),
    "wrong-shaped array": (["--model", "{b}", "--data", "{d}/wrong.npy"], "the model expects (1, 8, 8)"),
    "NaN inputs": (["--model", "{b}", "--data", "{d}/nan.npy"], "NaN"),
    "unreadable array": (["--model", "{b}", "--data", "{d}/notarray.npy"], "unreadable input array"),
    "unreadable image": (["--model", "{b}", "--data", "{d}/brokenimg"], "unreadable image"),
    "image too small": (["--model", "{b}", "--data", "{d}/tinyimg"], "smaller than the model's 8x8 input"),
    "wrong-rate WAV": (["--model", "{d}/kws.pt", "--data", "{d}/rate"], "sample rate 500 Hz, not a rate to resample from"),
    "unreadable WAV": (["--model", "{d}/kws.pt", "--data", "{d}/badwav"], "unreadable WAV"),
    "unknown scoring": (["--model", "{b}", "--data", "{u}", "--scoring", "vibes"], "unknown scoring 'vibes'"),
    "unknown stop rule": (["--model", "{b}", "--data", "{u}", "--stop-rule", "x"], "unknown stop rule"),
    "unknown device": (["--model", "{b}", "--data", "{u}", "--device", "tpu"], "unknown device"),
    "bad target sparsity": (["--model", "{b}", "--data", "{u}", "--target-sparsity", "1.5"], "target sparsity"),
    "0-d .npy array": (["--model", "{b}", "--data", "{d}/zero_d.npy"], "single number"),
    "0-d .pt tensor": (["--model", "{b}", "--data", "{d}/zero_d.pt"], "single number"),
    "dict in a .pt": (["--model", "{b}", "--data", "{d}/dict.pt"], "holds a dict, not an array"),
    "text in a .pt": (["--model", "{b}", "--data", "{d}/str.pt"], "holds a str, not an array"),
    "sparse tensor": (["--model", "{b}", "--data", "{d}/sparse.pt"], "save a dense one"),
    "structured array": (["--model", "{b}", "--data", "{d}/structured.npy"], "values, not numbers"),
    "mask that is text": (["--model", "{d}/strmask.pt", "--data", "{u}"], "its mask is not a byte string"),
    "restriction [1.5]": (["--model", "{d}/badrestrict.pt", "--data", "{u}"], "restricted_classes is not"),
    "deflated bomb": (["--model", "{d}/bomb.pt", "--data", "{u}"], "expand far beyond their size"),
    "--out a new directory": (["--model", "{b}", "--data", "{u}", "--out", "{d}/newdir/"], "is a directory"),
}


@pytest.mark.badinput
@pytest.mark.parametrize("case", list(BAD_CLI_CASES))
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, bad_files, base_ckpt, user_dir, case):
    args, msg = BAD_CLI_CASES[case]
    args = [a.format(d=bad_files, b=base_ckpt, u=user_dir) for a in args]
    out = tmp_path / "out.pt"
    out.write_bytes(b"the user's previous model")  # must survive a failed run untouched
    r = run_cli("personalize", *args, *(() if "--out" in args else ("--out", out)))
    assert r.returncode == 2, (args, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fineprune: error:") and msg in lines[0], r.stderr
    assert out.read_bytes() == b"the user's previous model"
    assert not (bad_files / "newdir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temp files


@pytest.mark.badinput
def test_unknown_task_is_refused(tmp_path):
    r = run_cli("pretrain", "--task", "imagenet", "--out", tmp_path / "out.pt")
    assert r.returncode == 2 and "unknown task 'imagenet'" in r.stderr and not (tmp_path / "out.pt").exists()


def test_speech_personalization_on_a_wav_directory(tmp_path, fsdd_dir):
    """Edge path for speech: a base trained briefly on FSDD, one user's WAV folder (unlabeled)."""
    import shutil

    from common.data import readers as D
    from server.pretrain import pretrain

    ds = D.load_fsdd(fsdd_dir, speakers=["jackson", "lucas", "theo"])
    r = pretrain("fsdd", tmp_path / "kws.pt", epochs=2, exclude_speaker="theo", ds=ds)
    assert r["train_samples"] == 900
    wavs = tmp_path / "theo"
    wavs.mkdir()
    for p in sorted((fsdd_dir / "recordings").glob("*_theo_*.wav"))[:60]:
        shutil.copy(p, wavs / p.name)
    out = tmp_path / "p.pt"
    assert main(["personalize", "--model", str(tmp_path / "kws.pt"), "--data", str(wavs), "--out", str(out),
                 "--target-sparsity", "0.6", "--compact"]) == 0
    model, meta, mask = load_checkpoint(out)
    assert mask.sparsity() > 0.5 and meta["features"]["sample_rate"] == 8000
    assert model(torch.zeros(2, 8000)).shape == (2, 10)


@pytest.mark.badinput
def test_out_that_is_the_base_or_a_directory_is_refused(tmp_path, base_ckpt, user_dir):
    before = base_ckpt.read_bytes()
    for out, msg in ((base_ckpt, "is the base model itself"), (tmp_path, "is a directory")):
        r = run_cli("personalize", "--model", base_ckpt, "--data", user_dir, "--out", out)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert base_ckpt.read_bytes() == before


@pytest.mark.badinput
def test_a_fifo_named_like_an_image_does_not_hang_the_device(tmp_path, base_ckpt):
    import os

    d = tmp_path / "photos"
    d.mkdir()
    os.mkfifo(d / "a.png")
    r = run_cli("personalize", "--model", base_ckpt, "--data", d, "--out", tmp_path / "o.pt")
    assert r.returncode == 2 and "no image files" in r.stderr


@pytest.mark.badinput
def test_simulations_the_data_cannot_serve_are_refused_before_anything_starts(tmp_path, fsdd_dir):
    from common.data.readers import DataError
    from simulations.simulate import simulate

    with pytest.raises(DataError, match="needs a data path"):
        simulate({"task": "fsdd", "out-dir": str(tmp_path)})
    with pytest.raises(DataError, match="7 speaker clients but only 6 speakers"):
        simulate({"task": "fsdd", "data-path": str(fsdd_dir), "partitioning": "speaker", "num-clients": 7,
                  "out-dir": str(tmp_path)})
    with pytest.raises(DataError, match="cannot give each of 5000 clients data"):
        simulate({"num-clients": 5000, "out-dir": str(tmp_path)})
    assert not (tmp_path / "report.json").exists()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb."""
    import struct
    import zlib as z

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", z.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", z.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.badinput
@pytest.mark.security
def test_a_png_decompression_bomb_is_refused_in_one_line(tmp_path, base_ckpt):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    r = run_cli("personalize", "--model", base_ckpt, "--data", d, "--out", tmp_path / "o.pt")
    assert r.returncode == 2 and "too large to decode safely" in r.stderr and not (tmp_path / "o.pt").exists()


@pytest.mark.badinput
@pytest.mark.security
def test_a_zlib_bomb_in_a_mask_stops_at_the_size_its_header_allows():
    import json as _json
    import zlib as z

    from common.model.mask import MAGIC, Mask, MaskError

    header = _json.dumps({"layers": [["fc", [8, 8]]]}).encode()
    bomb = z.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    data = MAGIC + len(header).to_bytes(4, "little") + header + bomb
    with pytest.raises(MaskError, match="does not match its header"):
        Mask.from_bytes(data)


@pytest.mark.badinput
def test_an_hour_long_wav_is_refused_and_long_clips_are_cut_visibly(tmp_path):
    import warnings

    import numpy as np
    import soundfile as sf

    from common.data.readers import DataError, load_unlabeled_dir

    feats = {"sample_rate": 8000, "clip_samples": 8000}
    d = tmp_path / "wavs"
    d.mkdir()
    sf.write(d / "a.wav", np.zeros(12000, dtype=np.float32), 8000)  # 1.5 s: cut, with a warning
    with pytest.warns(UserWarning, match="1 of 1 WAV files are longer than the model's 1.0 s window"):
        assert load_unlabeled_dir(d, "audio", **feats).shape == (1, 8000)
    sf.write(d / "b.wav", np.zeros(8000 * 3600, dtype=np.float32), 8000)  # an hour
    with pytest.raises(DataError, match="is 3600.0 s long"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_unlabeled_dir(d, "audio", **feats)


@pytest.mark.badinput
@pytest.mark.fault
def test_disk_full_is_one_line_exit_74_and_the_old_output_is_kept(tmp_path, base_ckpt, user_dir, monkeypatch,
                                                                  capsys):
    """The disk fills while the personalized model is written: one line naming it, exit 74
    (EX_IOERR), the previous output intact and no temp file left."""
    import errno
    import os

    from common.cli import main as cli

    out = tmp_path / "p.pt"
    out.write_bytes(b"the previous personalized model")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    assert cli(["personalize", "--model", str(base_ckpt), "--data", str(user_dir), "--out", str(out)]) == 74
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fineprune")]
    assert len(err) == 1 and "No space left on device" in err[0] and err[0].startswith("fineprune: error")
    assert out.read_bytes() == b"the previous personalized model"
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]


@pytest.mark.badinput
def test_threads_is_set_deliberately_and_bad_counts_are_refused(tmp_path, base_ckpt, user_dir, capsys):
    import torch

    from common.cli import auto_threads
    from common.cli import main as cli

    before = torch.get_num_threads()
    try:
        for bad in ("0", "two", "-3"):
            assert cli(["personalize", "--threads", bad, "--model", str(base_ckpt), "--data", str(user_dir),
                        "--out", str(tmp_path / "p.pt")]) == 2
        assert not (tmp_path / "p.pt").exists()
        assert cli(["personalize", "--threads", "1", "--model", str(base_ckpt), "--data", str(user_dir),
                    "--out", str(tmp_path / "p.pt")]) == 0
        assert torch.get_num_threads() == 1
        assert 1 <= auto_threads() <= 4
    finally:
        torch.set_num_threads(before)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fineprune")]
    assert len(err) == 3 and all("--threads must be" in line for line in err)


@pytest.mark.badinput
def test_key_and_signing_mistakes_give_one_line_and_overwrite_nothing(tmp_path):
    """A passphrase-protected key, a file given as --out, and a key that exists already."""
    locked = tmp_path / "locked"
    locked.write_text(LOCKED_KEY)
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"keep me")
    app = Path(__file__).parent / "attack_app"
    r = run_cli("keygen", "--out", tmp_path / "keys")
    assert r.returncode == 0
    key = (tmp_path / "keys" / "operator").read_bytes()
    for args, msg in ((["keygen", "--out", a_file], "is a file, not a directory"),
                      (["keygen", "--out", tmp_path / "keys"], "exists already"),
                      (["sign-app", "--app", app, "--key", locked, "--out", tmp_path / "s"], "not an unencrypted"),
                      (["sign-app", "--app", app, "--key", tmp_path / "keys" / "operator", "--out", a_file],
                       "is a file, not a directory")):
        r = run_cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (args, r.stderr)
    assert a_file.read_bytes() == b"keep me" and (tmp_path / "keys" / "operator").read_bytes() == key


LOCKED_KEY = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABBq/3cjLz
obBidKTH8GjL7pAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIDwfjd1f4dA4siME
gNlle8KDBby7sVgfaNUY1iT0asAcAAAAkKnUGahHSlF3lB+VoBYBk+GTpgaIlIyHt2sNlq
jrZLy64cr4ZJxCbY1J1R02m43Q7RDveepBALtopggmAN4UT6pQAD3L8yKiT+JBr88U0mL9
/2Sg2/yCu+YixkhoaSeftv0wulAgWhQfqNx58kacMFu19Gd1nly+/yoPt+PJBmmsoK2koE
JEOgwTA7PTascyhw==
-----END OPENSSH PRIVATE KEY-----
"""  # ssh-keygen -t ed25519 -N secret (a throwaway key; bcrypt is not installed to make one)


@pytest.mark.badinput
def test_the_four_confusing_messages_now_say_what_is_wrong(tmp_path, base_ckpt, user_dir, capsys):
    """A PNG given as --data, a folder as --model, --sparsity for --target-sparsity, and a speech
    model given images: each one line that names the real problem."""
    from common.model.architectures import build_model

    png = next(user_dir.glob("*.png"))

    def err(argv, code=2):
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
        assert rc == code
        return capsys.readouterr().err

    assert f"{png} is a file; --data takes a directory" in err(
        ["personalize", "--model", str(base_ckpt), "--data", str(png), "--out", str(tmp_path / "o.pt")])
    assert "is a directory; give the checkpoint file itself" in err(["info", str(base_ckpt.parent)])
    assert "did you mean --target-sparsity" in err(
        ["personalize", "--model", str(base_ckpt), "--data", str(user_dir), "--out", str(tmp_path / "o.pt"),
         "--sparsity", "0.5"])
    kws = tmp_path / "kws.pt"
    kwargs = {"num_classes": 10, "sample_rate": 8000, "n_mels": 40}
    save_checkpoint(kws, build_model("kws", **kwargs), {
        "arch": "kws", "arch_kwargs": kwargs, "task": "fsdd", "classes": [str(i) for i in range(10)],
        "features": {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}})
    said = err(["personalize", "--model", str(kws), "--data", str(user_dir), "--out", str(tmp_path / "o.pt")])
    assert "this is a speech model (WAV clips, 8000 Hz, 1.0 s)" in said and "images: is this the right model?" in said
    assert not (tmp_path / "o.pt").exists()


def test_help_texts_end_in_whole_sentences():
    from common.cli import first_sentence

    assert first_sentence("A real deployment on one machine: a SuperLink and N SuperNodes as\nseparate "
                          "processes (Flower 1.42's Fleet API is HTTPS). Used by the test.") == \
        "A real deployment on one machine: a SuperLink and N SuperNodes as separate processes " \
        "(Flower 1.42's Fleet API is HTTPS)."
    for module in ("simulations.deploy.certs", "simulations.deploy.run_local", "server.gateway"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        description = r.stdout.split("\n\n")[1]
        assert r.returncode == 0 and description.rstrip().endswith("."), (module, description)
    r = run_cli("personalize", "--help")
    assert "2-core box" not in r.stdout and "this machine" not in r.stdout
