"""check_input_url: the create-time check refuses unsafe URLs without any network use."""

from __future__ import annotations

import base64

import pytest

from shared.errors import ValidationFailed
from shared.safe_fetch import MAX_URL_LENGTH, check_input_url
from tests.security.support import data_url, load_corpus

CORPUS = load_corpus()
FIELD = "task_data.source_url"


@pytest.mark.parametrize("entry", CORPUS["refused_urls"], ids=lambda entry: entry["why"])
def test_refuses_every_corpus_url(entry: dict[str, str]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_input_url(entry["url"], field=FIELD)

    assert caught.value.code == "unsafe_url"
    assert caught.value.field == FIELD
    assert caught.value.http_status == 400
    assert caught.value.message.startswith(f"{FIELD}: ")


@pytest.mark.parametrize("entry", CORPUS["accepted_urls"], ids=lambda entry: entry["why"])
def test_accepts_public_urls(entry: dict[str, str]) -> None:
    check_input_url(entry["url"], field=FIELD)


@pytest.mark.parametrize("entry", CORPUS["refused_by_dns"], ids=lambda entry: entry["why"])
def test_names_that_resolve_privately_pass_the_static_check(entry: dict[str, str]) -> None:
    """Only the fetcher's DNS check can catch these; creating the task must not resolve names."""
    check_input_url(entry["url"], field=FIELD)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/face.jpg",
        "http://localhost:8080/face.jpg",
        "http://[::1]:8080/",
        "http://127.1/",
    ],
)
def test_loopback_is_allowed_only_when_asked(url: str) -> None:
    check_input_url(url, field=FIELD, allow_loopback=True)
    with pytest.raises(ValidationFailed):
        check_input_url(url, field=FIELD)


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/", "http://169.254.169.254/", "http://metadata.google.internal/", "http://0.0.0.0/"],
)
def test_allow_loopback_does_not_open_other_private_addresses(url: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_input_url(url, field=FIELD, allow_loopback=True)
    assert caught.value.code == "unsafe_url"


@pytest.mark.parametrize(
    "url",
    ["https://example.com/\ud800.jpg", "https://example.com/a.jpg?v=\udfff", "https://example.com/#\ud83d"],
)
def test_a_url_holding_a_lone_surrogate_is_refused_not_a_crash(url: str) -> None:
    """JSON's \\ud800 escape decodes to a lone surrogate: the check raised UnicodeEncodeError
    where its contract is ValidationFailed naming the field (the API's pydantic models refuse
    such strings first today; the fetcher's parse shares this check)."""
    with pytest.raises(ValidationFailed) as caught:
        check_input_url(url, field=FIELD)
    assert caught.value.code == "unsafe_url"
    assert "surrogate" in caught.value.message


def test_refuses_over_long_url() -> None:
    url = "https://example.com/" + "a" * MAX_URL_LENGTH

    with pytest.raises(ValidationFailed, match="longer than"):
        check_input_url(url, field=FIELD)


def test_accepts_a_base64_image_data_url(png_bytes: bytes) -> None:
    check_input_url(data_url("image/png", png_bytes), field=FIELD)


def test_accepts_a_base64_video_data_url(mp4_bytes: bytes) -> None:
    check_input_url(data_url("video/mp4", mp4_bytes), field=FIELD)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:text/html;base64,PGgxPmhpPC9oMT4=", "unsupported_media"),
        ("data:image/svg+xml;base64,PHN2Zy8+", "unsupported_media"),
        ("data:image/png;base64,PGh0bWw+PC9odG1sPg==", "unsupported_media"),  # says PNG, holds HTML
        ("data:image/png,rawbytes", "unsafe_url"),  # not base64
        ("data:image/png;base64,not*base64!", "unsafe_url"),
        ("data:image/png;base64,abc", "unsafe_url"),  # bad padding
        ("data:image/png;base64,", "unsafe_url"),
        ("data:;base64,iVBORw0KGgo=", "unsafe_url"),  # no media type
        ("data:image/png;base64,iVBO Rw0KGgo=", "unsafe_url"),
    ],
)
def test_refuses_bad_data_urls(url: str, code: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_input_url(url, field=FIELD)
    assert caught.value.code == code


def test_refuses_an_oversized_data_url_before_decoding(png_bytes: bytes) -> None:
    url = data_url("image/png", png_bytes)

    with pytest.raises(ValidationFailed) as caught:
        check_input_url(url, field=FIELD, max_bytes=len(png_bytes) - 1)
    assert caught.value.code == "input_too_large"

    check_input_url(url, field=FIELD, max_bytes=len(png_bytes))


def test_data_url_scheme_and_base64_flag_are_case_insensitive(png_bytes: bytes) -> None:
    payload = base64.b64encode(png_bytes).decode("ascii")

    check_input_url(f"DATA:IMAGE/PNG;BASE64,{payload}", field=FIELD)
