"""What personalization costs, and that the speed work changed no result: the engine's report of
where its time went, the stop rule's reference taken from the
statistics pass (no probe pass of its own), no recalibration pass at the end when nothing but the
restriction goes, `fineprune bench-cost` writing its tables (a row per user size), `fineprune
bench-gpu --profile` writing each step's operators, the memory
policy, and the study of stop proxies from the statistics pass alone. (The measured ratios are the
benchmark's, not tests': speed is never asserted here.)"""
import copy
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.data import readers as D
from common.engine.bn import recalibrate_bn
from common.engine.probe import probe_pick, probe_samples
from common.engine.prune import fine_prune
from common.engine.restrict import apply_restriction
from common.settings import PruneConfig
from simulations.bench_report import PREVIOUS_DEFAULT

ROOT = Path(__file__).resolve().parents[1]



def _user(digits, pool, classes):
    idx = [i for i in pool if int(digits.y[i]) in classes]
    return D.make_users(digits, [idx], 0.3, seed=0)[0]


def test_the_engine_reports_where_its_time_went(digits, digits_split, digits_base):
    user = _user(digits, digits_split[1], (0, 3, 8))
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, PruneConfig())
    assert {"statistics pass", "probe passes", "selection", "mask apply"} <= set(res.phases)
    assert "reference probe" not in res.phases  # the statistics pass gave it
    assert all(res.phases[p] > 0 for p in ("statistics pass", "probe passes", "selection"))
    # the phases are laps of one clock: together they are the whole call, nothing counted twice
    assert sum(res.phases.values()) == pytest.approx(res.seconds, rel=0.05, abs=2e-3)
    fixed = fine_prune(copy.deepcopy(digits_base), user.unlabeled, PruneConfig(target_sparsity=0.5))
    assert "probe passes" not in fixed.phases and "final recalibration" in fixed.phases


def test_when_nothing_may_go_the_kept_model_has_the_statistics_pass_batchnorm(digits, digits_split, digits_base):
    """When the rule accepts no step, only the restricted output rows go: they feed no
    BatchNorm, so the kept model keeps the statistics the statistics pass estimated on all of the
    user's data, and no recalibration pass follows."""
    user = _user(digits, digits_split[1], (0, 3, 8))
    n = len(user.unlabeled)
    # one 90% step: no digits model keeps every answer (the engine of before the safe default)
    cfg = PruneConfig(**PREVIOUS_DEFAULT, tolerance=0.0, step=0.9, max_sparsity=0.95)
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, cfg)
    assert res.restricted_classes is not None and not any(h["passed"] for h in res.history)
    assert res.mask == apply_restriction(digits_base, res.mask.__class__.dense(digits_base), res.restricted_classes)
    assert res.forward_samples == n + probe_samples(cfg, n) * len(res.history)
    assert "final recalibration" not in res.phases
    full = copy.deepcopy(digits_base)
    recalibrate_bn(full, user.unlabeled, 256)
    kept = copy.deepcopy(digits_base)
    fine_prune(kept, user.unlabeled, cfg)
    probe_only = copy.deepcopy(digits_base)
    recalibrate_bn(probe_only, user.unlabeled[probe_pick(cfg, n)], 256)
    # the means of all samples (bn2's input was normalized per batch: probe, then the rest)
    for name, tol in (("bn1", 1e-6), ("bn2", 1e-3)):
        assert torch.allclose(getattr(kept, name).running_mean, getattr(full, name).running_mean, atol=tol)
        assert not torch.allclose(getattr(probe_only, name).running_mean, getattr(full, name).running_mean, atol=tol)
        # the variances average the two batches': the spread between the batch means is left
        # out, as in any multi-batch recalibration
        assert torch.allclose(getattr(kept, name).running_var, getattr(full, name).running_var, rtol=0.05)


@pytest.mark.parametrize("batch_size", [256, 16])
def test_the_reference_from_the_statistics_pass_is_what_a_probe_pass_outputs(digits, digits_split, digits_base,
                                                                           batch_size):
    """The statistics pass takes the probe first, in batches of its own: in train mode each batch
    is normalized by its own statistics, so those logits are, bit for bit, what a recalibrating
    probe pass of the unpruned model outputs, the reference the stop rule needs; the other
    samples' logits come back in their places."""
    x = _user(digits, digits_split[1], (0, 3, 8)).unlabeled
    pick = probe_pick(PruneConfig(), len(x))
    assert 0 < len(pick) < len(x)
    lg, _ = recalibrate_bn(copy.deepcopy(digits_base), x, batch_size, hooks=False, first=pick)
    probe_pass, _ = recalibrate_bn(copy.deepcopy(digits_base), x[pick], batch_size)
    assert torch.equal(lg[pick], probe_pass)
    rest = torch.ones(len(x), dtype=torch.bool)
    rest[pick] = False
    others, _ = recalibrate_bn(copy.deepcopy(digits_base), x[rest], batch_size)
    assert torch.equal(lg[rest], others)


def test_a_rule_that_reads_statistics_still_gets_a_reference_probe(digits, digits_split, digits_base):
    user = _user(digits, digits_split[1], (0, 3, 8))
    n = len(user.unlabeled)
    cfg = PruneConfig(**PREVIOUS_DEFAULT, stop_rule="drift", tolerance=0.05)
    res = fine_prune(copy.deepcopy(digits_base), user.unlabeled, cfg)
    assert "reference probe" in res.phases
    assert res.forward_samples == n + probe_samples(cfg, n) * (1 + len(res.history))


def test_recalibration_weighs_batches_by_their_samples(digits, digits_base):
    """The running statistics are those of all the samples, however the batches fall: 70 samples
    in batches of 64 and 6 give the mean of all 70 (PyTorch's cumulative average, momentum None,
    weighs the 6 as much as the 64)."""
    x = digits.x[:70]
    model = copy.deepcopy(digits_base)
    recalibrate_bn(model, x, 64)
    with torch.no_grad():
        h = digits_base.conv1(x)
        by_batch = (h[:64].mean((0, 2, 3)) + h[64:].mean((0, 2, 3))) / 2
    assert torch.allclose(model.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(by_batch, h.mean((0, 2, 3)), atol=1e-3)  # the equal weighting is measurably off


def test_bench_cost_writes_its_tables_and_plot(tmp_path):
    """`fineprune bench-cost` on the digits workload: every column as a ratio to one inference
    pass, the default's phases, CSV/JSON/Markdown/PNG."""
    from common.cli import main

    assert main(["bench-cost", "--workloads", "digits", "--repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cost.json").read_text())["results"]["digits"]
    assert res["x_inference"]["inference pass"] == 1.0
    assert all(v > 0 for v in res["x_inference"].values())
    assert "statistics pass" in res["default_phases_x"] and 0 < res["default_sparsity"] < 1
    md = (tmp_path / "cost.md").read_text()
    assert "| digits |" in md and "Where the default's time goes" in md
    assert (tmp_path / "cost.png").stat().st_size > 5000
    assert (tmp_path / "cost.csv").read_text().startswith("workload,samples")


def test_bench_cost_measures_each_user_size_asked_once(tmp_path):
    """`--samples 16,32,0,500` on digits: a row per size the user has (16, 32 and its own 63;
    500 is more than it has, so it is not measured twice), and the cost-by-samples plot."""
    from common.cli import main

    assert main(["bench-cost", "--workloads", "digits", "--samples", "16,32,0,500", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cost.json").read_text())["results"]
    assert sorted(res) == ["digits@16", "digits@32", "digits@63"]
    assert [res[k]["samples"] for k in ("digits@16", "digits@32", "digits@63")] == [16, 32, 63]
    assert all(r["workload"] == "digits" and r["x_inference"]["inference pass"] == 1.0 for r in res.values())
    assert "| digits@16 | 16 |" in (tmp_path / "cost.md").read_text()
    assert (tmp_path / "cost_by_samples.png").stat().st_size > 5000


def test_bench_gpu_profiles_the_steps_it_is_asked_for_and_no_other(tmp_path):
    """`fineprune bench-gpu --profile usage,inference` (ResNet18 at 32x32 on the CPU): each named
    step's operators by self time in profile-<step>.txt and bench_gpu.json. The usage hooks'
    per-channel norms show in the statistics pass's profile and not in the plain pass's, so each
    profile is of its own step."""
    from common.cli import main

    assert main(["bench-gpu", "--device", "cpu", "--arch", "resnet18", "--images", "8", "--size", "32",
                 "--batch-size", "4", "--repeats", "1", "--profile", "usage,inference",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert sorted(res["profile"]) == ["inference", "usage"]
    for step, p in res["profile"].items():
        assert p["seconds"] > 0 and p["device_busy_seconds"] is None and "table" not in p
        assert p["ops"] and any(o["op"] == "aten::mkldnn_convolution" or "conv" in o["op"] for o in p["ops"])
        assert all(a["self_cpu_ms"] >= b["self_cpu_ms"] for a, b in zip(p["ops"], p["ops"][1:]))
    usage, plain = ((tmp_path / f"profile-{s}.txt").read_text() for s in ("usage", "inference"))
    assert "aten::linalg_vector_norm" in usage and "aten::linalg_vector_norm" not in plain
    assert "Profiled statistics (usage hooks)" in (tmp_path / "bench_gpu.md").read_text()
    assert not list(tmp_path.glob("profile-*.txt.*"))  # no temp file left behind


@pytest.mark.badinput
def test_bench_gpu_refuses_a_step_it_cannot_profile_before_measuring(tmp_path, capsys):
    from common.cli import main

    assert main(["bench-gpu", "--device", "cpu", "--profile", "usage,all_hooks", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown step(s) to profile: all_hooks" in err[0] and "all-hooks" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.badinput
def test_bench_cost_refuses_unknown_workloads_and_kws_without_data_in_one_line(tmp_path, capsys):
    from common.cli import main

    assert main(["bench-cost", "--workloads", "digits,vgg", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench-cost", "--workloads", "kws", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench-cost", "--workloads", "digits", "--samples", "64,x", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench-cost", "--workloads", "digits", "--samples", "64,-1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "unknown workload(s): vgg" in err[0] and "needs --fsdd" in err[1]
    assert "whole numbers" in err[2] and "'64,x'" in err[2] and "counts >= 0" in err[3]
    assert not (tmp_path / "x").exists()


def test_a_user_one_sample_past_the_probe_still_personalizes():
    """33 images, a probe of 32: taking the probe first would leave the 33rd in a batch of its
    own, which BatchNorm cannot normalize over ResNet18's 1x1 maps at 32x32; the engine then
    takes a reference probe instead."""
    from common.model.architectures import build_model

    torch.manual_seed(0)
    x = torch.randn(33, 3, 32, 32)
    res = fine_prune(build_model("resnet18", num_classes=10), x, PruneConfig(**PREVIOUS_DEFAULT))
    assert "reference probe" in res.phases and res.forward_samples == 33 + 32 * (1 + len(res.history))
    # the default, on a base without the vendor's record: the input side only, from the start, with
    # no check to pay for
    res = fine_prune(build_model("resnet18", num_classes=10), x, PruneConfig())
    assert res.adaptation["bn"] == "stem" and not res.adaptation["vendor_record"]
    assert "reference probe" in res.phases and res.forward_samples == 33 + 32 * (1 + len(res.history))


def test_the_engine_hands_the_model_back_in_its_own_layout(digits, digits_split, digits_base):
    """Passes run in channels_last on the CPU; the personalized model comes back contiguous,
    as it came, and predicts what its mask and statistics say."""
    user = _user(digits, digits_split[1], (0, 3, 8))
    model = copy.deepcopy(digits_base)
    res = fine_prune(model, user.unlabeled, PruneConfig(target_sparsity=0.5))
    assert all(p.is_contiguous() for p in model.parameters())  # conv2's weight in channels_last is not
    for name, keep in res.mask.layers.items():
        w = dict(model.named_modules())[name].weight
        assert not bool(w[~keep].any()) and bool(w[keep].ne(0).any())


class _ViewNet(torch.nn.Module):
    """A user's model that flattens with .view(): fine in NCHW, an error in channels_last."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_cannot_run_in_channels_last_is_personalized_in_its_own_layout(digits):
    torch.manual_seed(0)
    x = digits.x[:60]
    model = _ViewNet()
    twin = copy.deepcopy(model)
    res = fine_prune(model, x, PruneConfig(target_sparsity=0.5))
    assert res.sparsity >= 0.5 and all(p.is_contiguous() for p in model.parameters())
    with pytest.raises(RuntimeError):  # the trial the engine makes before choosing the layout
        twin.to(memory_format=torch.channels_last)(x[:2])


def test_stop_proxies_grow_with_sparsity_along_the_schedule(digits, digits_split, digits_base):
    """simulations.stop_proxy records, for one user, the default's stop, the held-out accuracy
    at every step and each proxy along the schedule; the masks are nested, so every proxy grows
    with the sparsity, and the curves, table and plot are written for any set of users."""
    from simulations import stop_proxy as SP

    user = _user(digits, digits_split[1], (0, 3, 8))
    r = SP.user_curves(digits_base, user.unlabeled, user.heldout_x, user.heldout_y, step=0.3, max_sparsity=0.9)
    n = len(r["levels"])
    assert n == 7 and len(r["accuracy"]) == n and all(len(v) == n for v in r["proxies"].values())
    for p, v in r["proxies"].items():
        assert all(b >= a - 1e-12 for a, b in zip(v, v[1:])), p
    assert r["proxies"]["level (a fixed target)"] == r["levels"] and -1 <= r["stop"] < n
    assert r["accuracy"][0] > 0.8  # 30% pruned, recalibrated: still the model it was
    rows = [dict(r, cohort=c, user=c) for c in ("a", "b")]
    table = SP.summarize(rows)
    assert set(table) == set(SP.PROXIES) and set(table["energy, worst layer"]["cohorts"]) == {"a", "b"}
    # the same user in both cohorts: each threshold is that user's own value, so it stops where the rule did
    assert all(t["within_one_step"] == 1.0 and t["mean_d_accuracy"] == pytest.approx(
        r["accuracy"][max(r["stop"], 0)] - r["stop_accuracy"]) for t in table.values())
    assert "| energy, worst layer |" in SP.to_markdown(table, rows)
    SP.plot(table, rows)


def test_leave_one_cohort_out_tells_a_proxy_that_locates_the_stop_from_one_that_does_not():
    """A proxy that reads the same at every user's stop is found to stop every held-out user
    there; one whose value at the stop differs by cohort is found to miss, and by how much."""
    from simulations.stop_proxy import leave_one_cohort_out

    levels = [0.1, 0.2, 0.3, 0.4, 0.5]
    rows = []
    for c, stop in (("a", 1), ("b", 3), ("c", 2)):
        good = [0.5 * (i + 1) / (stop + 1) for i in range(5)]   # 0.5 exactly at the stop
        rows.append({"cohort": c, "levels": levels, "stop": stop, "stop_accuracy": 0.9,
                     "accuracy": [0.9 if i <= stop else 0.5 for i in range(5)],
                     "proxies": {"good": good, "level": levels}})
    good, level = leave_one_cohort_out(rows, "good"), leave_one_cohort_out(rows, "level")
    assert all(v["within_one_step"] == 1.0 and v["mean_d_accuracy"] == 0 for v in good.values())
    # the level learned on a and c (0.2, 0.3: median 0.25) stops b at 0.2 instead of 0.4
    assert level["b"]["mean_d_sparsity"] == pytest.approx(-0.2) and level["b"]["within_one_step"] == 0.0
    # learned on b and c (0.4, 0.3): a stops at 0.3 instead of 0.2 and loses 0.4
    assert level["a"]["mean_d_accuracy"] == pytest.approx(-0.4)


@pytest.mark.badinput
def test_stop_proxy_refuses_unknown_cohorts_and_fsdd_without_data(tmp_path):
    from simulations import stop_proxy as SP

    p = SP.build_parser()
    with pytest.raises(ValueError, match="unknown cohort"):
        SP.main(p.parse_args(["--cohorts", "digits,imagenet", "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="need --fsdd"):
        SP.main(p.parse_args(["--cohorts", "fsdd-loso", "--out", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()


_PASSES = """
import resource, sys, torch
from common.memory import set_memory, in_force
torch.set_num_threads(1)
print(set_memory(sys.argv[1]), in_force())
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(4, 3, 256, 256)  # activations of 32 MB, past glibc's largest mmap threshold
with torch.no_grad():
    for _ in range(6):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="the memory policy is glibc's malloc (Linux)")
def test_kept_memory_serves_the_next_pass_without_page_faults():
    """--memory keep: the blocks one pass frees serve the next pass, which faults in no new pages;
    with the C library's default every pass faults its activations in again (in a child process:
    the policy is the whole process's)."""
    runs = {}
    for policy in ("keep", "release"):
        out = subprocess.run([sys.executable, "-c", _PASSES, policy], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        assert lines[0] == f"{policy} {policy}"
        runs[policy] = [int(v) for v in lines[1:] if v]
    keep, release = runs["keep"], runs["release"]
    # 3 x 32 MB a pass: 24,576 faults in 4 KB pages, every pass (48 in huge pages where the
    # kernel always gives them); kept, none from the second pass on
    assert min(release[1:]) >= 48
    assert max(keep[2:]) * 20 < min(release[1:])


@pytest.mark.badinput
def test_memory_policy_refuses_what_it_cannot_do(monkeypatch, capsys):
    """A C library without mallopt (macOS, musl) cannot keep freed memory: asking for it is one
    clear error, never a silent no-op; 'release' always works; an unknown policy is refused, and
    only commands that do their work in-process take --memory."""
    from common import memory
    from common.cli import main as cli

    monkeypatch.setattr(memory, "_mallopt", lambda: None)
    with pytest.raises(ValueError, match="needs glibc"):
        memory.set_memory("keep")
    assert memory.set_memory("release") == "release" and memory.in_force() == "release"
    with pytest.raises(ValueError, match="must be one of release, keep"):
        memory.set_memory("auto")
    with pytest.raises(SystemExit):  # argparse: an unknown choice, and simulate's clients run in Ray
        cli(["simulate", "--memory", "keep", "--out", "x"])
    assert "--memory" in capsys.readouterr().err
    assert cli(["bench-cost", "--workloads", "vgg", "--memory", "keep", "--out", "x"]) == 2
    assert "needs glibc" in capsys.readouterr().err


def test_a_device_chooses_its_threads_and_memory_policy_in_its_node_config(monkeypatch):
    """A real device's SuperNode node config sets the ClientApp process's thread count and
    memory policy; a policy the device cannot have is an error, not a silent default."""
    import torch

    from client import client_app
    from common import memory

    chosen = []
    monkeypatch.setattr(client_app, "set_memory", chosen.append)
    before = torch.get_num_threads()
    try:
        client_app.device_choices({"threads": 1, "memory": "keep", "device-name": "phone-1"})
        assert chosen == ["keep"] and torch.get_num_threads() == 1
        client_app.device_choices({"device-name": "phone-2"})  # nothing asked: nothing changed
        assert chosen == ["keep"]
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(client_app, "set_memory", memory.set_memory)
    with pytest.raises(ValueError, match="must be one of release, keep"):
        client_app.device_choices({"memory": "all"})
