"""The device's gate: only apps signed by the operator run here (common/wire/appsign.py says why Flower's
own verification does not cover locally built apps).

Two commands, used with the SuperNode in `--isolation process` mode and one secret file (32 random
bytes, mode 0600) that both hold, so that only this executor takes the device's tasks:

    flower-supernode ... --isolation process --clientappio-api-address 127.0.0.1:9094 \
        --superexec-auth-secret-file exec.secret
    fineprune-superexec --trusted-keys operator.pub --superexec-auth-secret-file exec.secret \
        --insecure --runtime-api-address 127.0.0.1:9094

`fineprune-superexec` is Flower's own SuperExec, except that it launches each ClientApp through
`fineprune-clientapp`, which is Flower's own `flwr-clientapp` with checks added before the FAB is
installed: its signature, and that the run's app id, version and hash (from which Flower builds the
directory it installs into and imports from) are the signed FAB's own. An unsigned or tampered app is never unpacked or imported; the SuperLink
gets Flower's usual error reply for a ClientApp that failed, and the device logs one line saying
why. The SuperExec talks to the SuperNode on loopback only.
"""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import first_sentence

TRUSTED_KEYS_ENV = "FINEPRUNE_TRUSTED_KEYS"
APP_STATE_ENV = "FINEPRUNE_APP_STATE"  # the newest signing run per app (replays of older ones are refused)
DEFAULT_APP_STATE = "~/.local/state/fineprune/app-serials.json"
GUARDED_COMMAND = "fineprune-clientapp"


def _trusted_from_env():
    from common.wire.appsign import trusted_keys_from_env

    return trusted_keys_from_env(TRUSTED_KEYS_ENV, GUARDED_COMMAND)


def _serials():
    from common.wire.appsign import SerialStore

    return SerialStore(os.path.expanduser(os.environ.get(APP_STATE_ENV) or DEFAULT_APP_STATE))


def guarded(pull, install, trusted, seen=None):
    """Flower's pull_task_input and install_from_fab, with the checks between them: before the FAB
    is installed, its signature, that the run's app id, version and FAB hash (from which Flower
    builds the directory it installs into and imports from) are the signed FAB's own
    (common.wire.appsign.check_run_binding), and that it is no older signing of an app this device
    already ran (`seen`, a SerialStore). Refused at install, where Flower still answers the server
    with its usual error reply (a failure inside the pull leaves it no message to answer)."""
    from common.wire.appsign import AppSignatureError, check_run_binding, verified_install

    pulled = {}

    def pull_remembered(*args, **kwargs):
        message, context, run, fab = pull(*args, **kwargs)
        pulled.update(run=run, hash=fab.hash_str)
        return message, context, run, fab

    def binding(data: bytes) -> None:
        if "run" not in pulled:
            raise AppSignatureError("run-mismatch", "no run came with this app")
        check_run_binding(data, pulled["hash"], pulled["run"].fab_id, pulled["run"].fab_version)

    return pull_remembered, verified_install(install, trusted, seen if seen is not None else _serials(),
                                             GUARDED_COMMAND, binding)


def clientapp_main() -> None:
    """`fineprune-clientapp`: flwr-clientapp with the signature check."""
    trusted = _trusted_from_env()  # no keys, no app: checked before anything is pulled
    import flwr.supernode.runtime.run_clientapp as run_module
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    run_module.pull_task_input, run_module.install_from_fab = guarded(
        run_module.pull_task_input, run_module.install_from_fab, trusted)
    flwr_clientapp()


def superexec_main(argv=None) -> None:
    """`fineprune-superexec --trusted-keys FILE [flower-superexec options]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="fineprune-superexec", description=first_sentence(__doc__),
                                epilog="Other options are flower-superexec's.")
    p.add_argument("--trusted-keys", required=True,
                   help="file of the operator's OpenSSH Ed25519 public keys (one per line)")
    p.add_argument("--app-state", default=DEFAULT_APP_STATE,
                   help="file where the device keeps the newest signing it ran per app; an older signed "
                        f"version of an app is then refused (default {DEFAULT_APP_STATE})")
    p.add_argument("--superexec-auth-secret-file", required=True,
                   help="the secret the SuperNode was started with (flower-supernode "
                        "--superexec-auth-secret-file): only an executor holding it takes the device's tasks, "
                        "not any local process that reaches the SuperNode's runtime API; the file must be "
                        "readable by its owner only")
    ours, rest = p.parse_known_args(argv)
    if any(a == "--executor" or a.startswith("--executor=") for a in rest):
        p.error("--executor: only Flower's local subprocess executor is guarded")
    secret = ours.superexec_auth_secret_file
    try:
        st = os.stat(secret)
    except OSError as exc:
        p.exit(2, f"fineprune-superexec: error: --superexec-auth-secret-file {secret}: {exc.strerror}\n")
    if st.st_mode & 0o077 or st.st_size < 16:
        p.exit(2, f"fineprune-superexec: error: --superexec-auth-secret-file {secret} must hold at least 16 "
                  "random bytes, readable by its owner only (chmod 600)\n")
    rest = [*rest, "--superexec-auth-secret-file", secret]
    from common.wire.appsign import hand_down_trust

    hand_down_trust(p, ours.trusted_keys, ours.app_state, TRUSTED_KEYS_ENV, APP_STATE_ENV)  # to each ClientApp
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    # Flower's executors look the command up in this table at launch: every ClientApp goes through
    # the guard. Any other task type has no business on a device.
    for task_type in list(TASK_TYPE_TO_COMMAND):
        TASK_TYPE_TO_COMMAND[task_type] = GUARDED_COMMAND if task_type == TaskType.CLIENT_APP else "false"
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    superexec_main()
