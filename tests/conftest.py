import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.data import partition as PT
from common.data import readers as D
from common.engine.adapt import vendor_record
from common.model.architectures import build_model
from common.model.train import train_supervised

FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd"


@pytest.fixture(scope="session")
def digits():
    return D.load_digits()


@pytest.fixture(scope="session")
def digits_split(digits):
    vend, pool = PT.vendor_user_split(len(digits), 0.5, 0)
    return vend, pool


@pytest.fixture(scope="session")
def _digits_base(digits, digits_split):
    torch.manual_seed(0)
    m = build_model("smallcnn", num_classes=10)
    vend, _ = digits_split
    train_supervised(m, digits.x[vend], digits.y[vend], epochs=15, lr=3e-3)
    return m


@pytest.fixture
def digits_base(_digits_base):
    """A trained digits model; each test gets its own copy to prune."""
    return copy.deepcopy(_digits_base)


@pytest.fixture(scope="session")
def digits_cli_base(tmp_path_factory):
    """`fineprune pretrain --task digits --epochs 8`, run once per test run for every file that
    starts from a vendor's checkpoint on disk (read-only: copy it to change it)."""
    from common.cli import main

    path = tmp_path_factory.mktemp("cli-base") / "base.pt"
    assert main(["pretrain", "--task", "digits", "--out", str(path), "--epochs", "8"]) == 0
    path.chmod(0o444)
    return path


@pytest.fixture(scope="session")
def digits_server_base(tmp_path_factory):
    """The base a digits ServerApp pretrains with the default settings, trained once per test run;
    simulations pass it as base-checkpoint (one keeps pretraining its own)."""
    from common.wire.federation import merged_config
    from server.server_app import base_model

    out = tmp_path_factory.mktemp("server-base")
    base_model(merged_config({}, {"out-dir": str(out)}), out)
    return out / "base.pt"


@pytest.fixture(scope="session")
def fsdd_dir():
    if not (FSDD / "recordings").is_dir():
        pytest.skip(f"FSDD not found at {FSDD} (expected ../shared/data/fsdd beside the repository)")
    return FSDD


@pytest.fixture(scope="session")
def fsdd_seen_base(tmp_path_factory, fsdd_dir):
    """The KWS network trained (8 epochs, about a minute) on the seen speakers' takes, with the
    vendor record: (base, metadata, the dataset). Built once for every speech test that needs it."""
    from common.data.protocol import seen_speaker_split
    from common.model.checkpoint import load_checkpoint
    from server.pretrain import pretrain

    ds = D.load_fsdd(fsdd_dir)
    path = tmp_path_factory.mktemp("kws") / "kws.pt"
    pretrain("fsdd", path, ds=ds, epochs=8, seed=0, indices=seen_speaker_split(ds))
    base, meta, _ = load_checkpoint(path)
    return base, meta, ds


@pytest.fixture
def identity():
    """Flower messages need a task identity; the strategy tests make them outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id = TaskIdentity._task_id = TaskIdentity._node_id = None


class FakeGrid:
    """The strategy asks a grid only which nodes are connected."""

    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


@pytest.fixture(scope="session")
def gaussian_nobn():
    """Ten Gaussian classes in 16 dimensions and an MLP without BatchNorm trained on them (seconds)."""
    from tests.test_safe_default import D as DIM
    from tests.test_safe_default import K, gaussian_classes

    x, y, sample = gaussian_classes()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(DIM, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, K))
    train_supervised(base, x, y, epochs=15, lr=3e-3, batch_size=128)
    return base.eval(), vendor_record(base, x, y), sample


@pytest.fixture(scope="session")
def digits_nobn(digits, digits_split):
    """The digits CNN without BatchNorm, trained on the vendor's half, with its record."""
    vend, _ = digits_split
    torch.manual_seed(0)
    m = build_model("smallcnn", num_classes=10, batchnorm=False)
    train_supervised(m, digits.x[vend], digits.y[vend], epochs=15, lr=3e-3)
    return m.eval(), vendor_record(m, digits.x[vend], digits.y[vend])
