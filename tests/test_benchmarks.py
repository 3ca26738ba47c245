"""The benchmarks' own behaviour (not their numbers: speed is never asserted in a test):
`fineprune bench-cost` writes its tables and plot, a row per user size asked; `fineprune bench-gpu
--profile` writes each step's operators and refuses a step it cannot profile; bad workloads and
cohorts are refused in one line; the study of stop proxies from the statistics pass alone."""
import json

import pytest

from common.data import partition as PT


def _user(digits, pool, classes):
    idx = [i for i in pool if int(digits.y[i]) in classes]
    return PT.make_users(digits, [idx], 0.3, seed=0)[0]


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


@pytest.mark.badinput
def test_head_rebuild_study_refuses_unknown_cohorts_and_speech_without_data(tmp_path):
    from simulations import head_rebuild_study as HR

    with pytest.raises(SystemExit, match="unknown cohort 'imagenet'"):
        HR.main(["--cohorts", "digits,imagenet", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="needs --fsdd"):
        HR.main(["--cohorts", "fsdd-cond", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists()


@pytest.mark.badinput
def test_few_class_study_cuts_a_user_to_its_first_classes_and_refuses_what_it_cannot_run(tmp_path):
    import torch

    from simulations import few_class_study as FC
    from simulations.cohorts import BenchUser

    y, hy = torch.tensor([3, 1, 1, 7, 3, 1, 7]), torch.tensor([1, 3, 7, 7])
    u = BenchUser("u", torch.arange(7.0)[:, None], y, torch.arange(4.0)[:, None], hy)
    one = FC.cut(u, 1)  # class 1: three unlabeled samples, one held out: too few
    assert one is None
    two = FC.cut(u, 2)  # classes 1 and 3
    assert two.user_id == "u|2" and two.x.flatten().tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert two.y.tolist() == [3, 1, 1, 3, 1] and two.heldout_y.tolist() == [1, 3]
    with pytest.raises(SystemExit, match="unknown cohort or speech without --fsdd: imagenet, fsdd-loso"):
        FC.main(["digits,imagenet,fsdd-loso", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.badinput
def test_arch_study_counts_users_below_their_base_per_classes_held_and_refuses_what_it_cannot_run(tmp_path):
    """The out-of-sample architecture study (ResNet50 on resnet-few): per number of classes held,
    a user counts as below its base only past 2 points, and the worst user is the largest drop."""
    from simulations import arch_study as AS

    def row(k, base, default):
        return {"classes held": k, "base": base, "sparsity": 0.3, **{m: base for m in AS.METHODS}, "default": default}

    rows = [row("all", 0.80, 0.79), row("all", 0.60, 0.90), row(1, 1.00, 0.70), row(1, 0.50, 0.50)]
    table = {s["cohort"]: s for s in AS.summary(rows)}
    assert table["classes held: all"]["default below"] == 0  # -1 point is not past 2
    assert round(table["classes held: all"]["default"], 3) == 0.845
    assert table["classes held: 1"]["default below"] == 1
    assert round(table["classes held: 1"]["default worst"], 3) == -0.30
    assert table["classes held: 1"]["t3a below"] == 0
    for argv in (["--epochs", "0"], ["--arch", "vgg11"]):
        with pytest.raises(SystemExit):
            AS.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_leave_one_cohort_out_keeps_to_the_sparsity_floor_and_counts_a_worst_user_past_two_points():
    """The cohort studies' choice (S22, S38): the arm the other cohorts score best, a worst user more
    than 2 points below its base counted against it, among the arms that keep their sparsity."""
    from simulations import cohort_study as CS

    def row(c, a_worst):
        return {"cohort": c, "base": 0.90, "a": 0.95, "a sparsity": 0.6, "a worst": a_worst,
                "b": 0.96, "b sparsity": 0.4, "b worst": 0.0}

    table = [row(c, 0.0) for c in "xyz"]
    assert {f["chosen"] for f in CS.loco(table, ["a", "b"])} == {"b"}  # the better mean, sparsity aside
    assert {f["chosen"] for f in CS.loco(table, ["a", "b"], floor=0.5)} == {"a"}  # b falls below the floor
    table = [row(c, -0.10) for c in "xyz"]  # a's worst user 10 points below its base: 8 past 2 counted
    assert {f["chosen"] for f in CS.loco(table, ["a", "b"])} == {"b"}
    assert CS.loco(table, ["a", "b"], floor=0.9)[0]["chosen"] == "b"  # no arm reaches it: all may be chosen
    assert round(CS.objective(table[0], "a"), 3) == -0.03  # 5 points gained, 8 counted against


@pytest.mark.badinput
def test_prior_head_study_sets_tau_for_an_arm_alone_and_refuses_an_unknown_arm(tmp_path):
    """S54's study: an arm's tau reaches the label-shift head for that arm's run only (the setting
    after it is the shipped one), and is not passed to PruneConfig; an unknown arm or cohort is one
    line, and nothing is written."""
    from common.engine import heads as H
    from simulations import prior_head_study as PH

    shipped = H.PRIOR_POWER
    change = dict(PH.ARMS["tau 1"])
    with PH.prior_power(change):
        assert H.PRIOR_POWER == 1.0 and change == {}
    assert H.PRIOR_POWER == shipped
    change = dict(PH.ARMS["prototypes"])
    with PH.prior_power(change):
        assert H.PRIOR_POWER == shipped and change == {"head": "prototypes"}
    for argv in (["--arms", "tau 2"], ["--cohorts", "imagenet"]):
        with pytest.raises(SystemExit):
            PH.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.badinput
def test_vendor_prior_study_reads_no_counts_for_the_uniform_arm_alone_and_refuses_bad_input(tmp_path):
    """S55's study: the uniform arm's run reads no vendor counts (the label-shift head of S54),
    every other arm's does, and the arm's key is not passed to PruneConfig; a long-tailed vendor
    keeps its most common class whole and its rarest at 1/imbalance; an unknown network or an
    imbalance below 1 is one line, and nothing is written."""
    import numpy as np

    from common.engine import heads as H
    from simulations import vendor_prior_study as VP

    meta = {"class_counts": [3, 1]}
    change = dict(VP.ARMS["uniform (S54)"])
    with VP.uniform_vendor(change):
        assert H.vendor_prior(meta, 2) is None and change == {}
    assert H.vendor_prior(meta, 2) is not None
    change = dict(VP.ARMS["prototypes"])
    with VP.uniform_vendor(change):
        assert H.vendor_prior(meta, 2) is not None and change == {"head": "prototypes"}
    y = np.repeat(np.arange(4), 100)
    kept = np.bincount(y[VP.long_tailed(y, np.arange(len(y)), 10.0, 0)], minlength=4)
    assert sorted(kept.tolist()) == [10, 22, 46, 100]
    for argv in (["--networks", "vgg"], ["--imbalance", "0.5"], ["--bench-cohorts", "fsdd-loso"]):
        with pytest.raises(SystemExit):
            VP.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_vendor_prior_study_reports_the_baselines_beside_its_arms(tmp_path):
    """--baselines: every user's row carries AdaBN, T3A, LAME, AdaBN+T3A and the labelled ceiling
    (accuracies, nothing pruned), and the table gives each a column; without it, none."""
    from simulations import baselines as BL
    from simulations import vendor_prior_study as VP

    rows = VP.main(["--networks", "digits", "--seeds", "0", "--users", "1", "--arms", "prototypes", "--baselines",
                    "--out", str(tmp_path / "b")])
    names = (*BL.LABEL_FREE, VP.CEILING)
    assert rows and all(0.0 <= r[n] <= 1.0 and r[f"{n} sparsity"] == 0.0 for r in rows for n in names)
    table = (tmp_path / "b" / "vendor_prior.md").read_text()
    assert all(f" {n} |" in table for n in names)
    rows = VP.main(["--networks", "digits", "--seeds", "0", "--users", "1", "--arms", "prototypes",
                    "--out", str(tmp_path / "a")])
    assert not any(n in r for r in rows for n in names)


def test_nobn_study_arms_move_check_and_weight_as_named_and_bad_input_is_refused(tmp_path):
    """S57 and S58's study: "before S57" moves no first layer and keeps the base's layer wherever
    S26 refuses the head, "S57" only the latter, "without its check" keeps a move that narrows the
    predictions, the default does neither, --evidence weights the move, each only for its arm's run
    and none passed to PruneConfig; an offset sensor gains under S57 and not before it; an unknown
    cohort, speech without --fsdd, or bad --seeds / --evidence is one line, and nothing is written."""
    import copy

    import torch

    from common.engine import heads as HD
    from common.engine import input_shift as IS
    from simulations import nobn_study as NB

    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    meta = {"first_layer_means": {"layer": "0", "mean": [[0.0, 0.0, 0.0]] * 3}}
    moved = IS.Move(torch.ones(3), before=3.0, info={}, samples=1)
    narrower = torch.tensor([[9.0, 0.0, 0.0]])
    feats, logits = torch.eye(3).repeat(4, 1), torch.tensor([[5.0, 0.0, 0.0]]).repeat(12, 1)  # all one class
    for name, applies, keeps, head_kept in (("before S57", False, False, False), ("S57", True, False, False),
                                            ("S57 without its check", True, True, False),
                                            ("S57+S58 (default)", True, False, True)):
        change = dict(NB.ARMS[name])
        with NB.no_shift(change):
            assert change == {} and IS.applies(model, meta) is applies and IS.EVIDENCE == 32
            assert IS.keep(copy.deepcopy(model), moved, narrower) is keeps
            assert HD.spreads_wider("prototypes", torch.nn.Linear(3, 3), feats, logits)[0] is head_kept
    with NB.no_shift({"evidence": 0}):
        assert IS.EVIDENCE == 0
    assert IS.EVIDENCE == 32 and IS.applies(model, meta)
    rows = NB.main(["--cohorts", "digits-nobn", "--seeds", "0", "--whole", "--sensors", "2", "--out", str(tmp_path / "r")])
    offset = [r for r in rows if r["held"] == "offset"]
    assert len(offset) == 2 and all(r["S57"] > r["before S57"] for r in offset)
    assert (tmp_path / "r" / "nobn.png").is_file()
    for argv in (["--cohorts", "digits-style"], ["--cohorts", "fsdd-cond-nobn"], ["--seeds", "a"],
                 ["--evidence", "x"]):
        with pytest.raises(SystemExit):
            NB.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_vendor_directions_study_runs_both_arms_per_device_and_refuses_bad_input(tmp_path, digits_server_base):
    """S59's study: every device runs the default with its base's record and without the vendor's
    directions; data-poor styled devices blend them; an unknown cohort, speech without --fsdd or
    bad --seeds is one line, and nothing is written."""
    import shutil

    from simulations import vendor_directions_study as VS

    (tmp_path / "r" / "bases").mkdir(parents=True)
    shutil.copy(digits_server_base, tmp_path / "r" / "bases" / "digits_s0_e0.pt")
    table = VS.main(["--cohorts", "styled", "--seeds", "0", "--per", "1", "--out", str(tmp_path / "r")])
    assert len(table) == 1 and table[0]["devices"] == 4 and table[0]["used"] >= 1
    assert "| styled s0 | 4 |" in (tmp_path / "r" / "vendor_directions.md").read_text()
    for argv in (["--cohorts", "digits"], ["--cohorts", "speech-20"], ["--seeds", "a"]):
        with pytest.raises(SystemExit):
            VS.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_input_level_study_tells_every_mis_scaled_user_and_refuses_bad_input(tmp_path, digits_server_base):
    """S60's study: the users' own levels lie within the bound every fold puts; their inputs
    mis-scaled as a units error would are told unlike the base's and pruned nothing with the check,
    and pruned without it; an unknown cohort or fsdd without --fsdd is one line, nothing written."""
    import shutil

    from simulations import input_level_study as IL

    (tmp_path / "r" / "bases").mkdir(parents=True)
    shutil.copy(digits_server_base, tmp_path / "r" / "bases" / "digits_s0_e0.pt")
    got = IL.main(["--cohorts", "digits", "--users", "2", "--out", str(tmp_path / "r")])
    assert [f["flagged"] for f in got["loco"]] == [False]
    for t in got["table"]:
        assert t["flagged"] == t["users"] == 2 and t["sparsity_with"] == 0
    assert max(t["sparsity_without"] for t in got["table"]) > 0  # x255 was pruned before S60
    assert "| digits | x255 | 2 | 2 |" in (tmp_path / "r" / "input_level.md").read_text()
    assert (tmp_path / "r" / "input_level.png").stat().st_size > 0
    for argv in (["--cohorts", "nope"], ["--cohorts", "fsdd-loso"]):
        with pytest.raises(SystemExit):
            IL.main([*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
