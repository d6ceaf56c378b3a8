"""`hospital-fl provision`: the consortium operator's site configs -> signed startup kits."""

from __future__ import annotations

import argparse

__all__ = ["add_provision_commands"]


def _cmd_provision(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hospital_fl.flare.provision import provision

    result = provision(args.site_configs, args.out)
    table = Table(title=f"{result.project}: {len(result.kits)} startup kits in {result.seconds:.2f} s")
    table.add_column("participant", overflow="fold")
    table.add_column("type")
    table.add_column("org", overflow="fold")
    table.add_column("kit archive", overflow="fold")
    table.add_column("KiB", justify="right")
    for kit in result.kits:
        size = kit.archive.stat().st_size / 1024
        table.add_row(kit.name, kit.type, kit.org, str(kit.archive.relative_to(result.out_dir)), f"{size:.0f}")
    console = Console()
    console.print(table)
    console.print(f"kits, archives and project.yml in {result.out_dir}")
    ca = "reused from the earlier run" if result.root_ca_reused else "new"
    console.print(f"root CA ({ca}) SHA-256 {result.root_ca_sha256}")
    console.print(
        f"Keep {result.out_dir / 'state'} (the root CA's private key) with the operator; "
        "give each participant only its own kit archive."
    )
    if result.he:
        console.print("HE is on: after any re-provisioning, give every hospital and the server their new kits.")
    return 0


def add_provision_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``provision`` to the ``hospital-fl`` subcommands.

    Args:
        sub: the top-level parser's subparsers (``parser.add_subparsers(dest="command")``).
    """
    p = sub.add_parser(
        "provision",
        help="make a signed FLARE startup kit per participant from the site configs",
        description="Render site_configs/ into a FLARE project.yml and run FLARE's provisioning: one startup kit "
        "(and zip archive) for the server, each hospital (with its local policies) and each admin.",
    )
    p.add_argument(
        "--site-configs",
        default="site_configs",
        help="folder with consortium.yaml and hospitals/*.yaml (default site_configs)",
    )
    p.add_argument(
        "--out",
        default="workspace/kits",
        help="where the kits go; an earlier run of the same project there is replaced and its root CA reused "
        "(default workspace/kits)",
    )
    p.set_defaults(func=_cmd_provision, command="provision")
