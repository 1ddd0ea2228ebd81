"""A patched urllib.request.urlopen receives the request, as with the official SDK (issue 12).

Users' test suites patch ``urllib.request.urlopen`` to keep Klime off the
network; the default transport notices at send time and sends that request
through the patched function (docs/design.md, "Patched urlopen"). These tests
patch the standard library, which is the point; our own HTTP layer is not
replaced.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from email.message import Message
from typing import Any, Callable
from unittest.mock import MagicMock, patch

import pytest

from klime import SendError
from klime._deadline import Deadline
from klime._transport import HttpTransport, RetryPolicy, Sender, UrllibTransport

from .servers import WireServer

pytestmark = pytest.mark.usefixtures("no_ambient_proxy")  # loopback only


KEY = "wk_test_key"
BODY = json.dumps({"batch": [{"type": "track", "event": "A", "userId": "u1"}]}).encode()
LOG = logging.getLogger("klime.test")


def fake_response(status: int = 200, body: Any = None, headers: Any = None) -> MagicMock:
    """What users' tests hand back from a patched urlopen (the official SDK's tests do the same)."""
    resp = MagicMock()
    resp.status = status
    resp.read.return_value = json.dumps(body or {"status": "ok", "accepted": 1, "failed": 0}).encode()
    resp.headers = {} if headers is None else headers
    resp.__enter__ = MagicMock(return_value=resp)
    resp.__exit__ = MagicMock(return_value=False)
    return resp


def http_error(code: int, body: bytes = b'{"error": "x"}', headers: Any = None) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(
        "https://i.klime.com/v1/batch", code, "Error", headers if headers is not None else {}, io.BytesIO(body)
    )


def sender(url: str = "https://i.klime.com", attempts: int = 3) -> Sender:
    return Sender(HttpTransport(url, KEY, 7.0), RetryPolicy(attempts, 0.001), LOG, KEY)


def deliver(s: Sender, n: int = 1) -> Any:
    import threading

    return s.deliver(BODY, [object()] * n, Deadline.after(10), threading.Event())


def test_the_request_is_built_as_the_official_sdk_builds_it() -> None:
    with patch("urllib.request.urlopen") as urlopen:
        urlopen.return_value = fake_response(body={"status": "ok", "accepted": 1, "failed": 0})
        resp = HttpTransport("https://i.klime.com/", KEY, 7.0).post(BODY, Deadline.after(3))
    assert (resp.status, json.loads(resp.body)["accepted"]) == (200, 1)
    assert isinstance(resp.headers, Message)
    [call] = urlopen.call_args_list
    request = call.args[0]
    assert isinstance(request, urllib.request.Request)
    assert request.full_url == "https://i.klime.com/v1/batch"
    assert request.get_method() == "POST"
    assert request.data == BODY
    assert request.get_header("Authorization") == f"Bearer {KEY}"
    assert request.get_header("Content-type") == "application/json"
    assert request.get_header("User-agent").startswith("klime-python/")
    assert 0 < call.kwargs["timeout"] <= 3, "the deadline bounds the timeout it is given"


def test_unpatched_urlopen_leaves_the_real_transport_in_charge(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(HttpTransport(server.url, KEY, 5.0))
    assert t.post(BODY, Deadline.after(5)).status == 200
    assert len(server.requests) == 1
    assert t._urllib is None, "nothing about urllib is even built"


def test_a_patch_is_noticed_at_send_time_and_undone_with_it(closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    t = closing(HttpTransport(server.url, KEY, 5.0))  # built before the patch, as a module-level client is
    with patch("urllib.request.urlopen", return_value=fake_response()) as urlopen:
        t.post(BODY, Deadline.after(5))
    assert urlopen.call_count == 1
    assert server.requests == [], "nothing went to the network while patched"
    t.post(BODY, Deadline.after(5))
    assert len(server.requests) == 1


def test_headers_of_the_answer_are_readable_whatever_their_type() -> None:
    msg = Message()
    msg["Retry-After"] = "4"
    for headers in ({"Retry-After": "4"}, msg, MagicMock()):
        with patch("urllib.request.urlopen", return_value=fake_response(503, headers=headers)):
            resp = HttpTransport("https://i.klime.com", KEY, 7.0).post(BODY, Deadline.after(3))
        assert resp.status == 503
        assert resp.headers.get("Retry-After") in ("4", None)


def test_http_error_is_an_answer_with_its_code_headers_and_body() -> None:
    with patch("urllib.request.urlopen", side_effect=http_error(429, b"slow", {"Retry-After": "2"})):
        resp = HttpTransport("https://i.klime.com", KEY, 7.0).post(BODY, Deadline.after(3))
    assert (resp.status, resp.body, resp.headers.get("Retry-After")) == (429, b"slow", "2")


@pytest.mark.parametrize(
    "exc", [urllib.error.URLError("no route"), ConnectionRefusedError(111, "Connection refused"), TimeoutError()]
)
def test_url_and_os_errors_are_connection_errors(exc: OSError) -> None:
    with patch("urllib.request.urlopen", side_effect=exc), pytest.raises(OSError):
        HttpTransport("https://i.klime.com", KEY, 7.0).post(BODY, Deadline.after(3))


def test_same_retry_policy_and_results_through_the_sender() -> None:
    answers = [http_error(503), http_error(500), fake_response(body={"status": "ok", "accepted": 2, "failed": 0})]
    with patch("urllib.request.urlopen", side_effect=answers) as urlopen:
        resp = deliver(sender(attempts=5), 2)
    assert urlopen.call_count == 3
    assert (resp.accepted, resp.failed) == (2, 0)


@pytest.mark.parametrize("code", [400, 401, 404])
def test_permanent_errors_are_not_retried(code: int) -> None:
    error = http_error(code)
    with patch("urllib.request.urlopen", side_effect=error) as urlopen, pytest.raises(SendError) as info:
        deliver(sender(attempts=5))
    assert urlopen.call_count == 1
    assert (info.value.reason, info.value.status) == ("permanent_error", code)
    assert info.value.message.startswith(f"Failed to send 1 event(s): HTTP {code}")


def test_a_non_200_answer_returned_not_raised_is_handled_too() -> None:
    answer = fake_response(500, body={"error": "x"})
    with patch("urllib.request.urlopen", return_value=answer) as urlopen, pytest.raises(SendError) as info:
        deliver(sender(attempts=2))
    assert urlopen.call_count == 2
    assert (info.value.reason, info.value.status) == ("retries_exhausted", 500)


def test_anything_a_double_raises_becomes_a_send_error() -> None:
    with (
        patch("urllib.request.urlopen", side_effect=RuntimeError("boom")),
        pytest.raises(SendError, match="RuntimeError: boom"),
    ):
        deliver(sender(attempts=2))


def test_a_response_without_a_usable_status_is_a_failed_attempt() -> None:
    resp = MagicMock()  # __enter__ not wired to itself: .status is a MagicMock
    with patch("urllib.request.urlopen", return_value=resp), pytest.raises(SendError, match="HTTPException"):
        deliver(sender(attempts=1))


def test_urllib_transport_implements_the_protocol() -> None:
    t = HttpTransport("https://i.klime.com", KEY, 7.0)._via_urllib()
    assert isinstance(t, UrllibTransport)
    assert KEY not in repr(t)
    t.close()
    t.after_fork()
