"""Endpoints that can never work are refused at construction (docs/design.md, "Endpoint").

check_endpoint names the URL and where it came from; no UnicodeError ever
reaches a send.
"""

from __future__ import annotations

from typing import Any

import pytest

from klime._transport import HttpTransport, check_endpoint


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://i.klime.com", "https://i.klime.com"),
        ("https://i.klime.com/", "https://i.klime.com"),
        ("  http://localhost:8080/ingest/ ", "http://localhost:8080/ingest"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("https://bücher.example", "https://bücher.example"),  # IDNA-encodable
        ("HTTPS://I.KLIME.COM", "HTTPS://I.KLIME.COM"),
        ("http://i.klime.example./", "http://i.klime.example."),
    ],
)
def test_usable_endpoints_are_normalised(url: str, expected: str) -> None:
    assert check_endpoint(url, "endpoint") == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://i.klime.com", "http"),
        ("i.klime.com", "http"),
        ("", "http"),
        ("https://", "host"),
        ("http://:8080/x", "host"),
        ("https://i..klime.example", "cannot be encoded"),
        ("https://" + "a" * 64 + ".klime.example", "cannot be encoded"),
        ("https://i.klime.com/ingést", "non-ASCII"),
        ("https://i.klime.com/a b", "spaces"),
        ("https://i.klime.com:99999", "not a valid URL"),
        ("https://i.klime.com:port", "not a valid URL"),
    ],
)
@pytest.mark.parametrize("source", ["endpoint", "KLIME_ENDPOINT"])
def test_endpoints_that_can_never_work_are_refused(url: str, why: str, source: str) -> None:
    with pytest.raises(ValueError) as info:
        check_endpoint(url, source)
    message = str(info.value)
    assert message.startswith(source + " ")
    assert repr(url) in message
    assert why in message
    assert not isinstance(info.value, UnicodeError)
    assert info.value.__context__ is None or not isinstance(info.value.__context__, UnicodeError)


def test_a_non_string_endpoint_is_refused() -> None:
    bad: Any = 8080
    with pytest.raises(ValueError, match="endpoint must be a string"):
        check_endpoint(bad, "endpoint")


@pytest.mark.parametrize("url", ["https://i..klime.example", "https://i.klime.com/ingést", "ftp://x"])
def test_the_transport_refuses_them_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        HttpTransport(url, "k", 1.0)


def test_an_international_host_goes_out_in_its_ascii_form() -> None:
    t = HttpTransport("http://bücher.example:8080", "k", 1.0)
    assert t._host == "xn--bcher-kva.example"
    assert b"Host: xn--bcher-kva.example:8080\r\n" in t._head.data


@pytest.mark.parametrize("key", ["key\r\nX-Evil: 1", "kéy\u2603", "tab\tkey"])
def test_a_write_key_that_cannot_be_a_header_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ValueError) as info:
        HttpTransport("https://i.klime.com", key, 1.0)
    assert key not in str(info.value)
    assert info.value.__context__ is None
