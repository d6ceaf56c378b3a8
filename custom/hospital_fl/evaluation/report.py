"""The federated-vs-centralized-vs-local-only report (report.json and report.md).

report.json keys are a contract (extend, never rename): task, dataset, rounds, sites[],
federated, centralized, local_only, timing, communication, privacy, flags. The clinical
sections (evaluation.clinical_report) extend it with cross_site, personalization,
operating_points, calibration, gradcam and model_card, and each sites[i] with auc_ci95 and
auc_personalized (``attach_clinical``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hospital_fl.data.federated import FederatedDataset
from hospital_fl.evaluation.clinical_render import render_clinical_markdown
from hospital_fl.evaluation.scoring import ModelScores, summarize
from hospital_fl.training.metrics import rank_auc

__all__ = [
    "attach_clinical",
    "build_report",
    "outlier_sites",
    "render_markdown",
    "round_curve",
    "run_timing",
    "write_report",
]

DATASET_NAME = "PneumoniaMNIST (MedMNIST v2, 28x28, CC BY 4.0)"


def outlier_sites(site_aucs: dict[str, float], n_sd: float = 2.0, min_gap: float = 0.02) -> list[str]:
    """Sites whose AUC lies more than ``n_sd`` standard deviations, and at least ``min_gap``,
    below the other sites' mean.

    Each site is compared with the others (leave-one-out): with the site itself in the
    mean and SD, no site among five could ever be 2 SD below. ``min_gap`` keeps a site at
    0.990 among sites at 1.000 from being flagged: clinically that is no difference.
    """
    finite = {k: v for k, v in site_aucs.items() if np.isfinite(v)}
    flagged = []
    for name, value in finite.items():
        others = np.array([v for k, v in finite.items() if k != name])
        if len(others) >= 2 and value < others.mean() - max(n_sd * others.std(ddof=1), min_gap):
            flagged.append(name)
    return flagged


def run_timing(history: list[dict], wall_seconds: float) -> dict:
    """Wall time against training time: the sum over all sites, and the critical path
    (the slowest site of each round, summed), which is what a round waits for."""
    per_round = [[s.get("train_seconds") or 0.0 for s in entry["sites"]] for entry in history]
    total = float(sum(sum(r) for r in per_round))
    critical = float(sum(max(r, default=0.0) for r in per_round))
    return {
        "wall_seconds": wall_seconds,
        "client_train_seconds": total,
        "critical_path_train_seconds": critical,
        "overhead_ratio": wall_seconds / max(critical, 1e-9),
    }


def round_curve(history: list[dict]) -> list[dict]:
    """Per round: the sample-weighted mean of the AUCs sites measured on their local test
    data for the global model they received at the start of that round."""
    curve = []
    for entry in history:
        sites = [s for s in entry["sites"] if s.get("accepted") and "test_auc" in s.get("metrics", {})]
        if sites:
            auc = np.average([s["metrics"]["test_auc"] for s in sites], weights=[s["n_samples"] for s in sites])
            curve.append({"round": entry["round"], "site_weighted_test_auc": float(auc)})
    return curve


def privacy_by_site(history: list[dict]) -> dict[str, dict | None]:
    """Each site's DP mechanism and the epsilon it had spent on the job at its last
    accepted round (from what it reported), or None where the site ran no DP."""
    out: dict[str, dict | None] = {}
    for entry in history:
        for s in entry["sites"]:
            p = s.get("privacy")
            if s.get("accepted") and p:
                out[s["site"]] = {
                    "mechanism": p["mechanism"],
                    # a DP site reports the job's bound; its exact spend would reveal its count
                    "epsilon": p["epsilon_bound"] if "epsilon_bound" in p else p["site_epsilon_so_far"],
                    "delta": p["delta"],
                    "training_noise_multiplier": p.get("training_noise_multiplier"),
                    "sample_rate": p.get("sample_rate"),
                }
            else:
                out.setdefault(s["site"], None)
    return out


def build_report(
    *,
    task: str,
    mode: str,
    rounds: int,
    data: FederatedDataset,
    federated: ModelScores,
    centralized: ModelScores,
    local_only: dict[str, ModelScores],
    history: list[dict],
    wall_seconds: float,
    settings: dict,
) -> dict:
    """Assemble report.json from scores of the three kinds of model on the same data."""
    test_labels = data.held_out_test.labels
    fed = summarize(federated.held_out, test_labels)
    central = summarize(centralized.held_out, test_labels)
    local_held_out = {name: rank_auc(s.held_out, test_labels) for name, s in local_only.items()}

    site_privacy = privacy_by_site(history)
    central_dp = next((e["central_dp"] for e in reversed(history) if e.get("central_dp")), None)
    sites, fed_site_aucs = [], {}
    for site in data.sites:
        labels = site.test.labels
        fed_site_aucs[site.name] = rank_auc(federated.per_site[site.name], labels)
        sites.append(
            {
                "name": site.name,
                "n_train": len(site.train),
                "n_test": len(site.test),
                "positive_fraction": round(site.positive_fraction, 4),
                "auc": fed_site_aucs[site.name],
                "auc_local_only": rank_auc(local_only[site.name].per_site[site.name], labels),
                "auc_centralized": rank_auc(centralized.per_site[site.name], labels),
                "auc_local_only_on_held_out": local_held_out[site.name],
                "privacy": site_privacy.get(site.name),
            }
        )

    flags = [
        f"{name}: federated AUC {fed_site_aucs[name]:.3f} is more than 2 SD (and 0.02) below the other sites' mean"
        for name in outlier_sites(fed_site_aucs)
    ]
    flags += [
        f"{s['name']}: local test holds only {s['n_test']} images; its AUC is imprecise"
        for s in sites
        if s["n_test"] < 50
    ]
    per_round = [s for entry in history for s in entry["sites"]]
    rejected = [s for s in per_round if not s.get("accepted")]
    flags += [f"{s['site']}: an update was rejected ({s['reason']})" for s in rejected]
    payloads = [s["payload_bytes"] for s in per_round if s.get("payload_bytes")]
    raw_payloads = [s.get("uncompressed_bytes") or s["payload_bytes"] for s in per_round if s.get("payload_bytes")]
    by_site: dict[str, list[int]] = {}
    for s in per_round:
        if s.get("payload_bytes"):
            by_site.setdefault(s["site"], []).append(s["payload_bytes"])
    best_local = max(local_held_out.values())

    return {
        "task": task,
        "dataset": DATASET_NAME,
        "mode": mode,
        "rounds": rounds,
        "settings": settings,
        "complete": True,
        "sites": sites,
        "federated": {**fed, "min_site_auc": float(min(fed_site_aucs.values()))},
        "centralized": central,
        "local_only": {
            "mean_auc": float(np.mean(list(local_held_out.values()))),
            "best_auc": float(best_local),
            "best_site": max(local_held_out, key=local_held_out.get),
            "per_site_held_out_auc": local_held_out,
        },
        "comparison": {
            "federated_minus_centralized": fed["auc"] - central["auc"],
            "federated_minus_best_local": fed["auc"] - best_local,
        },
        "rounds_curve": round_curve(history),
        "timing": run_timing(history, wall_seconds),
        "communication": {
            # bytes of model data each site uploaded per round, as they crossed the wire
            # (compressed when the job compresses its uplink); the fp32 size beside it
            "bytes_per_round_per_site": int(np.mean(payloads)) if payloads else 0,
            "uncompressed_bytes_per_round_per_site": int(np.mean(raw_payloads)) if raw_payloads else 0,
            "per_site_bytes_per_round": {name: int(np.mean(v)) for name, v in sorted(by_site.items())},
            "uplink": settings.get("uplink", "none"),
            "downlink": settings.get("downlink", "none"),
        },
        # per site: mechanism, epsilon, delta (None: no DP at that site); the centralized and
        # local-only comparison models are always trained without DP
        "privacy": {s.name: site_privacy.get(s.name) for s in data.sites},
        "central_dp": central_dp,
        "flags": flags,
    }


CLINICAL_KEYS = ("cross_site", "personalization", "operating_points", "calibration", "gradcam", "model_card")
BASE_PLOTS = ("roc.png", "rounds.png", "sites.png")


def attach_clinical(
    report: dict,
    sections: dict,
    site_auc_ci95: dict[str, list[float]] | None = None,
    site_auc_personalized: dict[str, float] | None = None,
) -> dict:
    """``report`` extended with the clinical sections (keys among CLINICAL_KEYS) and, per site,
    the federated AUC's 95% CI and the personalized model's AUC; existing keys are kept as they are."""
    unknown = sorted(set(sections) - set(CLINICAL_KEYS))
    if unknown:
        raise ValueError(f"unknown clinical sections {unknown}; report.json takes {list(CLINICAL_KEYS)}")
    sites = [
        {
            **s,
            **({"auc_ci95": list(site_auc_ci95[s["name"]])} if site_auc_ci95 and s["name"] in site_auc_ci95 else {}),
            **(
                {"auc_personalized": site_auc_personalized[s["name"]]}
                if site_auc_personalized and s["name"] in site_auc_personalized
                else {}
            ),
        }
        for s in report["sites"]
    ]
    return {**report, "sites": sites, **sections}


def _privacy_line(privacy: dict, central_dp: dict | None) -> str:
    sites = {k: v for k, v in privacy.items() if v}
    if not sites and not central_dp:
        return "- privacy: none applied in this job (no differential privacy, no encryption)"
    parts = [f"{k} {v['mechanism']} eps={v['epsilon']:.2f}" for k, v in sites.items()]
    if central_dp:
        parts.append(f"server client-central eps={central_dp['epsilon']:.2f}")
    delta = next(iter(sites.values()))["delta"] if sites else central_dp["delta"]
    return f"- differential privacy (delta={delta:g}; baselines are non-private): " + "; ".join(parts)


def render_markdown(report: dict) -> str:
    """A human-readable report.md of ``report``."""
    fed, cen, loc = report["federated"], report["centralized"], report["local_only"]
    t = report["timing"]
    lines = [
        f"# Federated {report['task']} detection: {len(report['sites'])} hospitals, {report['rounds']} rounds ({report['mode']})",
        "",
        f"Dataset: {report['dataset']}. Held-out test: the official test split, seen by no hospital.",
        "",
        "| model | test AUC (95% CI) | accuracy | sensitivity | specificity | F1 |",
        "|---|---|---|---|---|---|",
        f"| federated | {fed['auc']:.3f} ({fed['auc_ci95'][0]:.3f}-{fed['auc_ci95'][1]:.3f}) | {fed['accuracy']:.3f} | "
        f"{fed['sensitivity']:.3f} | {fed['specificity']:.3f} | {fed['f1']:.3f} |",
        f"| centralized (pooled data) | {cen['auc']:.3f} ({cen['auc_ci95'][0]:.3f}-{cen['auc_ci95'][1]:.3f}) | "
        f"{cen['accuracy']:.3f} | {cen['sensitivity']:.3f} | {cen['specificity']:.3f} | {cen['f1']:.3f} |",
        f"| local-only, best site ({loc['best_site']}) | {loc['best_auc']:.3f} | | | | |",
        f"| local-only, mean of sites | {loc['mean_auc']:.3f} | | | | |",
        "",
        "## Per hospital (AUC on the hospital's own local test portion)",
        "",
        "| site | train images | local test | pneumonia share | federated | local-only | centralized |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["sites"]:
        lines.append(
            f"| {s['name']} | {s['n_train']} | {s['n_test']} | {s['positive_fraction']:.2f} | {s['auc']:.3f} | "
            f"{s['auc_local_only']:.3f} | {s['auc_centralized']:.3f} |"
        )
    lines += [
        "",
        f"Minimum site AUC (federated): {fed['min_site_auc']:.3f}",
        "",
        "## Cost",
        "",
        f"- wall time of the federated run: {t['wall_seconds']:.1f} s; training time of the slowest site, "
        f"summed over rounds: {t['critical_path_train_seconds']:.1f} s (all sites together: "
        f"{t['client_train_seconds']:.1f} s); overhead ratio (wall / slowest-site training) {t['overhead_ratio']:.2f}",
        f"- model upload per site per round: {report['communication']['bytes_per_round_per_site'] / 1e6:.3f} MB "
        f"(uplink {report['communication'].get('uplink', 'none')}; uncompressed "
        f"{report['communication'].get('uncompressed_bytes_per_round_per_site', 0) / 1e6:.3f} MB)",
        _privacy_line(report["privacy"], report.get("central_dp")),
        "",
        "## Flags",
        "",
    ]
    lines += [f"- {f}" for f in report["flags"]] or ["- none"]
    clinical = render_clinical_markdown(report)
    if clinical:
        lines += ["", clinical.rstrip("\n")]
    plots = list(BASE_PLOTS) + [
        report[k]["plot"] for k in CLINICAL_KEYS if isinstance(report.get(k), dict) and report[k].get("plot")
    ]
    lines += ["", "Plots: " + ", ".join(plots), ""]
    card = report.get("model_card")
    if card:
        lines += [f"Model card: {card['markdown']}; the whole report with every plot in one page: {card['html']}", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=float))
    md_path.write_text(render_markdown(report))
    return json_path, md_path
