"""One round's envelope between server and device, as named fields: what the server adds to the
run config it sends, the records and keys of a device's reply, and the failure kinds a device
reports as an error code (never parsed back out of error text)."""
from __future__ import annotations

from flwr.common.constant import ErrorCode

# ---- server -> device: beside the CLIENT settings of the table, each round's message carries
CONFIG = "config"  # the record holding the run's CLIENT settings and the ROUND_KEYS
BASE_FINGERPRINT, OUT_DIR, ROUND = "base-fingerprint", "out-dir", "round"
ROUND_KEYS = (BASE_FINGERPRINT, OUT_DIR, ROUND)
BASE, BASE_META = "base", "base-meta"   # array record and its metadata: only when the node lacks the base
PRIOR, PRIOR_META = "prior", "prior-meta"  # the federation's prior (common/wire/prior.py): rounds after the first
CLASSES, CLASSES_META = "class-prior", "class-prior-meta"  # its class directions (the same module)

# ---- device -> server: a reply holds exactly these records
SUMMARY, INFO, METRICS = "summary", "info", "metrics"
REPLY_RECORDS = (SUMMARY, INFO, METRICS)
SUMMARY_DATA, SUMMARY_LEVEL = "data", "level"      # in SUMMARY
CLIENT, STOP_REASON = "client", "stop_reason"      # in INFO
PRIVATE_STOP_REASON = "private"                    # what a private device says instead of its stop reason

# ---- failures: a device that cannot do the round replies with an error whose code names the kind
FAILURE_CODES = {"timeout": 1001, "client-error": 1002}
# the SuperLink's own error replies, for a node that stopped answering or a message that expired
LINK_KINDS = {ErrorCode.NODE_UNAVAILABLE: "node-unavailable", ErrorCode.MESSAGE_UNAVAILABLE: "expired",
              ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "expired"}
_KIND_OF_CODE = {**LINK_KINDS, **{code: kind for kind, code in FAILURE_CODES.items()}}


def failure_code(kind: str) -> int:
    return FAILURE_CODES[kind]


def failure_kind(code) -> str:
    """The counted kind of an error reply, from its code: a device's own kinds, the SuperLink's
    (node-unavailable, expired), and client-error for anything else (an unknown code included)."""
    return _KIND_OF_CODE.get(code, "client-error") if isinstance(code, int) else "client-error"
