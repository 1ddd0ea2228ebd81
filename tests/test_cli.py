"""The ``klime`` command, end to end against loopback servers, in-process and as a subprocess."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

import klime
from klime._cli import EXIT_NOT_DELIVERED, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main

from .conftest import run_process as run_bounded
from .servers import Collector, RawServer, refused_url

KEY = "sk_test_0123456789abcdef"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLIME_WRITE_KEY", "KLIME_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def to(url: str) -> List[str]:
    """The connection options for ``url``."""
    return ["--write-key", KEY, "--endpoint", url]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*args: str, env: Optional[Dict[str, str]] = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m klime ARGS`` with a clean environment plus ``env``, importing this klime."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KLIME_") and "proxy" not in k.lower()}
    src = str(Path(klime.__file__).resolve().parent.parent)
    base["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    base.update(env or {})
    return run_bounded([sys.executable, "-m", "klime", *args], env=base, input=stdin)


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("klime: error: ")
    assert KEY not in err
    return lines[0]


# --- success --------------------------------------------------------------------


def test_track_sends_one_event_and_prints_a_summary(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    code, out, err = run(
        capsys,
        "track", "Report Generated",
        "--user-id", "usr_123",
        "--group-id", "org_456",
        "--properties", '{"report_type": "revenue", "rows": 3, "nested": {"ok": true}}',
        "--write-key", KEY,
        "--endpoint", collector.url,
    )  # fmt: skip
    assert (code, err) == (EXIT_OK, "")
    (request,) = collector.requests
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    (ev,) = request.events
    assert ev["type"] == "track"
    assert ev["event"] == "Report Generated"
    assert (ev["userId"], ev["groupId"]) == ("usr_123", "org_456")
    assert ev["properties"] == {"report_type": "revenue", "rows": 3, "nested": {"ok": True}}
    assert UUID4.match(ev["messageId"])
    # The CLI always sets a message id; the time must still be the time of the call.
    stamp = datetime.strptime(ev["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before <= stamp <= datetime.now(timezone.utc)
    assert ev["context"]["library"]["name"] == "python-sdk"
    assert out == f'accepted: 1 event (track "Report Generated", messageId {ev["messageId"]})\n'
    assert KEY not in out


def test_identify_with_timestamp_and_message_id(
    collector: Collector, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    code, out, err = run(
        capsys,
        "identify", "usr_123",
        "--traits", '{"email": "jane@example.com", "name": "Jane Smith"}',
        "--timestamp", "2026-01-05T09:00:00.250+01:00",
        "--message-id", "signup-usr_123",
    )  # fmt: skip
    assert (code, err) == (EXIT_OK, "")
    (ev,) = collector.events
    assert ev["type"] == "identify" and ev["userId"] == "usr_123"
    assert ev["traits"] == {"email": "jane@example.com", "name": "Jane Smith"}
    assert ev["timestamp"] == "2026-01-05T08:00:00.250Z"
    assert ev["messageId"] == "signup-usr_123"
    assert "groupId" not in ev and "properties" not in ev
    assert out == 'accepted: 1 event (identify "usr_123", messageId signup-usr_123)\n'


def test_group_links_a_user_and_defaults_traits_to_empty(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "group", "org_456", "--user-id", "usr_123", *to(collector.url))
    assert code == EXIT_OK
    code, _, _ = run(capsys, "group", "org_456", "--traits", '{"plan": "enterprise"}', *to(collector.url))
    assert code == EXIT_OK
    link, traits = collector.events
    assert (link["type"], link["groupId"], link["userId"], link["traits"]) == ("group", "org_456", "usr_123", {})
    assert traits["traits"] == {"plan": "enterprise"} and "userId" not in traits
    assert out.startswith('accepted: 1 event (group "org_456", messageId ')


def test_track_for_a_group_only_with_options_before_the_command(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "--endpoint", collector.url, "--write-key", KEY, "-q", "track", "Events Received", "--group-id", "org_1"
    )
    assert (code, out) == (EXIT_OK, "")
    (ev,) = collector.events
    assert ev["groupId"] == "org_1" and "userId" not in ev and ev["properties"] == {}


def test_json_from_a_file_and_from_stdin(
    collector: Collector, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    props = tmp_path / "props.json"
    props.write_text('{"format": "csv", "café": "ünïcode"}', encoding="utf-8")
    common = ["--write-key", KEY, "--endpoint", collector.url]
    assert run(capsys, "track", "Export Completed", "--user-id", "u1", "--properties", f"@{props}", *common)[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"name": "Jane"}'))
    assert run(capsys, "identify", "u1", "--traits", "@-", *common)[0] == 0
    track, identify = collector.events
    assert track["properties"] == {"format": "csv", "café": "ünïcode"}
    assert identify["traits"] == {"name": "Jane"}


def test_transient_failure_is_retried_with_the_same_message_id(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.respond(503, {"error": "busy"}, {"Retry-After": "0"})
    code, out, err = run(
        capsys, "track", "Retried", "--user-id", "u1", "--retries", "1", "--write-key", KEY, "--endpoint", collector.url
    )
    assert (code, err) == (EXIT_OK, "")
    first, second = collector.events
    assert first["messageId"] == second["messageId"]
    assert first["messageId"] in out


# --- bad input: exit 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["track", "E", "--user-id", "u1", "--properties", "{plan: pro}"], "--properties is not valid JSON: "),
        (["identify", "u1", "--traits", '{"a": 1'], "--traits is not valid JSON: "),
        (["group", "g1", "--traits", '{"ratio": NaN}'], "--traits is not valid JSON: NaN is not allowed"),
        (["track", "E", "--user-id", "u1", "--properties", "[1, 2]"], "--properties must be a JSON object"),
        (["identify", "u1", "--traits", '"jane"'], "--traits must be a JSON object such as"),
        (["track", "E", "--user-id", "u1", "--properties", "@/nonexistent/props.json"], "--properties: cannot read"),
    ],
)
def test_bad_json_names_the_option(
    collector: Collector, capsys: pytest.CaptureFixture[str], argv: List[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv, "--write-key", KEY, "--endpoint", collector.url)
    assert (code, out) == (EXIT_USAGE, "")
    assert expected in one_error_line(err)
    assert collector.requests == []


@pytest.mark.parametrize("env_value", [None, ""])
def test_missing_write_key_says_how_to_set_it(
    collector: Collector, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env_value: Optional[str]
) -> None:
    if env_value is not None:
        monkeypatch.setenv("KLIME_WRITE_KEY", env_value)
    code, _, err = run(capsys, "track", "E", "--user-id", "u1", "--endpoint", collector.url)
    assert code == EXIT_USAGE
    line = one_error_line(err)
    assert "--write-key" in line and "KLIME_WRITE_KEY" in line
    assert collector.requests == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["track", "Orphan"], "track needs --user-id or --group-id"),
        (["track", "", "--user-id", "u1"], "event name must be a non-empty string"),
        (["identify", ""], "user_id must be a non-empty string"),
        (["track", "E", "--user-id", "u1", "--timestamp", "yesterday"], "is not an ISO 8601 date-time"),
        (["identify", "u1", "--message-id", ""], "message_id must be a non-empty string"),
        (["track", "E", "--user-id", "u1", "--retries", "-1"], "argument --retries: must be 0 or more"),
        (["track", "E", "--user-id", "u1", "--timeout", "0"], "argument --timeout: must be a number of seconds"),
        (["track", "E", "--user-id", "u1", "--bogus"], "unrecognized arguments: --bogus"),
        (["track"], "the following arguments are required: EVENT"),
        ([], "the following arguments are required: COMMAND"),
        (["page", "Home"], "invalid choice: 'page'"),
    ],
)
def test_invalid_arguments_exit_2_with_the_reason(
    collector: Collector, capsys: pytest.CaptureFixture[str], argv: List[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv, "--write-key", KEY, "--endpoint", collector.url)
    assert (code, out) == (EXIT_USAGE, "")
    assert expected in one_error_line(err)
    assert collector.requests == []


def test_invalid_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "identify", "u1", "--write-key", KEY, "--endpoint", "ftp://example.com")
    assert code == EXIT_USAGE
    assert "must start with http:// or https://" in one_error_line(err)


def test_the_write_key_is_never_echoed(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    # Misplaced arguments make argparse quote what it got; the key must not appear.
    for argv in (
        ["--write-key", KEY],
        ["--write-key", KEY, "bogus"],
        ["track", "E", "--user-id", "u1", f"--write-key={KEY}", "stray"],
        ["--write-key", KEY, "--endpoint", collector.url, "track", KEY, "--user-id", "u1"],
    ):
        _, out, err = run(capsys, *argv)
        assert KEY not in out + err, argv
    assert collector.events[0]["event"] == KEY  # sent as asked, only never printed
    assert "***" in out


def test_a_key_from_the_environment_is_not_echoed_either(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", KEY)
    code, _, err = run(capsys, KEY, "track", "E", "--user-id", "u1")  # the key pasted as the command
    assert code == EXIT_USAGE
    assert "invalid choice: '***'" in one_error_line(err)


# --- server and network failures ------------------------------------------------


def test_permanent_error_exits_3_with_the_status(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.respond(400, {"error": "invalid batch"})
    code, out, err = run(capsys, "track", "E", "--user-id", "u1", "--write-key", KEY, "--endpoint", collector.url)
    assert (code, out) == (EXIT_REJECTED, "")
    line = one_error_line(err)
    assert "rejected by the server" in line and "HTTP 400" in line and "invalid batch" in line
    assert len(collector.requests) == 1  # never retried


def test_unauthorized_hints_at_the_write_key(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.respond(401, "unauthorized\nplease check\n")
    code, _, err = run(capsys, "identify", "u1", "--write-key", KEY, "--endpoint", collector.url)
    assert code == EXIT_REJECTED
    line = one_error_line(err)
    assert "HTTP 401" in line and "check the write key" in line


def test_partial_rejection_exits_3_with_the_servers_code_and_message(
    collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.respond(
        200,
        {
            "status": "partial",
            "accepted": 0,
            "failed": 1,
            "errors": [{"index": 0, "message": "timestamp too far in the past", "code": "invalid_timestamp"}],
        },
    )
    code, out, err = run(capsys, "track", "Old", "--user-id", "u1", "--message-id", "m-old", *to(collector.url))
    assert (code, out) == (EXIT_REJECTED, "")
    line = one_error_line(err)
    assert "the server rejected the event (messageId m-old)" in line
    assert "invalid_timestamp: timestamp too far in the past" in line


def test_retries_exhausted_exits_1(collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        collector.respond(503, "overloaded", {"Retry-After": "0"})
    code, out, err = run(capsys, "group", "g1", "--retries", "1", *to(collector.url))
    assert (code, out) == (EXIT_NOT_DELIVERED, "")
    line = one_error_line(err)
    assert "not delivered" in line and "after 2 attempt(s)" in line and "HTTP 503" in line
    assert len(collector.requests) == 2


def test_network_failure_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, out, err = run(capsys, "track", "E", "--user-id", "u1", "--retries", "0", *to(refused_url()))
    assert (code, out) == (EXIT_NOT_DELIVERED, "")
    line = one_error_line(err)
    assert "after 1 attempt(s)" in line and "ConnectionRefusedError" in line
    assert time.monotonic() - started < 5


def test_timeout_option_bounds_a_hanging_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with RawServer(lambda req: "hang") as server:
        started = time.monotonic()
        code, _, err = run(
            capsys, "identify", "u1", "--timeout", "0.2", "--retries", "0", "--write-key", KEY, "--endpoint", server.url
        )
        elapsed = time.monotonic() - started
    assert code == EXIT_NOT_DELIVERED
    assert "TimeoutError" in one_error_line(err)
    assert elapsed < 3


# --- help -------------------------------------------------------------------------


def test_help_has_examples_exit_codes_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--help")
    assert (code, err) == (0, "")
    assert "usage: klime" in out
    assert "examples:" in out
    assert 'klime track "Report Generated" --user-id usr_123' in out
    assert "klime identify usr_123 --traits" in out
    assert "klime group org_456 --user-id usr_123" in out
    for line in ("0    accepted", "1    not delivered", "2    usage error", "3    rejected by the server"):
        assert line in out
    assert "KLIME_WRITE_KEY" in out and "KLIME_ENDPOINT" in out


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("track", 'klime track "Events Received" --group-id org_456'),
        ("identify", "klime identify usr_123 --traits"),
        ("group", "klime group org_456 --user-id usr_123"),
    ],
)
def test_subcommand_help_has_examples(capsys: pytest.CaptureFixture[str], command: str, example: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: klime {command}" in out
    assert "examples:" in out and example in out
    assert "exit status:" in out
    for option in ("--timestamp", "--message-id", "--write-key", "--endpoint", "--retries", "--timeout"):
        assert option in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"klime {klime.__version__}\n")


def test_console_script_is_declared() -> None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    match = re.search(r'^\[project\.scripts\]\s*\nklime\s*=\s*"([\w.]+):(\w+)"', text, re.MULTILINE)
    assert match, "pyproject.toml declares no klime console script"
    module = __import__(match.group(1), fromlist=[match.group(2)])
    assert getattr(module, match.group(2)) is main


# --- as a real process ----------------------------------------------------------


def test_subprocess_track_with_key_and_endpoint_from_the_environment(collector: Collector) -> None:
    proc = run_process(
        "track", "Signup Completed", "--user-id", "usr_1", "--properties", '{"plan": "pro"}',
        env={"KLIME_WRITE_KEY": KEY, "KLIME_ENDPOINT": collector.url},
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    (request,) = collector.requests
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    (ev,) = request.events
    assert (ev["event"], ev["userId"], ev["properties"]) == ("Signup Completed", "usr_1", {"plan": "pro"})
    assert proc.stdout == f'accepted: 1 event (track "Signup Completed", messageId {ev["messageId"]})\n'


def test_subprocess_identify_and_group_with_traits_from_stdin(collector: Collector) -> None:
    env = {"KLIME_WRITE_KEY": KEY}
    stdin = '{"name": "Jane"}'
    proc = run_process("identify", "usr_1", "--traits", "@-", "--endpoint", collector.url, env=env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    proc = run_process(
        "group", "org_1", "--user-id", "usr_1", "--timestamp", "2026-11-22T10:04:05.123Z", "--message-id", "g-1",
        "--endpoint", collector.url, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    identify, group = collector.events
    assert identify["traits"] == {"name": "Jane"}
    assert (group["timestamp"], group["messageId"], group["userId"]) == ("2026-11-22T10:04:05.123Z", "g-1", "usr_1")


def test_subprocess_failures_give_one_line_and_distinct_codes(collector: Collector) -> None:
    env = {"KLIME_WRITE_KEY": KEY}
    missing = run_process("track", "E", "--user-id", "u1", "--endpoint", collector.url)
    assert missing.returncode == EXIT_USAGE
    assert "KLIME_WRITE_KEY" in one_error_line(missing.stderr)

    bad_json = run_process("track", "E", "--user-id", "u1", "--properties", "{", "--endpoint", collector.url, env=env)
    assert bad_json.returncode == EXIT_USAGE
    assert "--properties is not valid JSON" in one_error_line(bad_json.stderr)

    collector.respond(400, {"error": "bad"})
    rejected = run_process("identify", "u1", "--endpoint", collector.url, env=env)
    assert rejected.returncode == EXIT_REJECTED
    assert "HTTP 400" in one_error_line(rejected.stderr)

    refused = run_process("identify", "u1", "--retries", "0", "--endpoint", refused_url(), env=env)
    assert refused.returncode == EXIT_NOT_DELIVERED
    assert "not delivered" in one_error_line(refused.stderr)
    assert all(p.stdout == "" for p in (missing, bad_json, rejected, refused))


def test_subprocess_help() -> None:
    proc = run_process("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: klime ")
    assert "examples:" in proc.stdout and "exit status:" in proc.stdout


def test_subprocess_verbose_logs_retries(collector: Collector) -> None:
    collector.respond(503, "busy", {"Retry-After": "0"})
    proc = run_process(
        "-v", "identify", "u1", "--retries", "1", "--endpoint", collector.url, env={"KLIME_WRITE_KEY": KEY}
    )
    assert proc.returncode == 0
    assert "attempt 1/2 failed: HTTP 503" in proc.stderr
    assert KEY not in proc.stderr + proc.stdout
    assert json.loads(json.dumps(collector.events))[0]["type"] == "identify"


def test_the_cli_sends_without_starting_a_thread(
    collector: Collector, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    started: List[str] = []
    real_start = threading.Thread.start

    def spy(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", spy)
    code, _, err = run(capsys, "track", "One Shot", "--user-id", "u1", "--write-key", KEY, "--endpoint", collector.url)
    assert (code, err) == (EXIT_OK, "")
    assert [t for t in started if t.startswith("klime")] == []
    assert [e["event"] for e in collector.events] == ["One Shot"]
