"""Which kind of job a FLARE client app is, read from its config: the rule a hospital's
``allowed_job_types`` is enforced by.

A job's kind is the kind of its executors. The bundle's executors each train or compute
one kind of thing; an app whose executor is not one of them (custom code, a stock FLARE
executor) has no kind this bundle can vouch for, and a site that lists allowed job types
refuses it. Pure: reads a parsed config_fed_client.json, imports nothing from FLARE.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hospital_fl.provisioning.schema import JOB_TYPES

__all__ = ["EXECUTOR_JOB_TYPES", "executor_paths", "job_types_of", "job_type_refusal"]

# Executor class path -> the job type it runs. Every value is one of schema.JOB_TYPES.
EXECUTOR_JOB_TYPES: Mapping[str, str] = {
    "hospital_fl.flare.executor.CXRTrainExecutor": "cxr",
    "hospital_fl.flare.profile_job.SiteProfileExecutor": "profile",
    "hospital_fl.flare.seg_executor.SegTrainExecutor": "segmentation",
}
assert set(EXECUTOR_JOB_TYPES.values()) <= set(JOB_TYPES)


def executor_paths(client_config: Mapping) -> list[str]:
    """The class path of every executor a parsed config_fed_client.json names, in order."""
    paths = []
    for entry in client_config.get("executors") or []:
        executor = entry.get("executor") if isinstance(entry, Mapping) else None
        path = executor.get("path") or executor.get("name") if isinstance(executor, Mapping) else None
        paths.append(str(path))
    return paths


def job_types_of(client_config: Mapping) -> tuple[set[str], list[str]]:
    """(job types, unknown executor paths) of a client app's config."""
    paths = executor_paths(client_config)
    return {EXECUTOR_JOB_TYPES[p] for p in paths if p in EXECUTOR_JOB_TYPES}, [
        p for p in paths if p not in EXECUTOR_JOB_TYPES
    ]


def job_type_refusal(client_config: Mapping, allowed: Iterable[str], site: str = "this site") -> str:
    """Why ``site`` refuses the app, or "" when every executor is of an allowed job type."""
    allowed = sorted(set(allowed))
    types, unknown = job_types_of(client_config)
    if unknown:
        return (
            f"{site} refuses the job: executor {unknown[0]} is not one of hospital_fl's job types "
            f"({', '.join(sorted(EXECUTOR_JOB_TYPES))}); submit a job built from the bundle's recipes"
        )
    if not types:
        return f"{site} refuses the job: its client app names no executor, so it is no job type the site allows"
    refused = sorted(types - set(allowed))
    if refused:
        return (
            f"{site} refuses the job: job type {refused[0]!r} is not among the site's allowed_job_types "
            f"({', '.join(allowed) or 'none'}); submit it to other sites, or ask the site to add it to "
            "allowed_job_types in its site config and re-issue its kit"
        )
    return ""
