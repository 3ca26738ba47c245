"""The round's envelope (common/wire/envelope.py): a device's failure reaches the server as a
kind in the error code, never parsed out of text; the SuperLink's own errors keep theirs; a code
the server does not know counts as a client error."""
import pytest

from common.wire import envelope as E


@pytest.mark.parametrize("kind", list(E.FAILURE_CODES))
def test_a_devices_failure_kind_travels_as_its_code(kind):
    assert E.failure_kind(E.failure_code(kind)) == kind


def test_the_superlinks_errors_and_unknown_codes_are_counted_by_kind():
    from flwr.common.constant import ErrorCode

    assert E.failure_kind(ErrorCode.NODE_UNAVAILABLE) == "node-unavailable"
    assert E.failure_kind(ErrorCode.REPLY_MESSAGE_UNAVAILABLE) == "expired"
    assert E.failure_kind(ErrorCode.CLIENT_APP_RAISED_EXCEPTION) == "client-error"
    assert E.failure_kind(987654) == "client-error" and E.failure_kind(None) == "client-error"


def test_a_round_that_times_out_on_the_device_says_timeout(identity):
    from flwr.app import Message, RecordDict

    from client.client_app import RoundTimeout, error_reply

    instr = Message(RecordDict(), dst_node_id=1, message_type="train")
    instr.metadata.__dict__["_message_id"] = instr.object_id

    def stuck():
        raise RoundTimeout("no reply within the round's 5 s (round-timeout); work abandoned")

    reply = error_reply(stuck, instr, private=False)
    assert reply.has_error() and E.failure_kind(reply.error.code) == "timeout"
    assert "round-timeout" in reply.error.reason
