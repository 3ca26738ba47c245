import os

import numpy as np
import pytest
import torch

from common.data import partition as PT
from common.data import readers as D
from common.io import atomic_write_bytes
from common.model.architectures import build_model
from common.model.checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from common.model.mask import Mask

META = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits",
        "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}


def test_checkpoint_round_trip_with_mask_and_metadata(tmp_path):
    model = build_model("smallcnn")
    mask = Mask.dense(model)
    mask.layers["fc1"][:, ::2] = False
    mask.apply(model)
    save_checkpoint(tmp_path / "c.pt", model, META, mask=mask, restricted=[1, 4])
    back, meta, m2 = load_checkpoint(tmp_path / "c.pt")
    assert m2 == mask and meta["task"] == "digits" and meta["version"] == 2
    assert fingerprint(back.inner) == fingerprint(model)
    assert back(torch.rand(3, 1, 8, 8)).argmax(1).tolist() <= [4, 4, 4]


def test_a_pruned_checkpoint_stores_only_kept_weights_and_reads_back_bit_exact(tmp_path):
    """A personalized file is smaller than its base (pruned weights are not stored), and the
    model read back is bit-identical; version-1 files (dense) still read."""
    model = build_model("smallcnn")
    save_checkpoint(tmp_path / "base.pt", model, META)
    mask = Mask({n: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) > 0.7
                 for n, t in Mask.dense(model).layers.items()})
    mask.apply(model)
    save_checkpoint(tmp_path / "p.pt", model, META, mask=mask)
    assert (tmp_path / "p.pt").stat().st_size < 0.5 * (tmp_path / "base.pt").stat().st_size
    back, _, m2 = load_checkpoint(tmp_path / "p.pt")
    assert m2 == mask and fingerprint(back) == fingerprint(model)
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    blob["kept_weights"]["fc1.weight"] = blob["kept_weights"]["fc1.weight"][:-1]  # one value short
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit the mask"):
        load_checkpoint(tmp_path / "bad.pt")
    blob = torch.load(tmp_path / "base.pt", weights_only=True)
    blob.update(version=1, kept_weights=None)
    torch.save(blob, tmp_path / "v1.pt")
    assert fingerprint(load_checkpoint(tmp_path / "v1.pt")[0]) == fingerprint(load_checkpoint(tmp_path / "base.pt")[0])


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = build_model("smallcnn")
    save_checkpoint(tmp_path / "good.pt", model, META)
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "arch.pt", model, dict(META, arch="nope"))
    save_checkpoint(tmp_path / "shape.pt", model, dict(META, arch_kwargs={"num_classes": 3}))
    cases = {"missing.pt": "not found", "trunc.pt": "checkpoint", "junk.pt": "checkpoint",
             "foreign.pt": "not a fineprune checkpoint", "arch.pt": "unknown model 'nope'",
             "shape.pt": "does not fit"}
    for name, msg in cases.items():
        with pytest.raises((CheckpointError, ValueError), match=msg):
            load_checkpoint(tmp_path / name)


@pytest.mark.badinput
def test_a_checkpoint_whose_metadata_names_another_task_or_input_is_refused(tmp_path):
    """Metadata that does not describe the model (another task's inputs, another input size,
    another class count) is refused on load in one line, before any data pass."""
    from common.cli import main as cli

    model = build_model("smallcnn")
    audio = {"kind": "audio", "sample_rate": 8000, "clip_samples": 8000}
    cases = {
        "audio.pt": (dict(META, task="fsdd", features=audio), "takes images, but its metadata names audio"),
        "size.pt": (dict(META, features={"kind": "image", "image_size": 28, "channels": 1}),
                    "image_size=28 does not match the model's image_size=8"),
        "classes.pt": (dict(META, classes=["a", "b", "c"]), "10 outputs but its metadata names 3 classes"),
    }
    for name, (meta, msg) in cases.items():
        save_checkpoint(tmp_path / name, model, meta)
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(tmp_path / name)
    rn = build_model("resnet18", num_classes=10)
    save_checkpoint(tmp_path / "rn.pt", rn, dict(META, arch="resnet18", arch_kwargs={"num_classes": 10},
                                                  features={"kind": "image", "image_size": 32, "channels": 1}))
    with pytest.raises(CheckpointError, match="does not take the input its metadata names"):
        load_checkpoint(tmp_path / "rn.pt")
    (tmp_path / "imgs").mkdir()
    assert cli(["personalize", "--model", str(tmp_path / "size.pt"), "--data", str(tmp_path / "imgs"),
                "--out", str(tmp_path / "p.pt")]) == 2
    assert not (tmp_path / "p.pt").exists()


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind


def test_partitioners_make_realistic_disjoint_users(digits):
    y = digits.y.numpy()
    groups = PT.partition_class_subsets(y, 10, (2, 3), seed=1)
    flat = [i for g in groups for i in g]
    assert len(flat) == len(set(flat))
    assert all(2 <= len(set(y[g])) <= 3 for g in groups)
    dir_groups = PT.partition_dirichlet(y, 5, alpha=0.3, seed=0)
    assert sum(len(g) for g in dir_groups) == len(y) and min(len(g) for g in dir_groups) >= 10
    users = PT.make_users(digits, groups, 0.3, seed=0)
    for u, g in zip(users, groups):
        assert len(u.unlabeled) + len(u.heldout_y) == len(g)
        # held-out samples are not in the personalization data
        a = {r.numpy().tobytes() for r in u.unlabeled.reshape(len(u.unlabeled), -1)}
        assert not any(r.numpy().tobytes() in a for r in u.heldout_x.reshape(len(u.heldout_x), -1))
    vend, pool = PT.vendor_user_split(len(y), 0.5, 0)
    assert not set(vend) & set(pool)


def test_fsdd_loads_real_recordings_and_partitions_by_speaker(fsdd_dir):
    ds = D.load_fsdd(fsdd_dir, speakers=["jackson", "theo"])
    assert ds.x.shape == (1000, 8000) and set(ds.y.tolist()) == set(range(10))
    assert (ds.takes < 5).sum() == 100  # official test takes 0-4
    names, groups = PT.partition_by_group(ds.groups)
    assert names == ["jackson", "theo"] and [len(g) for g in groups] == [500, 500]
    assert ds.x.abs().max() <= 1.0 and ds.x.abs().mean() > 0.001


def test_a_phone_recording_at_another_rate_is_resampled_to_the_models(tmp_path):
    """16/44.1/48 kHz WAVs are resampled to the model's 8 kHz, not refused: a 440 Hz tone
    recorded at each rate reads as the same 8 kHz tone."""
    import soundfile as sf

    t8 = np.arange(8000) / 8000
    want = torch.from_numpy(0.5 * np.sin(2 * np.pi * 440 * t8)).float()
    for rate in (16000, 44100, 48000):
        t = np.arange(rate) / rate
        sf.write(tmp_path / f"tone{rate}.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype("float32"), rate)
        got = D.read_wav(tmp_path / f"tone{rate}.wav", 8000, 8000)
        assert got.shape == (8000,)
        assert (got[200:-200] - want[200:-200]).abs().max() < 0.02, rate  # edges: the filter's ramp


def test_only_clips_longer_than_the_window_at_the_models_rate_are_reported_cut(tmp_path):
    """A 1 s recording at 16 kHz fills an 8 kHz model's 1 s window exactly once resampled; a 2 s
    one is cut, and said so."""
    import soundfile as sf

    feats = {"sample_rate": 8000, "clip_samples": 8000}
    (tmp_path / "one").mkdir()
    sf.write(tmp_path / "one" / "a.wav", np.zeros(16000, dtype="float32"), 16000)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert D.load_unlabeled_dir(tmp_path / "one", "audio", **feats).shape == (1, 8000)
    sf.write(tmp_path / "one" / "b.wav", np.zeros(32000, dtype="float32"), 16000)
    with pytest.warns(UserWarning, match="1 of 2 WAV files are longer"):
        D.load_unlabeled_dir(tmp_path / "one", "audio", **feats)


def test_bad_audio_and_directories(tmp_path):
    import soundfile as sf

    with pytest.raises(D.DataError, match="not found"):
        D.load_fsdd(tmp_path / "nope")
    with pytest.raises(D.DataError, match="no FSDD recordings"):
        D.load_fsdd(tmp_path)
    sf.write(tmp_path / "1_bob_0.wav", np.zeros(400, dtype="float32"), 500)
    with pytest.raises(D.DataError, match="sample rate 500 Hz, not a rate to resample from"):
        D.load_fsdd(tmp_path)
    (tmp_path / "1_bob_0.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(D.DataError, match="unreadable WAV"):
        D.load_fsdd(tmp_path)
