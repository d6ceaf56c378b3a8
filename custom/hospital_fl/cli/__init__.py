"""`hospital-fl` command line: one module per command group, each adding its subcommands."""

from __future__ import annotations

import argparse
import sys

from hospital_fl.cli.audit import add_audit_commands
from hospital_fl.cli.bench import add_bench_command
from hospital_fl.cli.demo import add_demo_command
from hospital_fl.cli.jobs import add_job_commands
from hospital_fl.cli.kit import add_kit_commands
from hospital_fl.cli.privacy import add_privacy_commands
from hospital_fl.cli.provision import add_provision_commands
from hospital_fl.cli.site import add_site_commands
from hospital_fl.cli.status import add_status_command
from hospital_fl.errors import InputError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hospital-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (
        add_demo_command,
        add_job_commands,
        add_bench_command,
        add_privacy_commands,
        add_site_commands,
        add_provision_commands,
        add_kit_commands,
        add_audit_commands,
        add_status_command,
    ):
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"Error: {exc}\nTry 'hospital-fl {args.command} --help'.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "Interrupted; FLARE processes started by this command were stopped; no report was written.", file=sys.stderr
        )
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"Error: {exc}\nNo report was written.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
