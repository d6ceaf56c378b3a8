"""The clinical sections of report.json (evaluation.clinical_report) as text: report.md's
sections (``render_clinical_markdown``) and the model card's (``card_sections``)."""

from __future__ import annotations

from hospital_fl.evaluation.clinical.model_card import CardSection

__all__ = ["card_sections", "render_clinical_markdown"]


def _ci(ci) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}"


def _cross_site_rows(cs: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("model \\ test data", *[f"{s} (n={n})" for s, n in zip(cs["sites"], cs["n_test"])])
    rows = [
        (model, *[f"{a:.3f} ({_ci(ci)})" for a, ci in zip(aucs, cis)])
        for model, aucs, cis in zip(cs["models"], cs["auc"], cs["ci95"])
    ]
    return header, rows


def _operating_rows(op: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = (
        "site",
        "consortium threshold: sensitivity / specificity",
        "site threshold",
        "site threshold: sensitivity / specificity",
    )
    rows = []
    for name, entry in op["sites"].items():
        c, s = entry["consortium_threshold"], entry["site_threshold"]
        own = (
            ("-", entry.get("site_threshold_error", "-"))
            if s is None
            else (
                f"{s['threshold']:.3f}",
                f"{s['test']['sensitivity']:.3f} / {s['test']['specificity']:.3f}",
            )
        )
        rows.append((name, f"{c['sensitivity']:.3f} / {c['specificity']:.3f}", *own))
    return header, rows


_CAM_NAMES = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}


def _gradcam_lines(g: dict) -> list[str]:
    occ = g["occlusion_logit_change"]
    median = g["map_centre_over_corners_per_area_median"]
    return [
        f"{g['n_correct']} correct and {g['n_incorrect']} wrong held-out predictions; target layer {g['target_layer']}",
        f"{_CAM_NAMES.get(g.get('method', 'gradcam'), 'Grad-CAM')} mass, centre (lungs) over corners per unit area: median "
        + ("n/a" if median is None else f"{median:.2f}")
        + f"; {g['maps_favouring_centre']} of {g['n_correct'] + g['n_incorrect']} maps favour the centre",
        (
            f"Occlusion check ({occ['images']} held-out images): mean |logit change| {occ['centre']:.3f} when the "
            f"centre is greyed, {occ['corners']:.3f} for the corners (equal areas)"
        ),
        g["caveat"],
    ]


def render_clinical_markdown(report: dict) -> str:
    """The clinical sections of report.md ("" when the report has none)."""
    lines: list[str] = []
    cs = report.get("cross_site")
    if cs and cs.get("models"):
        header, rows = _cross_site_rows(cs)
        lines += ["## Cross-site evaluation (AUC, bootstrap 95% CI)", "", f"{cs['how']}.", ""]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [
            f"- not scored everywhere: {m} (no cell from {', '.join(s)})" for m, s in cs["missing"].items()
        ]
        lines += ["", "Heatmap: cross_site.png", ""]
    elif cs:
        lines += ["## Cross-site evaluation", "", f"Not run: {cs.get('not_run', 'unknown reason')}", ""]
    p = report.get("personalization")
    if p:
        lines += [
            "## Personalization (global model fine-tuned at each hospital)",
            "",
            (
                f"{p['where']}; {p['config']['epochs']} epoch(s) at lr {p['config']['lr']:g}"
                + (
                    "; a hospital keeps its fine-tuned copy only where it beats the global model on its validation "
                    f"portion (it kept the global model at: {', '.join(p['kept_global_after_validation']) or 'none'})"
                    if p["config"].get("select_on_validation")
                    else ""
                )
                + ". Personalized >= "
                f"global at {p['at_least_global']} of {len(p['sites'])} hospitals; mean change "
                f"{p['mean_gain']:+.4f} AUC (changes below {p['min_gain']:g} count as no clear change)."
            ),
            "",
            *[f"- {line}" for line in p["lines"]],
            "",
        ]
    op = report.get("operating_points")
    if op:
        header, rows = _operating_rows(op)
        lines += [
            f"## Operating points (target sensitivity {op['target_sensitivity']:g})",
            "",
            f"{op['how']}. Consortium threshold: {op['consortium_threshold']:.3f}.",
            "",
            "| " + " | ".join(header) + " |",
            "|---" * len(header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows],
            "",
        ]
    cal = report.get("calibration")
    if cal:
        lines += [
            f"## Calibration ({cal['n_bins']} equal-width bins)",
            "",
            f"{cal['definition']}.",
            "",
            "- held-out test: " + ", ".join(f"{k} ECE {v:.3f}" for k, v in cal["held_out"].items()),
            "- global model per hospital: " + ", ".join(f"{k} {v:.3f}" for k, v in cal["sites"].items()),
            "",
        ]
    g = report.get("gradcam")
    if g:
        lines += [
            "## Class activation maps, Grad-CAM family (gradcam.png)",
            "",
            *[f"- {line}" for line in _gradcam_lines(g)],
            "",
        ]
    return "\n".join(lines)


def card_sections(report: dict) -> tuple[CardSection, ...]:
    """The clinical sections of report.json as model-card sections (Markdown and HTML)."""
    out = []
    cs = report.get("cross_site")
    if cs and cs.get("models"):
        header, rows = _cross_site_rows(cs)
        out.append(CardSection("Cross-site evaluation (AUC, 95% CI)", (cs["how"],), header, tuple(rows)))
    p = report.get("personalization")
    if p:
        out.append(
            CardSection(
                "Personalization",
                (
                    p["where"],
                    (
                        f"Personalized >= global at {p['at_least_global']} of {len(p['sites'])} hospitals; mean "
                        f"change {p['mean_gain']:+.4f} AUC"
                    ),
                    *p["lines"],
                ),
            )
        )
    op = report.get("operating_points")
    if op:
        header, rows = _operating_rows(op)
        out.append(
            CardSection(
                f"Operating points (target sensitivity {op['target_sensitivity']:g})",
                (op["how"], f"Consortium threshold: {op['consortium_threshold']:.3f}"),
                header,
                tuple(rows),
            )
        )
    cal = report.get("calibration")
    if cal:
        out.append(
            CardSection(
                "Calibration",
                (cal["definition"],),
                ("test data", "model", "ECE"),
                tuple(("held-out", k, f"{v:.3f}") for k, v in cal["held_out"].items())
                + tuple((k, "global", f"{v:.3f}") for k, v in cal["sites"].items()),
            )
        )
    g = report.get("gradcam")
    if g:
        out.append(CardSection("Where the model looks (class activation maps)", tuple(_gradcam_lines(g))))
    return tuple(out)
