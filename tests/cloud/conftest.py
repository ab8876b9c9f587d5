"""Fixtures of the OIDC tests: a locally generated key standing in for Google's, and its
certificate served on 127.0.0.1 the way Google publishes its certificates."""

from __future__ import annotations

import pytest

from tests.cloud.test_oidc import KEY_ID, _key_and_certificate, serving_certs


@pytest.fixture(scope="module")
def google_key():
    return _key_and_certificate("google-test-endpoint")


@pytest.fixture(scope="module")
def certs_url(google_key):
    with serving_certs({KEY_ID: google_key[1]}) as url:
        yield url
