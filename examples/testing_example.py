"""Test your own instrumentation with ``klime.testing.CapturingClient``.

    python -m pytest examples/testing_example.py   # as pytest tests
    python examples/testing_example.py             # or without pytest

``CapturingClient`` is a real ``KlimeClient`` whose HTTP layer keeps each
request in memory: events go through the same validation, queue, batching
and JSON encoding, and what the tests look at is exactly what the API would
have received (camelCase keys, ISO 8601 timestamps). Nothing touches the
network and no write key is needed.

The first half of this file stands in for application code; the second
half is what its tests look like.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator, List, Optional

from klime import KlimeClient
from klime.testing import CapturingClient

# --- application code (normally somewhere in your package) -------------------


@dataclass
class Account:
    user_id: str
    email: str
    org_id: Optional[str]


class SignupService:
    """Takes the client as a dependency, so tests can hand it a CapturingClient."""

    def __init__(self, klime: KlimeClient) -> None:
        self.klime = klime
        self._next_id = 1

    def sign_up(self, email: str, name: str, plan: str, company: Optional[str] = None) -> Account:
        if "@" not in email:
            raise ValueError("invalid e-mail address")
        user_id = f"usr_{self._next_id}"
        self._next_id += 1
        org_id = f"org_{company.lower()}" if company else None
        self.klime.identify(user_id, {"email": email, "name": name})
        if org_id is not None:
            self.klime.group(org_id, {"name": company, "plan": plan}, user_id=user_id)
        self.klime.track(
            "Signup Completed",
            {"plan": plan, "signed_up_at": datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)},
            user_id=user_id,
            group_id=org_id,
        )
        return Account(user_id, email, org_id)


# --- tests ----------------------------------------------------------------------

try:
    import pytest
except ImportError:  # running as a plain script without pytest installed
    pytest = None  # type: ignore[assignment]


def _fixture(fn: Callable[[], Iterator[CapturingClient]]) -> Callable[[], Iterator[CapturingClient]]:
    return pytest.fixture(fn) if pytest is not None else fn


@_fixture
def klime_client() -> Iterator[CapturingClient]:
    # The with-block shuts the client down after the test.
    with CapturingClient() as client:
        yield client


def test_signup_identifies_and_tracks(klime_client: CapturingClient) -> None:
    account = SignupService(klime_client).sign_up("jane@example.com", "Jane Smith", "pro")

    klime_client.assert_identified(account.user_id, traits={"email": "jane@example.com"})
    event = klime_client.assert_tracked(
        "Signup Completed",
        user_id=account.user_id,
        # Compared in wire form: the datetime is matched as its ISO 8601 string.
        properties={"plan": "pro", "signed_up_at": datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)},
    )
    assert "groupId" not in event  # an individual customer: no company
    assert klime_client.grouped() == []


def test_company_signup_links_user_to_group(klime_client: CapturingClient) -> None:
    account = SignupService(klime_client).sign_up("stefan@acme.example", "Stefan", "enterprise", company="Acme")

    klime_client.assert_grouped("org_acme", user_id=account.user_id, traits={"name": "Acme"})
    klime_client.assert_tracked("Signup Completed", user_id=account.user_id, group_id="org_acme")
    assert [e["type"] for e in klime_client.events] == ["identify", "group", "track"]


def test_rejected_signup_sends_nothing(klime_client: CapturingClient) -> None:
    service = SignupService(klime_client)
    try:
        service.sign_up("not-an-email", "Nobody", "free")
        raised = False
    except ValueError:
        raised = True
    assert raised
    klime_client.assert_nothing_sent()


def test_delivery_failure_reaches_on_error() -> None:
    reasons: List[str] = []
    with CapturingClient(on_error=lambda error, events: reasons.append(getattr(error, "reason", ""))) as client:
        client.fail_next(401)  # e.g. a revoked write key: permanent, not retried
        SignupService(client).sign_up("jane@example.com", "Jane Smith", "pro")
        client.assert_nothing_sent()
    assert reasons == ["permanent_error"]


if __name__ == "__main__":
    tests = [
        test_signup_identifies_and_tracks,
        test_company_signup_links_user_to_group,
        test_rejected_signup_sends_nothing,
    ]
    for test in tests:
        with CapturingClient() as client:
            test(client)
        print(f"ok  {test.__name__}")
    test_delivery_failure_reaches_on_error()
    print(f"ok  {test_delivery_failure_reaches_on_error.__name__}")
