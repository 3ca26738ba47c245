"""The device's gate: only apps signed by the operator run here (common/appsign.py says why Flower's
own verification does not cover locally built apps).

Two commands, used with the SuperNode in `--isolation process` mode:

    flower-supernode ... --isolation process --clientappio-api-address 127.0.0.1:9094
    fineprune-superexec --trusted-keys operator.pub --insecure --runtime-api-address 127.0.0.1:9094

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

TRUSTED_KEYS_ENV = "FINEPRUNE_TRUSTED_KEYS"
GUARDED_COMMAND = "fineprune-clientapp"


def _trusted_from_env():
    from common.appsign import load_public_keys

    path = os.environ.get(TRUSTED_KEYS_ENV)
    if not path:
        raise SystemExit(f"{GUARDED_COMMAND}: error: {TRUSTED_KEYS_ENV} is not set; refusing to run any app")
    try:
        return load_public_keys(path)
    except ValueError as exc:
        raise SystemExit(f"{GUARDED_COMMAND}: error: {exc}") from None


def guarded_install(install, trusted):
    """Flower's install_from_fab, preceded by the signature check."""
    from common.appsign import AppSignatureError, verify_fab

    def install_verified(fab_file, *args, **kwargs):
        data = fab_file if isinstance(fab_file, bytes) else open(fab_file, "rb").read()
        try:
            kid = verify_fab(data, trusted)
        except AppSignatureError as exc:
            print(f"{GUARDED_COMMAND}: {exc}; nothing from it was installed or run", file=sys.stderr, flush=True)
            raise
        print(f"{GUARDED_COMMAND}: app signed by {kid}, running it", file=sys.stderr, flush=True)
        return install(fab_file, *args, **kwargs)
    return install_verified


def guarded_pull(pull, trusted):
    """Flower's pull_task_input, followed by the signature check and the run's binding to it: the
    run's fab_id, fab_version and FAB hash, from which Flower builds the directory it installs into
    and imports from, must be the signed FAB's own (common.appsign.check_run_binding)."""
    from common.appsign import AppSignatureError, check_run_binding, verify_fab

    def pull_verified(*args, **kwargs):
        message, context, run, fab = pull(*args, **kwargs)
        try:
            verify_fab(fab.content, trusted)
            check_run_binding(fab.content, fab.hash_str, run.fab_id, run.fab_version)
        except AppSignatureError as exc:
            print(f"{GUARDED_COMMAND}: {exc}; nothing from it was installed or run", file=sys.stderr, flush=True)
            raise
        return message, context, run, fab
    return pull_verified


def clientapp_main() -> None:
    """`fineprune-clientapp`: flwr-clientapp with the signature check."""
    trusted = _trusted_from_env()  # no keys, no app: checked before anything is pulled
    import flwr.supernode.runtime.run_clientapp as run_module
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    run_module.pull_task_input = guarded_pull(run_module.pull_task_input, trusted)
    run_module.install_from_fab = guarded_install(run_module.install_from_fab, trusted)
    flwr_clientapp()


def superexec_main(argv=None) -> None:
    """`fineprune-superexec --trusted-keys FILE [flower-superexec options]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="fineprune-superexec", description=__doc__.splitlines()[0],
                                epilog="Other options are flower-superexec's.")
    p.add_argument("--trusted-keys", required=True,
                   help="file of the operator's OpenSSH Ed25519 public keys (one per line)")
    ours, rest = p.parse_known_args(argv)
    if any(a == "--executor" or a.startswith("--executor=") for a in rest):
        p.error("--executor: only Flower's local subprocess executor is guarded")
    from common.appsign import load_public_keys

    try:
        load_public_keys(ours.trusted_keys)  # fail now, not at the first run
    except ValueError as exc:
        p.exit(2, f"fineprune-superexec: error: {exc}\n")
    os.environ[TRUSTED_KEYS_ENV] = os.path.abspath(ours.trusted_keys)  # inherited by each ClientApp
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
