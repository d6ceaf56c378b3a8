"""FLARE messages a site's filters receive, built as FLARE builds them (for tests)."""

from __future__ import annotations

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants


def site_context(site: str, job: str) -> FLContext:
    """The context of ``site`` running ``job``."""
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    return ctx


def round_task(rnd: int) -> Shareable:
    """A task of round ``rnd``."""
    task = Shareable()
    task.set_header(AppConstants.CURRENT_ROUND, rnd)
    return task
