"""`hospital-fl export-jobs` and `allow-components`: the job folders, and the classes a site lets FLARE build."""

from __future__ import annotations

import argparse
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = ["add_job_commands"]


def _cmd_export_jobs(args) -> int:
    from hospital_fl.flare.recipes.cross_site import export_cross_site_job
    from hospital_fl.flare.recipes.cxr import export_standard_jobs
    from hospital_fl.flare.recipes.seg import SEG_JOBS, export_seg_job

    for path in export_standard_jobs(args.jobs_dir) + [export_seg_job(s, args.jobs_dir) for s in SEG_JOBS.values()]:
        print(path)
    print(export_cross_site_job(args.jobs_dir, args.global_model))
    return 0


def _cmd_allow_components(args) -> int:
    from hospital_fl.flare.kits.site_policy import allow_bundle_components

    local_dir = Path(args.local_dir)
    if not local_dir.is_dir():
        raise InputError(
            "site local folder",
            str(local_dir),
            "it must be an existing startup-kit local/ folder",
            "pass the local/ folder of a provisioned site kit, e.g. prod_00/site-1/local",
        )
    print(allow_bundle_components(local_dir))
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export-jobs", help="write the standard job folders (cxr_*, cxr_fedavg_he, seg_fedavg, cxr_cross_site_eval)"
    )
    export.add_argument("--jobs-dir", default="jobs")
    export.add_argument(
        "--global-model",
        default="/workspace/models/global_model.pt",
        help="cxr_cross_site_eval: the trained global model's absolute path on the server machine",
    )
    export.set_defaults(func=_cmd_export_jobs)

    allow = sub.add_parser("allow-components", help="let a FLARE site build hospital_fl components")
    allow.add_argument("local_dir", help="the site's startup-kit local/ folder")
    allow.set_defaults(func=_cmd_allow_components)
