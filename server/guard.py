"""The server's gate: a SuperLink whose ServerApps run only if the operator signed them.

Flower's Control API has no authentication in the open-source build, so anyone with an account on
the server machine can start a run, and its ServerApp runs with the SuperLink's file access (where
it could read node keys, or a signing key kept on that account). `fineprune-superlink` is Flower's
own `flower-superlink`, except that the SuperExec it starts for ServerApps is
`fineprune-serverexec`, which launches each ServerApp through `fineprune-serverapp`: Flower's own
`flwr-serverapp` with the device's check (common/wire/appsign.py) before the FAB is installed. An
unsigned app started through the Control API never runs on the server, and so never reaches a
device either. The signing key itself belongs on another machine or account (README).

    fineprune-superlink --trusted-keys operator.pub [flower-superlink options]
"""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import first_sentence

TRUSTED_KEYS_ENV = "FINEPRUNE_SERVER_TRUSTED_KEYS"
APP_STATE_ENV = "FINEPRUNE_SERVER_APP_STATE"
DEFAULT_APP_STATE = "~/.local/state/fineprune/server-app-serials.json"
SERVERAPP_COMMAND = "fineprune-serverapp"
SERVEREXEC_COMMAND = "fineprune-serverexec"


def _trusted():
    from common.wire.appsign import SerialStore, trusted_keys_from_env

    keys = trusted_keys_from_env(TRUSTED_KEYS_ENV, SERVERAPP_COMMAND)
    return keys, SerialStore(os.path.expanduser(os.environ.get(APP_STATE_ENV) or DEFAULT_APP_STATE))


def serverapp_main() -> None:
    """`fineprune-serverapp`: flwr-serverapp with the signature check before the FAB is installed."""
    trusted, seen = _trusted()  # no keys, no app
    import importlib

    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    # (the package exports a function of the module's name: the module itself, by its full name)
    run_module = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    from common.wire.appsign import verified_install

    # Flower installs the ServerApp under the FAB's own metadata (get_fab_metadata), so no run field
    # names its path: the signature and the replay check are what stand before it
    run_module.install_from_fab = verified_install(run_module.install_from_fab, trusted, seen, SERVERAPP_COMMAND)
    flwr_serverapp()


def serverexec_main() -> None:
    """`fineprune-serverexec`: the SuperExec the SuperLink starts for ServerApps, launching each
    through fineprune-serverapp (and nothing else)."""
    _trusted()
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    for task_type in list(TASK_TYPE_TO_COMMAND):
        TASK_TYPE_TO_COMMAND[task_type] = SERVERAPP_COMMAND if task_type == TaskType.SERVER_APP else "false"
    sys.argv = ["flower-superexec", *sys.argv[1:]]
    flower_superexec()


def superlink_main(argv=None) -> None:
    """`fineprune-superlink --trusted-keys FILE [flower-superlink options]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="fineprune-superlink", description=first_sentence(__doc__),
                                epilog="Other options are flower-superlink's.")
    p.add_argument("--trusted-keys", required=True,
                   help="file of the operator's OpenSSH Ed25519 public keys: only apps they signed run here")
    p.add_argument("--app-state", default=DEFAULT_APP_STATE,
                   help=f"the newest signing run per app; older ones are refused (default {DEFAULT_APP_STATE})")
    p.add_argument("--isolation", default="subprocess", choices=("subprocess",),
                   help="only subprocess isolation (the SuperLink starts the guarded executor) is offered")
    ours, rest = p.parse_known_args(argv)
    from common.wire.appsign import hand_down_trust

    hand_down_trust(p, ours.trusted_keys, ours.app_state, TRUSTED_KEYS_ENV, APP_STATE_ENV)
    import importlib

    # the package exports a function of the module's name: the module itself, by its full name
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")

    original = fs._get_superexec_command

    def guarded_command(*args, **kwargs):
        cmd = original(*args, **kwargs)
        return [SERVEREXEC_COMMAND, *cmd[1:]]

    fs._get_superexec_command = guarded_command
    sys.argv = ["flower-superlink", *rest]
    fs.flower_superlink()


if __name__ == "__main__":
    superlink_main()
