from klime import KlimeClient

from .conftest import Recorder
from .servers import Collector


def test_docs_quick_start_delivers_all_three_calls(collector: Collector, make_client, recorder: Recorder) -> None:
    client: KlimeClient = make_client(collector.url)
    client.identify("user_123", {"email": "a@example.com", "name": "Stefan"})
    client.track("Button Clicked", {"button_name": "Sign up", "plan": "pro"}, user_id="user_123")
    client.group("org_456", {"name": "Acme Inc", "plan": "enterprise"}, user_id="user_123")
    client.group("org_456", user_id="user_123")
    assert client.flush(timeout=5) is True
    types = [e["type"] for e in collector.events]
    assert types == ["identify", "track", "group", "group"]
    assert recorder.successes and recorder.successes[0].accepted == 4
