"""What a hospital lets a job build, enforced where FLARE deploys a job to the site.

``JobTypeValidator`` is the ``app_validator`` of the hospital's local/resources.json
(written by provisioning). FLARE runs it on every app deployed to the site, before
anything of the job starts, and a refusal fails the deployment to this site with the
reason in the server's deploy detail. It refuses an app when

- any class its configs name (executors, components, workflows, filters, nested
  arguments, server config included) is not one the bundle's jobs use
  (hospital_fl.provisioning.allowed_components), or
- its executors are not of the site's allowed job types (hospital_fl.provisioning.job_types).

The configs are read with FLARE's own loader, so the file checked is the file FLARE will
build from (any format FLARE reads, wherever under config/ FLARE would find it).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.app_validation import AppValidator
from nvflare.apis.fl_constant import JobConstants
from nvflare.fuel.utils.config_factory import ConfigFactory

from hospital_fl.errors import InputError
from hospital_fl.provisioning.allowed_components import component_refusal
from hospital_fl.provisioning.job_types import job_type_refusal
from hospital_fl.provisioning.schema import JOB_TYPES

__all__ = ["JobTypeValidator", "CLIENT_CONFIG", "read_app_config"]

CLIENT_CONFIG = Path("config") / JobConstants.CLIENT_JOB_CONFIG
CONFIG_FOLDER = "config"


def read_app_config(app_folder: str | Path, config_name: str) -> tuple[dict | None, str]:
    """(parsed config or None when the app has none, its path relative to the app) as FLARE finds it.

    Raises:
        ValueError: the file FLARE would read does not parse (FLARE could not start the job either).
    """
    search_dir = Path(app_folder) / CONFIG_FOLDER
    fmt, found = ConfigFactory.search_config_format(config_name, [str(search_dir)])
    if found is None:
        return None, str(Path(CONFIG_FOLDER) / config_name)
    label = str(Path(found).relative_to(app_folder))
    loader = ConfigFactory.get_config_loader(fmt)
    if loader is None:  # FLARE finds the file but cannot read it: the job could not start
        raise ValueError(f"{label} is in a format this site cannot read ({fmt.value})")
    try:
        config = loader.load_config(file_path=found).to_dict()
    except Exception as err:  # any parse error: FLARE's loaders raise their own types
        raise ValueError(f"{label} does not parse ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{label} is not a JSON object")
    return config, label


class JobTypeValidator(AppValidator):
    """Refuse apps that name a class the bundle's jobs do not use, or whose executors are not
    of the site's allowed job types.

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
        configs = {}
        for name in (JobConstants.CLIENT_JOB_CONFIG, JobConstants.SERVER_JOB_CONFIG):
            try:
                config, label = read_app_config(app_folder, name)
            except (OSError, ValueError) as err:
                return f"{self.site} refuses the job: {err}", {}
            if config is None:
                continue
            refusal = component_refusal(config, label, self.site)
            if refusal:
                return refusal, {}
            configs[name] = config
        client = configs.get(JobConstants.CLIENT_JOB_CONFIG)
        if client is None:  # a server-only app runs nothing here; FLARE's default validator checks layout
            return "", {}
        return job_type_refusal(client, self.allowed_job_types, self.site), {}
