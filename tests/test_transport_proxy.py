"""Proxies from the environment, read as urllib reads them (docs/design.md, "Transport").

HTTP_PROXY forwards with an absolute URI, HTTPS_PROXY tunnels with CONNECT,
NO_PROXY bypasses; credentials in the proxy URL become Proxy-Authorization,
which only the proxy sees. Real proxies and servers on loopback.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Callable

import pytest

from klime._deadline import Deadline
from klime._transport import HttpTransport

from .servers import CA_CERT, LOOPBACK_CERT, Collector, ForwardProxy, TlsFront, WireServer

pytestmark = pytest.mark.usefixtures("no_ambient_proxy")  # loopback only


KEY = "test-write-key"
BODY = b'{"batch": [{"type": "track", "event": "A", "userId": "u1"}]}'


def post(t: HttpTransport, times: int = 1) -> None:
    for _ in range(times):
        assert t.post(BODY, Deadline.after(10)).status == 200


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_forwards_with_an_absolute_uri(
    var: str, monkeypatch: pytest.MonkeyPatch, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    proxy = closing(ForwardProxy())
    monkeypatch.setenv(var, proxy.url)
    t = closing(HttpTransport(server.url, KEY, 5.0))
    assert t.proxy == ("127.0.0.1", proxy.port)
    post(t, 2)
    host = f"127.0.0.1:{server.port}"
    assert [line for line, _ in proxy.seen] == [f"POST http://{host}/v1/batch HTTP/1.1"] * 2
    _, headers = proxy.seen[0]
    assert headers["host"] == host
    assert headers["authorization"] == f"Bearer {KEY}"
    assert "proxy-authorization" not in headers
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("no_proxy", "via_proxy"),
    [
        ("example.com", True),
        ("localhost", False),
        ("example.com, localhost", False),
        (".example.com,localhost:1", True),
        ("localhost:{port}", False),
        ("*", False),
    ],
)
def test_no_proxy_bypasses_the_proxy_for_listed_hosts(
    no_proxy: str,
    via_proxy: bool,
    monkeypatch: pytest.MonkeyPatch,
    closing: Callable[[Any], Any],
    collector: Collector,
) -> None:
    port = collector.port
    assert collector.url.startswith("http://localhost:")
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port))
    t = closing(HttpTransport(collector.url, KEY, 5.0))
    post(t)
    assert len(collector.events) == 1
    assert len(proxy.seen) == (1 if via_proxy else 0)


def test_proxy_credentials_become_proxy_authorization(
    monkeypatch: pytest.MonkeyPatch, closing: Callable[[Any], Any]
) -> None:
    server = closing(WireServer())
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", f"http://ann%40corp:p%3Ass@127.0.0.1:{proxy.port}")
    post(closing(HttpTransport(server.url, KEY, 5.0)))
    [(_, headers)] = proxy.seen
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"ann@corp:p:ss").decode()
    assert "proxy-authorization" not in server.requests[0].headers, "the proxy does not pass it on"


def test_proxy_without_scheme_is_read_as_http(monkeypatch: pytest.MonkeyPatch, closing: Callable[[Any], Any]) -> None:
    server = closing(WireServer())
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
    post(closing(HttpTransport(server.url, KEY, 5.0)))
    assert len(proxy.seen) == 1


def test_https_endpoint_ignores_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert HttpTransport("https://ingest.klime.invalid", "k", 1.0).proxy is None
    assert HttpTransport("http://ingest.klime.invalid", "k", 1.0).proxy == ("127.0.0.1", 3128)


def test_http_proxy_is_ignored_in_a_cgi_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpoxy: urllib does not trust HTTP_PROXY while REQUEST_METHOD is set; neither do we."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("REQUEST_METHOD", "GET")
    assert HttpTransport("http://ingest.klime.invalid", "k", 1.0).proxy is None


def test_https_proxy_gets_a_connect_and_its_refusal_is_an_os_error(
    monkeypatch: pytest.MonkeyPatch, closing: Callable[[Any], Any]
) -> None:
    proxy = closing(ForwardProxy(tunnel=False))
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:hunter2@127.0.0.1:{proxy.port}")
    t = closing(HttpTransport("https://ingest.klime.invalid:8443", KEY, 5.0))
    with pytest.raises(OSError, match="502"):
        t.post(BODY, Deadline.after(10))
    [(line, headers)] = proxy.seen
    assert line == "CONNECT ingest.klime.invalid:8443 HTTP/1.1"
    assert headers["host"] == "ingest.klime.invalid:8443"
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    assert "authorization" not in headers, "the write key is never shown to the proxy"


def test_https_through_a_proxy_tunnel_end_to_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, closing: Callable[[Any], Any]
) -> None:
    cafile = tmp_path / "ca.pem"
    cafile.write_text(CA_CERT)
    monkeypatch.setenv("SSL_CERT_FILE", str(cafile))
    server = closing(WireServer())
    front = closing(TlsFront(server, LOOPBACK_CERT, tmp_path))
    proxy = closing(ForwardProxy())
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    t = closing(HttpTransport(front.url, KEY, 5.0))
    post(t, 3)
    [(line, _)] = proxy.seen
    assert line == f"CONNECT 127.0.0.1:{front.port} HTTP/1.1"
    assert len(server.requests) == 3
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert front.handshakes == 1, "the tunnel is kept alive too"
