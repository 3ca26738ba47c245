"""One table of settings feeds every surface: the command line, the federation and the engine
agree on every default, and bad values or combinations are refused with a clear error."""
from pathlib import Path

import numpy as np
import pytest
import torch

from common import settings as ST
from common.cli import build_parser, main
from common.model.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from common.settings import PruneConfig
from common.wire.federation import CLIENT_KEYS, DEFAULTS, merged_config, prune_settings


def test_cli_federation_and_engine_share_every_default():
    argv = ["personalize", "--model", "m", "--data", "d", "--out", "o"]
    args = build_parser(argv).parse_args(argv)
    cli = PruneConfig.from_settings(ST.given_options(args, ST.PRUNE))
    assert cli == prune_settings(DEFAULTS) == prune_settings(merged_config({})) == PruneConfig()
    assert ST.given_options(args, ST.CLI)["device"] == DEFAULTS["device"]
    # every engine setting reaches the devices
    assert set(ST.names(ST.PRUNE)) <= set(CLIENT_KEYS)


def test_cli_and_clientapp_give_the_same_personalized_model(tmp_path, digits, digits_split, digits_base):
    from client.device import Device

    meta = {"arch": "smallcnn", "arch_kwargs": {"num_classes": 10}, "task": "digits", "classes": digits.classes,
            "features": {"kind": "image", "image_size": 8, "channels": 1}}
    save_checkpoint(tmp_path / "base.pt", digits_base, meta)
    x = digits.x[digits_split[1][:120]]
    np.save(tmp_path / "x.npy", x.numpy())
    assert main(["personalize", "--model", str(tmp_path / "base.pt"), "--data", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "cli.pt")]) == 0
    dev = Device(tmp_path / "device")
    mask, _ = dev.personalize(digits_base, meta, fingerprint(digits_base), x, merged_config({}))
    cli_model, _, cli_mask = load_checkpoint(tmp_path / "cli.pt")
    dev_model, _, _ = load_checkpoint(dev.personal_path)
    assert cli_mask == mask
    with torch.no_grad():
        assert torch.equal(cli_model(x), dev_model(x))


def test_auto_is_the_spelling_of_unset_everywhere():
    assert DEFAULTS["target-sparsity"] == "auto" and PruneConfig().target_sparsity is None
    assert merged_config({}, {"target-sparsity": "0.7"})["target-sparsity"] == 0.7
    assert prune_settings(merged_config({}, {"target-sparsity": 0.7})).target_sparsity == 0.7
    assert prune_settings(merged_config({}, {"target-sparsity": "auto"})).target_sparsity is None


def test_a_settings_former_spelling_is_still_read():
    """confirm was a switch before it had auto (S35): a run config or script that says true or
    false keeps meaning on or off, and the engine refuses a Python bool with one line."""
    assert prune_settings(merged_config({}, {"confirm": True})).confirm == "on"
    assert prune_settings(merged_config({}, {"confirm": "false"})).confirm == "off"
    assert PruneConfig().confirm == "auto"
    with pytest.raises(ValueError, match="unknown confirm 'True'"):
        PruneConfig(confirm=True).validate()


@pytest.mark.badinput
@pytest.mark.parametrize("values, msg", [
    ({"tolerance": "nan"}, "tolerance must be a finite number"),
    ({"tolerance": 2.0}, "tolerance must be <= 1.0"),
    ({"step": 0}, "step must be >= 0.001"),
    ({"scoring": "vibes"}, "unknown scoring 'vibes'"),
    ({"confirm": "maybe"}, "unknown confirm 'maybe'"),
    ({"rescore": True}, "it needs search 'linear'"),
    ({"base-stats": True, "recalibrate-bn": False}, "needs recalibrate_bn"),
    ({"num-clients": 0}, "num clients must be >= 1"),
    ({"classes-min": 4, "classes-max": 3}, "classes-min (4) is above classes-max (3)"),
    ({"recalibrate-bn": "perhaps"}, "recalibrate bn must be bool"),
    ({"seed": 1.5}, "seed must be int"),
    ({"not-a-key": 1}, "unknown run-config key 'not-a-key'"),
])
def test_bad_settings_are_refused_with_a_clear_error(values, msg):
    with pytest.raises(ValueError) as err:
        merged_config({}, values)
    assert msg in str(err.value)


def test_pyprojects_run_config_is_the_tables_generated_block_exactly():
    """Flower reads a run's defaults from [tool.flwr.app.config]; that block is what
    `python -m common.settings --write pyproject.toml` writes from the table, line for line."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert ST.pyproject_block() in text
    assert ST.pyproject_block().count("\n") == len(ST.run_config_defaults()) + 2
