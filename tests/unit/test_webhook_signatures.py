"""Webhook signatures checked against the Standard Webhooks reference, not against our own
code: the spec's published example (a known answer) and the `standardwebhooks` package's
verifier on what our notifier signs."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.webhooks import sign

# The example of the Standard Webhooks specification (and its reference libraries' tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_MESSAGE_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_our_signature_of_the_spec_example_is_the_published_one():
    assert sign(SPEC_SECRET, SPEC_MESSAGE_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_the_reference_library_signs_the_spec_example_the_same_way():
    at = dt.datetime.fromtimestamp(SPEC_TIMESTAMP, tz=dt.UTC)

    assert Webhook(SPEC_SECRET).sign(SPEC_MESSAGE_ID, at, SPEC_BODY.decode()) == SPEC_SIGNATURE


def test_the_reference_verifier_accepts_what_we_sign_and_refuses_a_changed_body():
    secret = "whsec_" + "c2VjcmV0LWZvci10aGUtd2ViaG9vay10ZXN0"
    body = json.dumps({"type": "task.completed", "data": {"taskId": "task_1"}}).encode()
    timestamp = int(time.time())
    headers = {
        "webhook-id": "task_1.completed",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, "task_1.completed", timestamp, body),
    }

    assert Webhook(secret).verify(body, headers)["data"]["taskId"] == "task_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"task_1", b"task_2"), headers)
