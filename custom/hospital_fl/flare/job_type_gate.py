"""A hospital's allowed job types, enforced where FLARE deploys a job to the site.

``JobTypeValidator`` is the ``app_validator`` of the hospital's local/resources.json
(written by provisioning). FLARE runs it on every app deployed to the site, before
anything of the job starts, and a refusal fails the deployment to this site with the
reason in the server's deploy detail. The rule itself lives in
hospital_fl.provisioning.job_types.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.app_validation import AppValidator

from hospital_fl.errors import InputError
from hospital_fl.provisioning.job_types import job_type_refusal
from hospital_fl.provisioning.schema import JOB_TYPES

__all__ = ["JobTypeValidator", "CLIENT_CONFIG"]

CLIENT_CONFIG = Path("config") / "config_fed_client.json"


class JobTypeValidator(AppValidator):
    """Refuse apps whose executors are not of the site's allowed job types.

    Args:
        allowed_job_types: the job types the site accepts, among schema.JOB_TYPES.
        site: the site's name, for the refusal message.
    """

    def __init__(self, allowed_job_types: list[str], site: str = "this site"):
        super().__init__()
        for value in allowed_job_types:
            if value not in JOB_TYPES:
                raise InputError(
                    "app_validator allowed_job_types",
                    value,
                    f"it must be one of {', '.join(JOB_TYPES)}",
                    "correct the site config and re-issue the kit",
                )
        self.allowed_job_types = list(allowed_job_types)
        self.site = site

    def validate(self, app_folder: str) -> tuple[str, dict]:
        config_file = Path(app_folder) / CLIENT_CONFIG
        if not config_file.is_file():  # a server app (no client config) is not this validator's business
            return "", {}
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{self.site} refuses the job: {CLIENT_CONFIG} is not readable JSON ({err})", {}
        return job_type_refusal(config, self.allowed_job_types, self.site), {}
