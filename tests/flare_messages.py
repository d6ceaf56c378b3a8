"""FLARE messages a site's filters receive, built as FLARE builds them (for tests)."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants


def site_context(site: str, job: str) -> FLContext:
    """The context of ``site`` running ``job``."""
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    return ctx


class ClientEngine:
    """What a site's components ask FLARE's client engine for: the workspace, and somewhere
    to fire events (recorded, so a test can read what was streamed)."""

    def __init__(self, root: Path | str, site: str | None = None):
        self.workspace = Workspace(str(root), site) if site else Workspace(str(root))
        self.events: list[tuple[str, object]] = []

    def get_workspace(self) -> Workspace:
        return self.workspace

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))


def site_with_engine(root: Path | str, site: str, job: str) -> FLContext:
    """The context of ``site`` running ``job`` in the FLARE workspace at ``root``."""
    ctx = site_context(site, job)
    ctx.set_prop(ReservedKey.ENGINE, ClientEngine(root, site), private=True, sticky=False)
    return ctx


def round_task(rnd: int) -> Shareable:
    """A task of round ``rnd``."""
    task = Shareable()
    task.set_header(AppConstants.CURRENT_ROUND, rnd)
    return task
