"""`hospital-fl export-jobs`, `resume-job` and `allow-components`: the job folders, the
continuation of a job whose server restarted, and the classes a site lets FLARE build."""

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


def _cmd_resume_job(args) -> int:
    from hospital_fl.flare.recipes.resume import continuation_job
    from hospital_fl.flare.runners.poc import interrupted_run

    run_dir = Path(args.server_run_dir)
    if not (run_dir / "app_server").is_dir():
        raise InputError(
            "server run folder",
            str(run_dir),
            "it must be the interrupted job's run folder in the server's workspace (it holds app_server/)",
            "on the server machine pass <server workspace>/<job id>, as the job's failure message names it",
        )
    job = interrupted_run(run_dir)
    folder = continuation_job(args.job_folder, args.out, job.resume_point())
    print(f"{folder}: rounds {job.rounds_completed}..{job.total_rounds - 1} of job {job.job_id}")
    print(f"submit it: `submit_job {folder.resolve()}` in the admin console")
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

    resume = sub.add_parser(
        "resume-job",
        help="write the continuation of a job whose server restarted (from its last saved round)",
        description="Run on the server machine after restarting the server: reads the interrupted job's run "
        "folder (rounds completed, saved global model, round history) and writes the job folder that "
        "continues it; submit that folder from the admin console.",
    )
    resume.add_argument("job_folder", help="the job folder that was submitted, e.g. jobs/cxr_fedavg_dp")
    resume.add_argument("--server-run-dir", required=True, help="<server workspace>/<job id> of the interrupted job")
    resume.add_argument("--out", default="jobs_resumed", help="where the continuation folder is written")
    resume.set_defaults(func=_cmd_resume_job)

    allow = sub.add_parser("allow-components", help="let a FLARE site build hospital_fl components")
    allow.add_argument("local_dir", help="the site's startup-kit local/ folder")
    allow.set_defaults(func=_cmd_allow_components)
