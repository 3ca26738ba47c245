"""A federation of thousands of simulated devices: each client builds only its own user, every
client has data (or the run is refused before it starts), the analysis and its heatmap stay the
same size whatever the number of clients, and simulated devices share one copy of the base.
(The measured 10-5,000 client runs are `fineprune bench-scale`, not tests.)"""
import dataclasses

import numpy as np
import pytest
import torch

from common.data import partition as PT
from common.data import readers as D
from common.data.protocol import check_partition, simulated_user, task_dataset, vendor_and_pool
from common.wire.federation import merged_config


def test_a_client_builds_only_its_own_user_and_it_is_the_same_user_as_before(monkeypatch):
    cfg = merged_config({}, {})
    ds = task_dataset("digits", "")
    sub = ds.subset(vendor_and_pool("digits", ds, 0)[1])
    groups = PT.partition_class_subsets(sub.y.numpy(), 40, (2, 3), 0)
    expected = {pid: PT.make_users(sub, groups, 0.3, pid)[pid] for pid in (0, 17, 39)}

    def build_all(*a, **k):
        raise AssertionError("a client built every user")
    monkeypatch.setattr(PT, "make_users", build_all)
    for pid, want in expected.items():
        got = simulated_user(cfg, pid, 40)
        assert got.user_id == want.user_id
        assert torch.equal(got.unlabeled, want.unlabeled) and torch.equal(got.heldout_y, want.heldout_y)


def test_sampled_users_serve_5000_clients_each_with_its_own_few_classes():
    cfg = merged_config({}, {"num-clients": 5000, "partitioning": "sampled", "client-samples": 30})
    check_partition(cfg)
    users = [simulated_user(cfg, pid, 5000) for pid in range(0, 5000, 97)]
    for u in users:
        assert len(u.unlabeled) + len(u.heldout_y) == 30 and len(u.heldout_y) >= 1
        assert 1 <= len(u.heldout_y.unique()) <= 3
    # a user does not depend on how many others there are (no O(N) work, no reshuffle)
    assert torch.equal(simulated_user(cfg, 7, 5000).unlabeled, simulated_user(cfg, 7, 10).unlabeled)
    assert not torch.equal(users[0].unlabeled, users[1].unlabeled)


@pytest.mark.badinput
def test_more_disjoint_clients_than_the_data_can_serve_is_refused_with_the_way_out():
    with pytest.raises(D.DataError, match="would get fewer than 2.*partitioning='sampled'"):
        check_partition(merged_config({}, {"num-clients": 1000}))


def _sketch_summaries(n: int, kinds: int = 2):
    from common.model.architectures import build_model
    from common.model.checkpoint import fingerprint
    from common.model.mask import Mask, prunable_layers
    from common.wire.federation import model_bytes
    from common.wire.summary import build_summary, usage_histograms

    m = build_model("smallcnn")
    shapes = {k: tuple(v.weight.shape) for k, v in prunable_layers(m).items()}
    hist = usage_histograms({k: v.weight.abs() for k, v in prunable_layers(m).items()})
    protos = [build_summary(Mask({k: torch.rand(s, generator=torch.Generator().manual_seed(i)) > 0.7
                                  for k, s in shapes.items()}), hist, "sketch", fingerprint(m), model_bytes(m))
              for i in range(kinds)]
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        p = protos[i % kinds]
        sk = [np.where(rng.random(len(x)) < 0.1, rng.integers(0, 4, len(x)), x).astype(np.uint8) for x in p.sketch]
        out[f"c{i:04d}"] = dataclasses.replace(p, sketch=sk)
    return out, shapes


def test_the_similarity_view_is_bounded_ordered_by_cluster_and_made_of_block_means(monkeypatch):
    from server import analysis

    summ, shapes = _sketch_summaries(8)
    monkeypatch.setattr(analysis, "VIEW_MAX", 4)
    monkeypatch.setattr(analysis, "MATRIX_MAX", 4)
    a = analysis.analyze(summ, shapes, 0.5, 0.5)
    ids, sim, _, _ = analysis.similarity(summ)
    assert a["similarity"] is None  # more clients than MATRIX_MAX: no full matrix in the report
    view = np.array(a["similarity_view"]["matrix"])
    assert view.shape == (4, 4) and a["similarity_view"]["clients_per_cell"] == 2
    order = [ids.index(c) for g in a["clusters"] for c in g]
    assert [len(g) for g in a["clusters"]] == [4, 4]  # the two kinds of users
    s = sim[np.ix_(order, order)]
    assert np.allclose(view, s.reshape(4, 2, 4, 2).mean(axis=(1, 3)), atol=1e-3)
    assert view[0, 0] > view[0, 3] and view[3, 3] > view[3, 0]  # clusters on the diagonal


def test_analysis_and_heatmap_of_2000_clients_stay_bounded(tmp_path):
    import json

    from server.analysis import VIEW_MAX, analyze
    from server.report import plot_similarity

    summ, shapes = _sketch_summaries(2000, kinds=4)
    a = analyze(summ, shapes, 0.5, 0.5)
    assert len(a["similarity_view"]["matrix"]) == VIEW_MAX and a["similarity"] is None
    assert len(json.dumps(a)) < 1_000_000
    plot_similarity(a, tmp_path / "s.png")
    from PIL import Image

    w, h = Image.open(tmp_path / "s.png").size
    assert w <= 1300 and h <= 1300  # the same size at 2,000 clients as at 200


def test_simulated_devices_share_one_copy_of_the_base(tmp_path, digits_base):
    from client.device import Device

    meta = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits",
            "classes": [str(i) for i in range(10)], "features": {"kind": "image", "image_size": 8, "channels": 1}}
    store = tmp_path / "bases"
    devices = [Device(tmp_path / f"node-{i}", store) for i in range(3)]
    fps = {d.store_base(digits_base, meta) for d in devices}
    assert len(fps) == 1 and [p.name for p in store.iterdir()] == [f"base-{fps.pop()}.pt"]
    assert all(not (d.root / "base.pt").exists() for d in devices)
    model, _ = devices[2].load_base(devices[0].store_base(digits_base, meta))
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    real = Device(tmp_path / "phone")
    real.store_base(digits_base, meta)
    assert (tmp_path / "phone" / "base.pt").exists()  # a real device keeps its own


def test_bench_scale_measures_memory_and_writes_its_tables(tmp_path):
    """The scaling benchmark's own parts: the memory sampler sees this process, and the results
    come out as CSV, JSON, Markdown and a PNG (the runs themselves are `fineprune bench-scale`)."""
    import json
    import os
    import time

    from simulations.scale import PeakSampler, _pss_mb, federation_pss_mb, write_results

    assert federation_pss_mb() > 10
    mine = lambda: _pss_mb(str(os.getpid()))  # this process alone: other tests' servers come and go
    before = mine()
    with PeakSampler(every=0.05, measure=mine) as peak:
        import mmap

        block = mmap.mmap(-1, 80 << 20)  # 80 MB of fresh pages (the heap may hold freed, resident ones)
        for off in range(0, 80 << 20, 4096):
            block[off] = 1  # touched, so resident
        time.sleep(0.4)
        block.close()
    assert peak.peak > before + 60
    rows = [{"clients": n, "replied": n, "failed": 0, "rejected": 0, "wall_s": 10.0 + n / 100, "peak_pss_mb": 2000,
             "cpu_s_per_client": 0.1, "engine_s_per_client": 0.03, "overhead_s_per_client": 0.07,
             "analysis_clusters": 3, "device_storage_mb": 1.0, "report_json_kb": 10.0, "similarity_png_kb": 50.0,
             "mean_sparsity": 0.7, "rounds": 1, "prior_voters": None} for n in (10, 100)]
    write_results(rows, tmp_path, {"workers": 2})
    assert json.loads((tmp_path / "scale.json").read_text())["rows"][1]["clients"] == 100
    assert (tmp_path / "scale.md").read_text().count("\n") == 4 and (tmp_path / "scale.png").stat().st_size > 5000
    assert (tmp_path / "scale.csv").read_text().splitlines()[0].startswith("clients,replied")
    assert "| clients | rounds |" in (tmp_path / "scale.md").read_text()
