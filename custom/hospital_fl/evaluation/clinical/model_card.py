"""A model card for the federated pneumonia classifier: Markdown and a self-contained HTML page.

Built from plain data: report.json (evaluation.report.build_report) plus what the report does
not hold (the job name, each hospital's manifest hash and consent registry where its data
was ingested, per-site AUC intervals, plots) and any further evaluation sections (the
cross-site matrix, personalization, operating points, calibration, Grad-CAM), each a heading
with lines and an optional table. The HTML page embeds every plot as a base64
data URI and references nothing outside itself, so it can be mailed to an ethics board or
archived with the model.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = [
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LIMITATIONS",
    "CardSection",
    "HospitalData",
    "ModelCard",
    "Plot",
    "SitePrivacy",
    "SiteResult",
    "model_card_from_report",
    "render_model_card_html",
    "render_model_card_markdown",
    "write_model_card",
]

DEFAULT_INTENDED_USE = (
    "Research and demonstration of federated training: flags frontal chest X-rays suggestive of "
    "pneumonia for review by a radiologist. Not a diagnostic device; it must not be used to rule "
    "pneumonia out or to decide treatment."
)
DEFAULT_LIMITATIONS = (
    "Images are downsampled to 28 x 28 pixels: small opacities, lines and tubes are not visible to the model.",
    "Source data are paediatric chest X-rays from one centre (Guangzhou); adults and other populations are untested.",
    "Hospitals are a label-skewed split of one dataset: scanner, protocol and population shift is not represented.",
    "Binary label (pneumonia vs normal): no distinction between bacterial and viral pneumonia or other findings.",
)


@dataclass(frozen=True)
class HospitalData:
    name: str
    n_train: int
    n_test: int
    positive_fraction: float  # pneumonia share of the training portion
    manifest_sha256: str | None = None  # of the ingested site dataset's manifest, where there is one
    consent_registry: str | None = None  # which registry the site checked consent against


@dataclass(frozen=True)
class SitePrivacy:
    site: str
    mechanism: str | None  # None: no differential privacy at this site
    epsilon: float | None  # as the site reported it for the job (its bound under DP-SGD)
    delta: float | None


@dataclass(frozen=True)
class SiteResult:
    site: str
    n_test: int
    auc: float  # federated model on the site's local test
    auc_ci95: tuple[float, float] | None
    auc_local_only: float
    auc_centralized: float | None


@dataclass(frozen=True)
class Plot:
    caption: str
    path: Path


@dataclass(frozen=True)
class CardSection:
    """A further section of the card: a heading, bullet lines, then an optional table."""

    heading: str
    lines: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        bad = [r for r in self.rows if len(r) != len(self.header)]
        if bad:
            raise InputError(
                f"section {self.heading!r} rows",
                f"{len(bad)} row(s) of {len(bad[0])} cells under {len(self.header)} columns",
                "every row needs one cell per column",
                "build the rows with the header's columns",
            )


@dataclass(frozen=True)
class ModelCard:
    title: str
    intended_use: str
    limitations: tuple[str, ...]
    dataset: str
    dataset_sha256: str | None
    hospitals: tuple[HospitalData, ...]
    job: str
    algorithm: str
    rounds: int
    mode: str
    privacy: tuple[SitePrivacy, ...]
    federated_auc: float
    federated_auc_ci95: tuple[float, float]
    centralized_auc: float
    centralized_auc_ci95: tuple[float, float]
    local_only_mean_auc: float
    site_results: tuple[SiteResult, ...]
    failure_modes: tuple[str, ...]
    plots: tuple[Plot, ...] = ()
    sections: tuple[CardSection, ...] = ()  # shown after the results


def _require(report: Mapping, key: str, where: str = "report") -> object:
    if key not in report:
        raise InputError(
            f"{where}[{key!r}]",
            "missing",
            "a model card is built from report.json (evaluation.report.build_report)",
            "pass the report as build_report returned it",
        )
    return report[key]


def _pair(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def model_card_from_report(
    report: Mapping,
    *,
    job: str | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
    limitations: Sequence[str] = DEFAULT_LIMITATIONS,
    provenance: Mapping[str, Mapping[str, str]] | None = None,
    site_auc_ci95: Mapping[str, Sequence[float]] | None = None,
    known_failure_modes: Sequence[str] = (),
    plots: Mapping[str, str | Path] | None = None,
    dataset_sha256: str | None = None,
    title: str | None = None,
    sections: Sequence[CardSection] = (),
) -> ModelCard:
    """Assemble a ModelCard from report.json's content and what the report does not hold.

    Args:
        report: build_report's dict (or report.json loaded).
        job: the FLARE job name (default: report["settings"]["job"], else "unknown").
        intended_use / limitations: what the model is for and its known limits.
        provenance: {site: {"manifest_sha256": ..., "consent_registry": ...}} for hospitals
            whose data came through ingest (the embedded demo data has none).
        site_auc_ci95: {site: (low, high)} of the federated AUC on each site's test
            (e.g. the "global" row of the cross-site matrix); default: sites[i]["auc_ci95"].
        known_failure_modes: observed failure modes to list beside the report's flags.
        plots: {caption: PNG path}, embedded in the HTML page.
        dataset_sha256: hash of the dataset file (e.g. data.pneumoniamnist.EMBEDDED_SHA256).
        title: default "Federated <task> classifier".
        sections: further sections (e.g. evaluation.clinical_render.card_sections), shown after the results.

    Raises:
        InputError: a report key the card needs is missing, a provenance or CI entry
            names an unknown site, or a plot file does not exist.
    """
    sites = _require(report, "sites")
    fed, cen, loc = _require(report, "federated"), _require(report, "centralized"), _require(report, "local_only")
    privacy = report.get("privacy") or {}
    settings = report.get("settings") or {}
    names = [_require(s, "name", "sites[i]") for s in sites]
    for label, mapping in (("provenance", provenance), ("site_auc_ci95", site_auc_ci95)):
        unknown = sorted(set(mapping or {}) - set(names))
        if unknown:
            raise InputError(label, unknown, f"sites must be among the report's {names}", "use the FLARE client names")
    provenance, site_auc_ci95 = provenance or {}, site_auc_ci95 or {}
    hospitals = tuple(
        HospitalData(
            name=s["name"],
            n_train=int(_require(s, "n_train", "sites[i]")),
            n_test=int(_require(s, "n_test", "sites[i]")),
            positive_fraction=float(_require(s, "positive_fraction", "sites[i]")),
            manifest_sha256=provenance.get(s["name"], {}).get("manifest_sha256"),
            consent_registry=provenance.get(s["name"], {}).get("consent_registry"),
        )
        for s in sites
    )
    results = tuple(
        SiteResult(
            site=s["name"],
            n_test=int(s["n_test"]),
            auc=float(_require(s, "auc", "sites[i]")),
            auc_ci95=_pair(site_auc_ci95.get(s["name"], s.get("auc_ci95"))),
            auc_local_only=float(_require(s, "auc_local_only", "sites[i]")),
            auc_centralized=None if s.get("auc_centralized") is None else float(s["auc_centralized"]),
        )
        for s in sites
    )
    site_privacy = tuple(
        SitePrivacy(name, p["mechanism"], float(p["epsilon"]), float(p["delta"]))
        if (p := privacy.get(name))
        else SitePrivacy(name, None, None, None)
        for name in names
    )
    plot_entries = []
    for caption, path in (plots or {}).items():
        if not Path(path).is_file():
            raise InputError(f"plot {caption!r}", str(path), "the PNG must exist", "write the plots before the card")
        plot_entries.append(Plot(caption, Path(path)))
    return ModelCard(
        title=title or f"Federated {_require(report, 'task')} classifier",
        intended_use=intended_use,
        limitations=tuple(limitations),
        dataset=str(_require(report, "dataset")),
        dataset_sha256=dataset_sha256,
        hospitals=hospitals,
        job=job or settings.get("job") or "unknown",
        algorithm=str(settings.get("algorithm", "unknown")),
        rounds=int(_require(report, "rounds")),
        mode=str(report.get("mode", "unknown")),
        privacy=site_privacy,
        federated_auc=float(_require(fed, "auc", "federated")),
        federated_auc_ci95=_pair(_require(fed, "auc_ci95", "federated")),
        centralized_auc=float(_require(cen, "auc", "centralized")),
        centralized_auc_ci95=_pair(_require(cen, "auc_ci95", "centralized")),
        local_only_mean_auc=float(_require(loc, "mean_auc", "local_only")),
        site_results=results,
        failure_modes=tuple(report.get("flags") or ()) + tuple(known_failure_modes),
        plots=tuple(plot_entries),
        sections=tuple(sections),
    )


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" ({ci[0]:.3f}-{ci[1]:.3f})"


def _privacy_text(p: SitePrivacy) -> str:
    if p.mechanism is None:
        return "none"
    return f"{p.mechanism}, epsilon {p.epsilon:.2f} (delta {p.delta:g})"


def _sections(card: ModelCard) -> list[tuple[str, list[str] | list[list[str]], list[str] | None]]:
    """(heading, bullet lines or table rows, table header or None) in display order."""
    return [
        ("Intended use", [card.intended_use], None),
        ("Limitations", list(card.limitations), None),
        (
            "Data",
            [f"Dataset: {card.dataset}" + (f" (sha256 {card.dataset_sha256})" if card.dataset_sha256 else "")],
            None,
        ),
        (
            "",
            [
                [
                    h.name,
                    str(h.n_train),
                    str(h.n_test),
                    f"{h.positive_fraction:.2f}",
                    h.manifest_sha256 or "-",
                    h.consent_registry or "-",
                ]
                for h in card.hospitals
            ],
            ["hospital", "train images", "test images", "pneumonia share", "manifest sha256", "consent registry"],
        ),
        (
            "Training",
            [
                f"Job: {card.job}; algorithm: {card.algorithm}; rounds: {card.rounds}; run: {card.mode}",
                "Epsilon: the privacy loss each site reported for this job (the job's bound under DP-SGD).",
                "Comparison models (centralized, local-only) are trained without differential privacy.",
            ],
            None,
        ),
        ("", [[p.site, _privacy_text(p)] for p in card.privacy], ["hospital", "differential privacy"]),
        (
            "Results",
            [
                f"Federated AUC on the held-out test: {card.federated_auc:.3f}{_ci(card.federated_auc_ci95)}",
                f"Centralized (pooled data) AUC: {card.centralized_auc:.3f}{_ci(card.centralized_auc_ci95)}",
                f"Local-only, mean over hospitals: {card.local_only_mean_auc:.3f}",
            ],
            None,
        ),
        (
            "",
            [
                [
                    r.site,
                    str(r.n_test),
                    f"{r.auc:.3f}{_ci(r.auc_ci95)}",
                    f"{r.auc_local_only:.3f}",
                    "-" if r.auc_centralized is None else f"{r.auc_centralized:.3f}",
                ]
                for r in card.site_results
            ],
            ["hospital", "local test images", "federated AUC (95% CI)", "local-only AUC", "centralized AUC"],
        ),
        *_further_sections(card),
        ("Known failure modes", list(card.failure_modes) or ["none recorded"], None),
    ]


def _further_sections(card: ModelCard) -> list[tuple[str, list[str] | list[list[str]], list[str] | None]]:
    out = []
    for section in card.sections:
        out.append((section.heading, list(section.lines), None))
        if section.header:
            out.append(("", [list(r) for r in section.rows], list(section.header)))
    return out


def render_model_card_markdown(card: ModelCard) -> str:
    """The card as Markdown; plots are referenced by file name (the HTML page embeds them)."""
    lines = [f"# Model card: {card.title}", ""]
    for heading, body, header in _sections(card):
        if heading:
            lines += [f"## {heading}", ""]
        if header:
            lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        else:
            lines += [f"- {line}" for line in body]
        lines.append("")
    if card.plots:
        lines += ["## Plots", ""] + [f"- {p.caption}: {p.path.name}" for p in card.plots] + [""]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #999;padding:.2em .6em;text-align:left}"
    "figure{margin:1em 0}img{max-width:100%}"
)


def render_model_card_html(card: ModelCard) -> str:
    """The card as one HTML page with every plot embedded as a base64 PNG data URI; it
    references no external file, script, stylesheet or font."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Model card: {e(card.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Model card: {e(card.title)}</h1>",
    ]
    for heading, body, header in _sections(card):
        if heading:
            out.append(f"<h2>{e(heading)}</h2>")
        if header:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
        else:
            out.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in body) + "</ul>")
    if card.plots:
        out.append("<h2>Plots</h2>")
        for p in card.plots:
            data = base64.b64encode(p.path.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{e(p.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(p.caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


def write_model_card(card: ModelCard, out_dir: str | Path) -> tuple[Path, Path]:
    """Write model_card.md and model_card.html into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "model_card.md", out_dir / "model_card.html"
    md_path.write_text(render_model_card_markdown(card))
    html_path.write_text(render_model_card_html(card))
    return md_path, html_path
