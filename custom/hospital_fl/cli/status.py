"""`hospital-fl status`: the consortium as its FLARE server sees it, from an admin's startup kit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = ["add_status_command"]


def _error(args, message: str, code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"Error: {message}\nTry 'hospital-fl status --help'.", file=sys.stderr)
    return code


def _cmd_status(args) -> int:
    """Exit 0 with the report, 1 when the server cannot be reached or refuses the kit or a query, 2 on bad input."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from hospital_fl.flare.runners.status import ServerUnreachable, collect_status
    from hospital_fl.operations.status_page import render_status_html, status_tables

    try:
        status = collect_status(args.admin_kit, timeout=args.timeout, job_id=args.job)
    except InputError as err:
        return _error(args, str(err), 2)
    except ServerUnreachable as err:
        return _error(args, str(err), 1)
    if args.html is not None:
        page = Path(args.html)
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render_status_html(status))
    if args.json:
        print(json.dumps({"ok": True, **status.to_dict()}, default=str))
        return 0
    console = Console()
    console.print(
        f"[bold]{escape(status.server)}[/bold]: server {escape(status.server_state)}, checked {status.checked_at}"
    )
    for title, header, rows in status_tables(status):
        table = Table(title=escape(title), title_justify="left")
        for column in header:
            table.add_column(escape(column), overflow="fold")
        for row in rows:
            style = "red" if "NO" in row else None
            table.add_row(*(escape(cell) for cell in row), style=style)
        console.print(table)
    if args.html is not None:
        console.print(f"HTML page: {escape(str(args.html))}", soft_wrap=True)
    return 0


def add_status_command(sub: argparse._SubParsersAction) -> None:
    """Add ``status`` to the ``hospital-fl`` subcommands."""
    status = sub.add_parser(
        "status",
        help="hospitals connected, the running job and its round, rejections, privacy released, certificate expiry",
        description="Ask the consortium's FLARE server through the admin API, with an admin's startup kit: each "
        "hospital's connection and last heartbeat, the running (or latest) job and its round, each site's training "
        "seconds and metrics per round, rejected updates with their reasons, the privacy figures DP sites released, "
        "days until each certificate in view expires; with --job, why each site failed that job. Exit 0 with the "
        "report, 1 when the server cannot be reached or refuses the kit, 2 on bad input.",
    )
    status.add_argument(
        "--admin-kit",
        required=True,
        help="an admin's startup kit folder (from `hospital-fl provision`, or a POC workspace's "
        "prod_00/admin@nvidia.com)",
    )
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    status.add_argument("--job", default=None, help="report this job ID, with each site's reason if it failed")
    status.add_argument("--html", default=None, help="also write a self-contained HTML page with plots to this path")
    status.add_argument("--json", action="store_true", help="print the report as one JSON object instead of tables")
    status.set_defaults(func=_cmd_status)
