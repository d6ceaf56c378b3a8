"""`hospital-fl kit verify`: check an unpacked startup kit before a participant starts FLARE with it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from hospital_fl.errors import InputError

__all__ = ["add_kit_commands", "parse_time"]


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 date or time ("2026-01-31", "2026-01-31T12:00:00Z"); a time without zone is UTC.

    Raises:
        InputError: ``text`` is not ISO 8601.
    """
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise InputError(
            "--now", text, f"it must be an ISO 8601 date or time ({err})", "use e.g. 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from err
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _status(check) -> str:
    if not check.ok:
        return "[red]FAIL[/red]"
    return "[yellow]warn[/yellow]" if check.warn else "[green]ok[/green]"


def _cmd_kit_verify(args) -> int:
    """Exit 0 when every check passed, 1 when one failed, 2 when the input is not a kit (or --now is bad)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from hospital_fl.flare.kits.verify import verify_kit

    try:
        now = parse_time(args.now) if args.now is not None else None
        result = verify_kit(args.kit_dir, project=args.project, now=now)
    except InputError as err:
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "error": {"input": err.name, "value": str(err.value), "rule": err.rule, "fix": err.fix},
                    }
                )
            )
        print(f"Error: {err}\nTry 'hospital-fl kit verify --help'.", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        table = Table(title=f"kit verify: {escape(result.name)} ({result.kind}) at {escape(str(result.kit))}")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        table.add_column("fix", overflow="fold")
        for check in result.checks:
            table.add_row(check.name, _status(check), escape(check.detail), escape(check.fix))
        Console().print(table)
    return 0 if result.ok else 1


def add_kit_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``kit verify`` to the ``hospital-fl`` subcommands.

    Args:
        sub: the top-level parser's subparsers (``parser.add_subparsers(dest="command")``).
    """
    kit = sub.add_parser("kit", help="checks on a FLARE startup kit")
    ksub = kit.add_subparsers(dest="kit_command", required=True)
    verify = ksub.add_parser(
        "verify",
        help="check an unpacked startup kit: files, certificates, project, signatures, secret file modes, local "
        "policies, classes",
        description="Check an unpacked FLARE startup kit the way FLARE will at start: its files, certificate chain "
        "and dates, project, signatures, local policies and component classes; and that its secrets (private "
        "keys, the HE secret context) are mode 0600. Exit 0 when all checks pass, 1 when one fails, 2 when the "
        "folder is not a kit.",
    )
    verify.add_argument("kit_dir", help="the unpacked kit folder, e.g. workspace/consortium/kits/hospital-a")
    verify.add_argument("--project", default=None, help="the consortium's project name the kit must belong to")
    verify.add_argument("--now", default=None, help="check certificates at this ISO 8601 time (default: now, UTC)")
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    verify.set_defaults(func=_cmd_kit_verify, command="kit verify")
