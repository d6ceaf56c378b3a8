"""`hospital-fl audit`: check the hash-chained audit trail and read it."""

from __future__ import annotations

import argparse

__all__ = ["add_audit_commands"]


def _input_error(exc) -> int:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]Error:[/] {escape(str(exc))}")
    return 2


def _cmd_verify(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from hospital_fl.audit import verify_trail
    from hospital_fl.errors import InputError

    try:
        given = (args.anchor_records is not None, args.anchor_hash is not None)
        if given[0] != given[1]:
            raise InputError(
                "anchor",
                f"--anchor-records {args.anchor_records} --anchor-hash {args.anchor_hash}",
                "an anchor is a record count and a hash together",
                "pass both --anchor-records and --anchor-hash, as printed by an earlier verify",
            )
        anchor = {"records": args.anchor_records, "last_hash": args.anchor_hash} if all(given) else None
        result = verify_trail(args.path, anchor=anchor)
    except InputError as exc:
        return _input_error(exc)
    console = Console(soft_wrap=True)
    if not result.ok:
        for problem in result.problems:
            console.print(f"[red]problem:[/] {escape(problem)}")
        console.print(
            f"[bold red]audit trail damaged:[/] {len(result.problems)} problems in {result.records} records of "
            f"{escape(args.path)}. Find the cause before appending more; "
            "restore it from backup if records were changed."
        )
        return 1
    checked = " and matches the anchor" if anchor else ""
    console.print(f"[bold green]audit trail ok{checked}:[/] {result.records} records, last hash {result.last_hash}")
    console.print(
        "Publish this anchor away from this machine; a later verify with it detects removed or rewritten records:"
    )
    console.print(f"  --anchor-records {result.records} --anchor-hash {result.last_hash}")
    return 0


def _cmd_show(args) -> int:
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from hospital_fl.audit import read_trail, verify_trail
    from hospital_fl.errors import InputError

    try:
        if args.last is not None and args.last < 1:
            raise InputError(
                "--last", args.last, "it must be at least 1", "pass how many of the latest records to show"
            )
        records = read_trail(args.path)
        verification = verify_trail(args.path)
    except InputError as exc:
        return _input_error(exc)
    chosen = [r for r in records if args.event is None or r.event.startswith(args.event)]
    if args.last is not None:
        chosen = chosen[-args.last :]
    table = Table(title=f"{escape(args.path)}: {len(chosen)} of {len(records)} records")
    table.add_column("seq", justify="right")
    table.add_column("time (UTC)", no_wrap=True, min_width=27)
    table.add_column("event")
    table.add_column("actor", overflow="fold")
    table.add_column("details", overflow="fold")
    for r in chosen:
        details = json.dumps(r.details, sort_keys=True, ensure_ascii=False)
        table.add_row(str(r.seq), r.time, escape(r.event), escape(r.actor), escape(details))
    console = Console()
    console.print(table)
    if not verification.ok:
        console.print(
            f"[bold red]the chain does not verify ({len(verification.problems)} problems):[/] "
            f"run `hospital-fl audit verify {escape(args.path)}` before trusting these records"
        )
    return 0


def add_audit_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``audit verify`` and ``audit show`` to the ``hospital-fl`` subcommands.

    Args:
        sub: the top-level parser's subparsers (``parser.add_subparsers(dest="command")``).
    """
    p = sub.add_parser(
        "audit",
        help="check or read the hash-chained audit trail",
        description="The audit trail (audit.jsonl) records provisioning, issued kits, submitted jobs and privacy "
        "spend, each record chained to the one before by its SHA-256.",
    )
    asub = p.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser(
        "verify",
        help="check every record and link; exit 0 when intact, 1 on problems, 2 when the file is missing",
        description="Check every line, hash and link of the trail and list all problems. On success, print the "
        "anchor (record count and last hash) to publish elsewhere; pass it back later to detect removed or "
        "rewritten records, which the chain alone cannot show.",
    )
    verify.add_argument("path", help="the trail file, e.g. workspace/audit.jsonl")
    verify.add_argument("--anchor-records", type=int, default=None, help="record count of a published anchor")
    verify.add_argument("--anchor-hash", default=None, help="last hash of a published anchor")
    verify.set_defaults(func=_cmd_verify, command="audit verify")
    show = asub.add_parser("show", help="list the trail's records as a table")
    show.add_argument("path", help="the trail file, e.g. workspace/audit.jsonl")
    show.add_argument("--last", type=int, default=None, help="only the latest N records (after --event)")
    show.add_argument("--event", default=None, help="only events starting with this prefix, e.g. job. or privacy.")
    show.set_defaults(func=_cmd_show, command="audit show")
