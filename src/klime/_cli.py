"""The ``klime`` command: send one track, identify or group event from a shell.

It uses the ``*_sync`` methods of a :class:`~klime.KlimeClient`, so the event
is validated, encoded and retried exactly as the library does, and the exit
status says what became of it. Run ``klime --help`` for usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from ._version import __version__
from .client import KlimeClient
from .types import BatchResponse, SendError

EXIT_OK = 0
EXIT_NOT_DELIVERED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_INTERRUPTED = 130

PROG = "klime"

_EXIT_STATUS = """\
exit status:
  0    accepted by the server
  1    not delivered: network failure, timeout, or HTTP 408/429/5xx on every attempt
  2    usage error or bad input: unknown option, invalid JSON, no write key,
       an invalid id, name or timestamp
  3    rejected by the server: a permanent HTTP error (400, 401, 403, ...) or the
       event refused in an accepted request
  130  interrupted

environment:
  KLIME_WRITE_KEY  write key used when --write-key is not given (preferred: a
                   key on the command line is visible to other local users)
  KLIME_ENDPOINT   API base URL used when --endpoint is not given
                   (default https://i.klime.com)
"""

_MAIN_EPILOG = (
    """\
examples:
  export KLIME_WRITE_KEY=your-write-key
  klime track "Report Generated" --user-id usr_123 --properties '{"report_type": "revenue"}'
  klime track "Events Received" --group-id org_456 --properties '{"count": 100}'
  klime identify usr_123 --traits '{"email": "jane@example.com", "name": "Jane Smith"}'
  klime group org_456 --user-id usr_123 --traits '{"name": "Acme Inc", "plan": "enterprise"}'
  klime track "Invoice Paid" --user-id usr_123 --timestamp 2026-11-22T10:04:05Z --message-id inv-42-paid

Each command sends one event and waits for the server's answer, retrying
network errors, timeouts, 408, 429 and 5xx. On success it prints one line
(accepted: 1 event ...) on stdout; on failure, one line giving the reason on
stderr. JSON options also take @FILE, or @- for standard input.

"""
    + _EXIT_STATUS
)

_TRACK_EPILOG = (
    """\
examples:
  klime track "Report Generated" --user-id usr_123 --properties '{"report_type": "revenue"}'
  klime track "Events Received" --group-id org_456 --properties '{"count": 100, "source": "webhook"}'
  klime track "Export Completed" --user-id usr_123 --group-id org_456 --properties @props.json
  klime track "Invoice Paid" --user-id usr_123 --timestamp 2026-11-22T10:04:05.123Z --message-id inv-42-paid

"""
    + _EXIT_STATUS
)

_IDENTIFY_EPILOG = (
    """\
examples:
  klime identify usr_123 --traits '{"email": "jane@example.com", "name": "Jane Smith"}'
  klime identify usr_123 --traits @- < traits.json
  klime identify usr_123 --traits '{"plan": "pro"}' --timestamp 2026-01-05T09:00:00+01:00

"""
    + _EXIT_STATUS
)

_GROUP_EPILOG = (
    """\
examples:
  klime group org_456 --user-id usr_123 --traits '{"name": "Acme Inc", "plan": "enterprise"}'
  klime group org_456 --user-id usr_123                       # only link the user
  klime group org_456 --traits '{"plan": "enterprise", "employee_count": 50}'

"""
    + _EXIT_STATUS
)


class _UsageError(Exception):
    """Bad command line or bad input: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Reports errors as one line through :func:`main` instead of exiting with the usage text."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, got {text!r}")
    return value


def _retry_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    # Accepted before and after the command name. SUPPRESS keeps a
    # subcommand's unset option from overwriting a value given before it.
    group = parser.add_argument_group("connection options")
    group.add_argument(
        "--write-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="Klime write key (default: $KLIME_WRITE_KEY)",
    )
    group.add_argument(
        "--endpoint",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="API base URL (default: $KLIME_ENDPOINT, then https://i.klime.com)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=argparse.SUPPRESS,
        help="time one attempt may take in all: connect, send, whole answer (default: 10)",
    )
    group.add_argument(
        "--retries",
        metavar="N",
        type=_retry_count,
        default=argparse.SUPPRESS,
        help="retries after the first attempt, with exponential backoff (default: 4)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing on success",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log each attempt and retry on stderr",
    )


def _add_event_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timestamp",
        metavar="ISO8601",
        help="when it happened, e.g. 2026-11-22T10:04:05.123Z (default: now; no offset means UTC)",
    )
    parser.add_argument(
        "--message-id",
        metavar="ID",
        help="idempotency key: the server keeps one event per message id (default: a new UUID)",
    )


# Each command once: its help, description, epilog, positional argument and options.
# (option flag, metavar, help) for the options beyond --timestamp/--message-id.
_COMMANDS: Dict[str, Dict[str, Any]] = {
    "track": {
        "help": "record that a user or a group did something",
        "description": "Send a track event. Needs --user-id or --group-id (or both).",
        "epilog": _TRACK_EPILOG,
        "positional": ("event", "EVENT", 'event name, e.g. "Report Generated"'),
        "options": [
            ("--user-id", "ID", "the user who did it"),
            ("--group-id", "ID", "the group (organization) it belongs to"),
            ("--properties", "JSON", 'a JSON object, e.g. \'{"plan": "pro"}\' (or @FILE, @-)'),
        ],
    },
    "identify": {
        "help": "set a user's traits",
        "description": "Send an identify event: who USER_ID is.",
        "epilog": _IDENTIFY_EPILOG,
        "positional": ("user_id", "USER_ID", "the user's id"),
        "options": [
            ("--traits", "JSON", 'a JSON object, e.g. \'{"email": "jane@example.com"}\' (or @FILE, @-)'),
        ],
    },
    "group": {
        "help": "set a group's traits and/or link a user to it",
        "description": "Send a group event: set GROUP_ID's traits, link --user-id to it, or both.",
        "epilog": _GROUP_EPILOG,
        "positional": ("group_id", "GROUP_ID", "the group's (organization's) id"),
        "options": [
            ("--user-id", "ID", "a user to link to the group"),
            ("--traits", "JSON", 'a JSON object, e.g. \'{"name": "Acme Inc"}\' (or @FILE, @-)'),
        ],
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``klime`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Send one event to the Klime ingestion API and wait for the answer.",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for name, spec in _COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=spec["help"],
            description=spec["description"],
            epilog=spec["epilog"],
            formatter_class=fmt,
            allow_abbrev=False,
        )
        dest, metavar, help_text = spec["positional"]
        sub.add_argument(dest, metavar=metavar, help=help_text)
        for flag, meta, text in spec["options"]:
            sub.add_argument(flag, metavar=meta, help=text)
        _add_event_options(sub)
        _add_connection_options(sub)
        sub.set_defaults(send=_SENDERS[name])
    return parser


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _json_object(text: Optional[str], option: str) -> Optional[Dict[str, Any]]:
    """The value of a JSON option: an object, read from the text, @FILE or @- (stdin)."""
    if text is None:
        return None
    if text.startswith("@"):
        path = text[1:]
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _UsageError(f"{option}: cannot read {path or '(no file name)'}: {reason}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _UsageError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _UsageError(
            f"{option} must be a JSON object such as '{{\"plan\": \"pro\"}}', not {_json_kind(value)}"
        )
    return value


def _secrets(argv: Sequence[str]) -> List[str]:
    """Write keys that must never be echoed: from the environment and the command line."""
    found = [os.environ.get("KLIME_WRITE_KEY") or ""]
    for i, arg in enumerate(argv):
        if arg == "--write-key" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--write-key="):
            found.append(arg[len("--write-key=") :])
    # Replacing a one- or two-character "key" would mangle the message and hide nothing.
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def _one_line(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(text.split())


def _make_logger(verbose: bool) -> logging.Logger:
    # A logger of its own, outside the logging tree: without it the library's
    # warnings would reach stderr through logging's last-resort handler and
    # break the one-line contract, and nothing global is touched.
    logger = logging.Logger("klime.cli", logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.NullHandler()
    logger.addHandler(handler)
    return logger


def _describe(args: argparse.Namespace) -> str:
    if args.command == "track":
        return f"track {json.dumps(args.event, ensure_ascii=False)}"
    target = args.user_id if args.command == "identify" else args.group_id
    return f"{args.command} {json.dumps(target, ensure_ascii=False)}"


class _OneShotClient(KlimeClient):
    """A client for one ``*_sync`` call: it never starts a background thread."""

    _background_threads = False


def _send_track(client: KlimeClient, args: argparse.Namespace, common: Dict[str, Any]) -> BatchResponse:
    if args.user_id is None and args.group_id is None:
        raise _UsageError("track needs --user-id or --group-id (anonymous events are not supported)")
    properties = _json_object(args.properties, "--properties")
    return client.track_sync(args.event, properties, user_id=args.user_id, group_id=args.group_id, **common)


def _send_identify(client: KlimeClient, args: argparse.Namespace, common: Dict[str, Any]) -> BatchResponse:
    return client.identify_sync(args.user_id, _json_object(args.traits, "--traits"), **common)


def _send_group(client: KlimeClient, args: argparse.Namespace, common: Dict[str, Any]) -> BatchResponse:
    traits = _json_object(args.traits, "--traits")
    return client.group_sync(args.group_id, traits, user_id=args.user_id, **common)


_SENDERS: Dict[str, Callable[[KlimeClient, argparse.Namespace, Dict[str, Any]], BatchResponse]] = {
    "track": _send_track,
    "identify": _send_identify,
    "group": _send_group,
}


def _send(client: KlimeClient, args: argparse.Namespace, message_id: str) -> BatchResponse:
    common: Dict[str, Any] = {"timestamp": args.timestamp, "message_id": message_id}
    send: Callable[[KlimeClient, argparse.Namespace, Dict[str, Any]], BatchResponse] = args.send
    return send(client, args, common)


def _send_error(exc: SendError) -> Tuple[int, str]:
    if exc.reason in ("unencodable", "oversize"):
        return EXIT_USAGE, exc.message
    if exc.reason == "permanent_error":
        hint = " (check the write key)" if exc.status in (401, 403) else ""
        return EXIT_REJECTED, f"rejected by the server: {exc.message}{hint}"
    return EXIT_NOT_DELIVERED, f"not delivered: {exc.message}"


def _rejection(response: BatchResponse, message_id: str) -> str:
    details = [f"{e.code}: {e.message}" if e.code else e.message for e in response.errors or []]
    why = "; ".join(d for d in details if d) or "no reason given"
    return f"the server rejected the event (messageId {message_id}): {why}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``klime`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    secrets = _secrets(argv)

    def fail(status: int, message: str) -> int:
        print(f"{PROG}: error: {_one_line(message, secrets)}", file=sys.stderr)
        return status

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except SystemExit as exc:  # --help and --version print, then exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    write_key = getattr(args, "write_key", None) or os.environ.get("KLIME_WRITE_KEY")
    if not write_key:
        return fail(
            EXIT_USAGE,
            "no write key: pass --write-key KEY or set the KLIME_WRITE_KEY environment variable",
        )
    message_id = args.message_id if args.message_id is not None else str(uuid.uuid4())
    retries: int = getattr(args, "retries", 4)
    timeout: float = getattr(args, "timeout", 10.0)
    client: Optional[KlimeClient] = None
    try:
        client = _OneShotClient(
            write_key,
            getattr(args, "endpoint", None),
            retry_max_attempts=retries + 1,
            logger=_make_logger(getattr(args, "verbose", False)),
            request_timeout=max(1, round(timeout * 1000)),
        )
        response = _send(client, args, message_id)
    except _UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except SendError as exc:
        return fail(*_send_error(exc))
    except (ValueError, TypeError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted; the event may or may not have been delivered")
    finally:
        if client is not None:
            client.shutdown(timeout=1.0)

    if response.failed > 0:
        return fail(EXIT_REJECTED, _rejection(response, message_id))
    if not getattr(args, "quiet", False):
        line = f"accepted: 1 event ({_describe(args)}, messageId {message_id})"
        print(_one_line(line, secrets))
    return EXIT_OK
