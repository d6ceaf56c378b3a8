"""The server's record of who ran which job: FLARE job events -> the hash-chained audit trail.

``JobAuditor`` is a component of the server's local/resources.json (provisioning puts it
there). It appends to ``<server workspace>/audit.jsonl`` when a job is deployed (with its
submitter, as FLARE's job meta names them after checking their certificate), and when it
completes or is aborted, including jobs that never started because a site refused them.
Auditing never stops a job: a failed append is logged as an error.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey

from hospital_fl.audit import AUDIT_FILE, append_event

__all__ = ["JobAuditor", "job_details"]

_EVENTS = {
    EventType.JOB_DEPLOYED: "job.deployed",
    EventType.JOB_COMPLETED: "job.completed",
    EventType.JOB_ABORTED: "job.aborted",
}


def job_details(job_id: str, meta: dict) -> tuple[str, dict]:
    """(actor, details) of a job from its FLARE meta: the submitter and what the job asked for."""
    sites = sorted({s for targets in (meta.get(JobMetaKey.DEPLOY_MAP.value) or {}).values() for s in targets})
    actor = meta.get(JobMetaKey.SUBMITTER_NAME.value) or "unknown submitter"
    return actor, {
        "job_id": job_id,
        "job_name": meta.get(JobMetaKey.JOB_NAME.value, ""),
        "submitter_org": meta.get(JobMetaKey.SUBMITTER_ORG.value, ""),
        "submitter_role": meta.get(JobMetaKey.SUBMITTER_ROLE.value, ""),
        "sites": sites,
        "scope": meta.get(JobMetaKey.SCOPE.value, ""),
        "status": meta.get(JobMetaKey.STATUS.value, ""),
    }


class JobAuditor(FLComponent):
    """Append each job's deployment and end to the server's audit trail.

    Args:
        trail: the trail file, relative to the server's workspace (default audit.jsonl).
    """

    def __init__(self, trail: str = AUDIT_FILE):
        super().__init__()
        self.trail = trail

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        event = _EVENTS.get(event_type)
        if event is None:
            return
        data = fl_ctx.get_prop(FLContextKey.EVENT_DATA) or {}
        job_id = (data.get(JobMetaKey.JOB_ID.value) if isinstance(data, dict) else None) or fl_ctx.get_prop(
            FLContextKey.CURRENT_JOB_ID
        )
        try:
            engine = fl_ctx.get_engine()
            job = engine.job_def_manager.get_job(job_id, fl_ctx) if job_id else None
            actor, details = job_details(str(job_id), dict(job.meta) if job else {})
            path = Path(engine.get_workspace().get_root_dir()) / self.trail
            append_event(path, event, actor, details)
        except Exception as err:  # the audit must not take the job down with it
            self.log_error(fl_ctx, f"could not append {event} for job {job_id} to the audit trail: {err}")
