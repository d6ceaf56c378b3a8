"""`hospital-fl status --html`: the consortium's status as one self-contained HTML page.

The tables of the terminal report (sites, job, rejections, privacy, certificates, failure
reasons) and plots of each site's training seconds and metrics per round, embedded as
base64 PNG data URIs: the page references no file, script, stylesheet or font, so it can be
mailed or archived as it is. All text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are only rendered to PNG
import matplotlib.pyplot as plt

from hospital_fl.operations.status import ConsortiumStatus, SiteRound

__all__ = ["render_status_html", "round_plots", "status_tables"]

_STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #999;padding:.2em .6em;text-align:left}"
    "figure{margin:1em 0}img{max-width:100%}.bad{color:#b00}"
)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def status_tables(status: ConsortiumStatus) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table the report shows, in order; shared by the terminal and the page."""
    tables = []
    tables.append(
        (
            "Hospitals",
            ["site", "connected", "last heartbeat", "age (s)", "job state"],
            [
                [
                    s.site,
                    "yes" if s.connected else "NO",
                    _fmt(s.last_heartbeat),
                    _fmt(s.heartbeat_age_s),
                    _fmt(s.job_state),
                ]
                for s in status.sites
            ],
        )
    )
    job = status.job
    if job is not None:
        rounds = f"{job.rounds_done} of {_fmt(job.total_rounds)} done"
        tables.append(
            (
                "Job",
                ["job id", "name", "status", "submitted", "rounds"],
                [[job.job_id, job.name, job.status, _fmt(job.submitted), rounds]],
            )
        )
    if status.rounds:
        metric_names = sorted({k for r in status.rounds for k in r.metrics})
        tables.append(
            (
                "Rounds per site",
                ["round", "site", "train seconds", "accepted", *metric_names],
                [
                    [str(r.round), r.site, _fmt(r.train_seconds), "yes" if r.accepted else "NO"]
                    + [_fmt(r.metrics.get(m), 4) for m in metric_names]
                    for r in status.rounds
                ],
            )
        )
    if status.rejections:
        tables.append(
            (
                "Rejected updates",
                ["round", "site", "reason"],
                [[str(r.round), r.site, _fmt(r.reason)] for r in status.rejections],
            )
        )
    if status.privacy:
        tables.append(
            (
                "Privacy released by the sites (exact spend and lifetime budgets stay at each site)",
                ["site", "mechanism", "job epsilon bound", "delta", "accountant", "rounds released"],
                [
                    [p.site, p.mechanism, _fmt(p.epsilon_bound), _fmt(p.delta), _fmt(p.accountant)]
                    + [f"{p.rounds_released} of {_fmt(p.total_rounds)}"]
                    for p in status.privacy
                ],
            )
        )
    if status.central_privacy is not None:
        c = status.central_privacy
        tables.append(
            (
                "Central DP at the server",
                ["epsilon spent", "delta", "noise multiplier", "rounds"],
                [[_fmt(c.epsilon_spent), _fmt(c.delta), _fmt(c.noise_multiplier), str(c.rounds)]],
            )
        )
    if status.failures:
        tables.append(
            (
                "Why sites failed the job",
                ["site", "kind", "reason", "read from"],
                [[f.site, f.kind, f.reason, f.source] for f in status.failures],
            )
        )
    if status.certificates:
        tables.append(
            (
                "Certificates",
                ["holder", "expires", "days left", "file"],
                [[c.holder, c.not_after, str(c.days_left), c.file] for c in status.certificates],
            )
        )
    if status.recent_jobs:
        tables.append(
            (
                "Recent jobs",
                ["job id", "name", "status", "submitted", "duration"],
                [
                    [_fmt(j.get(k)) for k in ("job_id", "job_name", "status", "submit_time", "duration")]
                    for j in status.recent_jobs
                ],
            )
        )
    return tables


def round_plots(rounds: Sequence[SiteRound]) -> list[tuple[str, bytes]]:
    """(caption, PNG) of each site's training seconds per round and of each metric per round."""
    if not rounds:
        return []
    sites = sorted({r.site for r in rounds})
    series = [("train_seconds", "training seconds per round")] + [
        (m, f"{m} per round") for m in sorted({k for r in rounds for k in r.metrics})
    ]
    plots = []
    for key, caption in series:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for site in sites:
            points = [
                (r.round, r.train_seconds if key == "train_seconds" else r.metrics.get(key))
                for r in rounds
                if r.site == site
            ]
            points = sorted((x, y) for x, y in points if y is not None)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=site)
        ax.set(xlabel="round", ylabel=key, title=caption)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        plots.append((caption, buffer.getvalue()))
    return plots


def render_status_html(status: ConsortiumStatus) -> str:
    """The status as one HTML page with its plots as data URIs."""
    e = html.escape
    title = f"Consortium status: {status.server} at {status.checked_at}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Server state: {e(status.server_state)}</p>",
    ]
    figures = [
        f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for caption, png in round_plots(status.rounds)
    ]
    for heading, header, rows in status_tables(status):
        out.append(f"<h2>{e(heading)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            bad = "NO" in row
            out.append(f"<tr{' class=bad' if bad else ''}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out.append("</table>")
        if heading == "Job" and figures:  # the plots next, before the long per-round table
            out += ["<h2>Per-site rounds</h2>", *figures]
            figures = []
    if figures:
        out += ["<h2>Per-site rounds</h2>", *figures]
    out.append("</body></html>")
    return "\n".join(out)
