"""`hospital-fl provision`: the consortium operator's site configs -> signed startup kits."""

from __future__ import annotations

import argparse

__all__ = ["add_provision_commands"]


def _cmd_provision(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hospital_fl.flare.kits.provision import provision

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


def _cmd_add_site(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from hospital_fl.flare.kits.provision import add_site
    from hospital_fl.provisioning.schema import HOSPITALS_DIR

    added = add_site(args.site_configs, args.hospital_file, args.out)
    console = Console()
    size = added.kit.archive.stat().st_size / 1024
    console.print(
        f"{added.project}: added {added.kit.name} ({added.kit.org}) in {added.seconds:.2f} s; "
        f"kit {added.kit.archive} ({size:.0f} KiB), signed by the existing root CA SHA-256 {added.root_ca_sha256}"
    )
    console.print("Every kit issued before is unchanged; the running server accepts the new hospital as it is.")
    if added.he:
        console.print("The kit carries the hospitals' existing HE context: guard it like their kits.")
    hospitals = (Path(args.site_configs) / HOSPITALS_DIR).resolve()
    if Path(args.hospital_file).resolve().parent != hospitals:
        console.print(
            f"[yellow]Move {args.hospital_file} into {hospitals}/ so that a later full `hospital-fl provision` "
            "keeps this hospital.[/yellow]"
        )
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
        default="workspace/consortium",
        help="where the kits go; an earlier run of the same project there is replaced and its root CA reused "
        "(default workspace/consortium)",
    )
    p.set_defaults(func=_cmd_provision, command="provision")
    actions = p.add_subparsers(dest="action")
    add = actions.add_parser(
        "add-site",
        help="provision one more hospital with the existing root CA; issued kits stay untouched",
        description="FLARE's dynamic provisioning: a kit for a new hospital, signed by the consortium's existing "
        "root CA (and carrying its HE context), added to the earlier provisioning folder.",
    )
    add.add_argument("hospital_file", help="the new hospital's config, e.g. site_configs/hospitals/hospital-d.yaml")
    # SUPPRESS: one value whether given before or after add-site (the parent's default otherwise)
    add.add_argument(
        "--site-configs", default=argparse.SUPPRESS, help="folder with consortium.yaml (default site_configs)"
    )
    add.add_argument(
        "--out", default=argparse.SUPPRESS, help="the earlier provisioning folder (default workspace/consortium)"
    )
    add.set_defaults(func=_cmd_add_site, command="provision add-site")
