"""`hospital-fl` commands a hospital runs on its own data: ingest, consent audit, site check/profile/compare."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = ["add_site_commands"]


def _progress_factory(description: str):
    from hospital_fl.cli.progress import progress_bar

    def factory(total: int):
        progress = progress_bar()
        progress.start()
        task = progress.add_task(description, total=total)
        return (lambda: progress.advance(task)), progress.stop

    return factory


def _cmd_ingest(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hospital_fl.data.ingest.consent import ConsentPolicy, read_consent
    from hospital_fl.data.ingest.labels import read_labels
    from hospital_fl.data.ingest.pipeline import IngestConfig, ingest
    from hospital_fl.data.ingest.screening import ScreeningConfig

    cfg = IngestConfig(
        image_size=args.size,
        screening=ScreeningConfig(
            allowed_modalities=tuple(m.upper() for m in args.modalities),
            min_size=args.min_size,
            multiframe=args.multiframe,
        ),
        consent=ConsentPolicy(args.consent_window_days),
        burned_in=args.burned_in,
        workers=args.workers,
        deidentify_to=args.deidentify_to,
        copy_burned_in=args.copy_burned_in,
    )
    labels = read_labels(args.labels)
    consent = read_consent(args.consent)
    result = ingest(args.dicom_dir, labels, args.out, consent, cfg, progress_factory=_progress_factory("decoding"))
    report = result.report
    console = Console()
    table = Table(title=f"ingest: {report['accepted']} of {report['files']} files in the manifest")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    table.add_row("accepted", str(report["accepted"]))
    for reason, count in report["rejections_by_reason"].items():
        table.add_row(f"rejected: {reason}", str(count))
    table.add_row("labels without an image", str(len(report["labels_without_image"])))
    table.add_row("decoded / reused from cache", f"{report['decoded']} / {report['reused_from_cache']}")
    table.add_row("files with identifying tags", str(report["phi"]["files_with_identifying_tags"]))
    console.print(table)
    console.print(f"manifest: {result.manifest_path}\nreport (site-local, lists files): {result.report_path}")
    return 0


def _cmd_consent_audit(args) -> int:
    from hospital_fl.data.ingest.consent import ConsentPolicy, read_consent
    from hospital_fl.data.ingest.consent_audit import jobs_using_withdrawn_patients
    from hospital_fl.data.ingest.manifest import read_manifest

    manifest = read_manifest(args.site_data)
    registry = read_consent(args.consent or manifest.consent.get("registry", ""))
    window = args.consent_window_days if args.consent_window_days is not None else manifest.consent.get("window_days")
    rows = jobs_using_withdrawn_patients(args.site_data, registry, ConsentPolicy(window), state_dir=args.state)
    print(json.dumps({"jobs_using_patients_without_consent": rows}, indent=2))
    return 0


def _cmd_site_check(args) -> int:
    from rich.console import Console

    from hospital_fl.apps.site_check import SiteCheckConfig, exit_code, render_table, run_site_check

    cfg = SiteCheckConfig(
        manifest=args.manifest,
        kit_dir=args.kit,
        server=args.server,
        policy=args.policy,
        min_free_gb=args.min_free_gb,
        require_gpu=not args.no_gpu,
        workdir=args.workdir,
    )
    results = run_site_check(cfg)
    Console().print(render_table(results))
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return exit_code(results)


def _cmd_site_profile(args) -> int:
    import secrets
    import time

    from rich.console import Console

    from hospital_fl.data.ingest.profile import ProfileConfig
    from hospital_fl.data.ingest.profile_site import profile_site
    from hospital_fl.flare.profile_job import MAX_PROFILE_EPSILON, PROFILE_MECHANISM
    from hospital_fl.privacy.ledger import PrivacyLedger, Spend
    from hospital_fl.privacy.policy import SITE_POLICY_FILE, check_release, read_site_policy

    home = Path(args.site_home)
    policy = read_site_policy(home / "local")
    if policy is None:
        raise InputError(
            "--site-home",
            str(home),
            f"it holds no local/{SITE_POLICY_FILE}, so the release could not be checked against the site's budget",
            f"run `hospital-fl privacy init {home} --site SITE` first, or pass the site's kit or workspace root",
        )
    if policy.max_job_epsilon is None or policy.max_job_epsilon > MAX_PROFILE_EPSILON:
        policy = dataclasses.replace(policy, max_job_epsilon=MAX_PROFILE_EPSILON)
    ledger = PrivacyLedger(policy.ledger_path(home))
    ledger.check_against_audit()
    exact, released = profile_site(args.site_data, ProfileConfig(epsilon=args.epsilon))
    # checked against the caps and recorded before the release is written out
    job = f"site-profile@{time.strftime('%Y-%m-%dT%H:%M:%S')}-{secrets.token_hex(3)}"
    ledger.spend(
        job,
        [Spend.laplace(PROFILE_MECHANISM, args.epsilon)],
        lambda before, after: check_release(policy, job, before, after, {PROFILE_MECHANISM: 1}),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(released.to_dict(), indent=1))
    Console(stderr=True).print(
        f"released profile (Laplace, epsilon {args.epsilon}) written to {out}; exact counts stay here: "
        f"{exact.n_images} images, prevalence "
        + ", ".join(f"{n} {p:.3f}" for n, p in zip(exact.label_names, exact.prevalence) if p > 0)
    )
    return 0


def _cmd_site_compare(args) -> int:
    from hospital_fl.data.ingest.profile import SiteProfile
    from hospital_fl.data.ingest.shift import compare_profiles

    profiles = {}
    for path in args.profiles:
        name = Path(path).stem
        if name in profiles:
            raise InputError(
                "profiles",
                path,
                f"each site is named by its file name and {name!r} is given twice",
                "name each release after its site, e.g. site-1.json site-2.json",
            )
        profiles[name] = SiteProfile.from_dict(json.loads(Path(path).read_text()), source=str(path))
    report = compare_profiles(profiles)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_site_compare_federated(args) -> int:
    from hospital_fl.flare.profile_job import run_profile_in_simulator

    result = run_profile_in_simulator(args.site_data, args.sites, args.workspace, epsilon=args.epsilon)
    print(json.dumps(result["shift"], indent=2))
    return 0


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    ingest = sub.add_parser(
        "ingest", help="DICOM folder + label file -> a training-ready, consent-checked site dataset"
    )
    ingest.add_argument("dicom_dir", help="the folder of DICOM files exported from the PACS (searched recursively)")
    ingest.add_argument("--labels", required=True, help="ChestX-ray14 CSV or a file,label CSV")
    ingest.add_argument("--consent", required=True, help="consent registry CSV (patient_id,status,date)")
    ingest.add_argument("--out", required=True, help="the site dataset folder (manifest.json, images.npy, report)")
    ingest.add_argument("--size", type=int, default=224, help="model input size (224 densenet121, 28 compact)")
    ingest.add_argument("--modalities", nargs="+", default=["CR", "DX"], help="allowed modalities (default CR DX)")
    ingest.add_argument("--min-size", type=int, default=256, help="smallest rows/columns accepted (default 256)")
    ingest.add_argument("--multiframe", default="reject", help="reject (default) or first: keep frame 0")
    ingest.add_argument("--burned-in", default="flag", help="flag (default: list) or reject burned-in annotations")
    ingest.add_argument("--consent-window-days", type=int, default=None, help="consent older than this expires")
    ingest.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: one per core)")
    ingest.add_argument("--deidentify-to", default=None, help="also write de-identified copies (allow list) here")
    ingest.add_argument(
        "--copy-burned-in",
        action="store_true",
        help="also copy images whose pixels may show text (BurnedInAnnotation YES, secondary captures); "
        "only after reviewing them",
    )
    ingest.set_defaults(func=_cmd_ingest)

    consent = sub.add_parser("consent", help="consent checks on an ingested site dataset")
    csub = consent.add_subparsers(dest="consent_command", required=True)
    audit = csub.add_parser("audit", help="list the jobs that trained on patients whose consent is now revoked")
    audit.add_argument("site_data", help="the site dataset folder made by ingest")
    audit.add_argument(
        "--state",
        required=True,
        help="where the site's jobs recorded their data use: its FLARE workspace (/workspace in the Docker "
        "layout) or $HOSPITAL_FL_SITE_STATE/<site>",
    )
    audit.add_argument("--consent", default=None, help="today's registry (default: the one used at ingest)")
    audit.add_argument("--consent-window-days", type=int, default=None)
    audit.set_defaults(func=_cmd_consent_audit, command="consent audit")

    site = sub.add_parser("site", help="a hospital's onboarding preflight and data profile")
    ssub = site.add_subparsers(dest="site_command", required=True)
    check = ssub.add_parser("check", help="preflight: versions, GPU, disk, manifest, startup kit, server, policy")
    check.add_argument("--manifest", default=None, help="the site dataset folder made by ingest")
    check.add_argument("--kit", default=None, help="the site's FLARE startup kit folder")
    check.add_argument("--server", default=None, help="host:port of the FLARE server to reach")
    check.add_argument("--policy", default=None, help="the site's local/hospital_fl_privacy.json")
    check.add_argument("--min-free-gb", type=float, default=20.0, help="free disk needed (default 20)")
    check.add_argument("--no-gpu", action="store_true", help="do not require a CUDA GPU (CPU-only site)")
    check.add_argument("--workdir", default=".", help="where the disk check looks (default .)")
    check.add_argument("--json", action="store_true", help="also print the results as JSON")
    check.set_defaults(func=_cmd_site_check, command="site check")
    profile = ssub.add_parser("profile", help="the site's data profile, released with differential-privacy noise")
    profile.add_argument("site_data", help="the site dataset folder made by ingest")
    profile.add_argument("--epsilon", type=float, default=1.0, help="epsilon of this release (default 1)")
    profile.add_argument(
        "--site-home",
        required=True,
        help="the site's kit or workspace root (holds local/hospital_fl_privacy.json and the privacy ledger): "
        "the release is checked against its budget and recorded there",
    )
    profile.add_argument("--out", default="site_profile.json", help="the release to send (default site_profile.json)")
    profile.set_defaults(func=_cmd_site_profile, command="site profile")
    compare = ssub.add_parser("compare", help="compare released site profiles; flag label and covariate shift")
    compare.add_argument("profiles", nargs="+", help="released profile files; each site is named by its file name")
    compare.set_defaults(func=_cmd_site_compare, command="site compare")
    federated = ssub.add_parser(
        "compare-federated", help="run the profile comparison as a FLARE job (simulator, sites site-1..site-N)"
    )
    federated.add_argument("site_data", help="site dataset folder with {site} for the site name, e.g. data/{site}")
    federated.add_argument("--sites", type=int, required=True)
    federated.add_argument("--epsilon", type=float, default=1.0)
    federated.add_argument("--workspace", default="workspace")
    federated.set_defaults(func=_cmd_site_compare_federated, command="site compare-federated")
