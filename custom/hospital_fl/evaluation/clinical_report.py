"""The clinical sections of the CXR report: per hospital, what a clinical team asks beyond one AUC.

Each section is plain data for report.json (new keys only: cross_site, personalization,
operating_points, calibration, gradcam), drawn as a plot where one helps; evaluation
.clinical_render writes them into report.md and the model card.

- cross_site: the matrix of cells the hospitals computed themselves in FLARE's cross-site
  evaluation (hospital_fl.flare.cross_site): every model on every hospital's local test.
- personalization: the global model fine-tuned on each hospital's own training data, beside
  the global, local-only and centralized models on that hospital's local test. A hospital
  runs this itself; the demo runs it in one process, site by site, each fine-tuning reading
  only that site's training portion.
- operating_points: sensitivity and specificity on each hospital's local test at the
  consortium threshold (chosen on every site's validation scores pooled, for the target
  sensitivity) and at the hospital's own threshold (chosen on its validation scores alone).
- calibration: ECE of the global model on each hospital's test and on the held-out test
  (federated and centralized), with a reliability diagram.
- gradcam: class activation maps (Grad-CAM, or HiResCAM for the compact network's flattening
  head) of a sample of correctly and wrongly classified held-out images, the occlusion
  check, and the caveat that goes with the maps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hospital_fl.data.federated import FederatedDataset
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.calibration import plot_reliability, reliability_diagram
from hospital_fl.evaluation.clinical.cross_site import CrossSiteMatrix, plot_cross_site
from hospital_fl.evaluation.clinical.gradcam import plot_gradcam, region_mass, region_occlusion_effect, sample_gradcam
from hospital_fl.evaluation.clinical.operating_point import (
    DEFAULT_TARGET_SENSITIVITY,
    sensitivity_specificity,
    site_operating_point,
    threshold_for_sensitivity,
)
from hospital_fl.evaluation.clinical.personalization import PersonalizationConfig, personalization_summary, personalize
from hospital_fl.evaluation.plots import save_figure
from hospital_fl.evaluation.scoring import ModelScores
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import predict_proba
from hospital_fl.training.metrics import rank_auc

__all__ = [
    "GRADCAM_CAVEAT",
    "ClinicalConfig",
    "calibration_section",
    "cross_site_section",
    "gradcam_section",
    "operating_point_section",
    "personalization_config",
    "personalization_section",
    "plot_personalization",
]

GRADCAM_CAVEAT = (
    "Maps are coarse (the compact network's last map is 4 x 4 at 28 x 28) and show where evidence for the "
    "predicted class lies, not that it is clinically right. The compact network flattens its map into a linear "
    "layer, so its maps are HiResCAM (gradient x activation per position): Grad-CAM's position-averaged "
    "weights misplace the evidence for such a head (tests/unit/test_clinical_gradcam.py: Grad-CAM favoured the "
    "lungs for 2 of 3 seeds, HiResCAM for 3 of 3). densenet121 pools globally and gets Grad-CAM. The occlusion "
    "check needs no gradient and confirms the direction."
)


def personalization_config(
    train: TrainConfig, epochs: int = 1, lr: float = 2e-4, select_on_validation: bool = True
) -> PersonalizationConfig:
    """Fine-tuning a site runs on its copy of the global model: ``epochs`` at a constant ``lr``
    (a tenth of the training peak: the global model is close to a good one already; a full
    learning rate measurably lowered site AUCs), with the job's other training settings; the
    site keeps the copy only when it beats the global model on its validation portion."""
    return PersonalizationConfig(
        epochs=epochs,
        train=dataclasses.replace(train, lr=lr, schedule="constant", torch_threads=0),
        select_on_validation=select_on_validation,
    )


@dataclass(frozen=True)
class ClinicalConfig:
    """Settings of the clinical sections.

    Attributes:
        personalization: how each site fine-tunes its copy of the global model.
        target_sensitivity: the sensitivity operating thresholds are chosen for.
        calibration_bins: equal-width bins of the reliability diagram and ECE.
        gradcam_correct / gradcam_incorrect: held-out images sampled for Grad-CAM.
        occlusion_images: held-out images the occlusion check averages over.
        n_boot: bootstrap resamples of the per-site AUC intervals computed here.
        seed: sampling seed (reproducible evaluation; not privacy randomness).
    """

    personalization: PersonalizationConfig = field(default_factory=lambda: personalization_config(TrainConfig()))
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    calibration_bins: int = 10
    gradcam_correct: int = 8
    gradcam_incorrect: int = 8
    occlusion_images: int = 256
    n_boot: int = 1000
    seed: int = 0


# ---------------------------------------------------------------- sections


def cross_site_section(
    matrix: CrossSiteMatrix, missing: dict[str, list[str]], plots_dir: Path | None = None, where: str = ""
) -> dict:
    """report.json's cross_site: the matrix (models x hospitals, AUC and 95% CI per cell)."""
    out = {
        **matrix.to_dict(),
        "how": where
        or "Each hospital scored every model on its own local test and sent only the AUC, its bootstrap 95% CI "
        "and its test count (FLARE's CrossSiteModelEval); rows: the global model(s) and each hospital's local "
        "model after its last training round",
        "missing": missing,
    }
    if plots_dir is not None:
        plot_cross_site(matrix, plots_dir / "cross_site.png")
        out["plot"] = "cross_site.png"
    return out


def personalization_section(
    global_model: torch.nn.Module,
    data: FederatedDataset,
    federated: ModelScores,
    centralized: ModelScores,
    local_only: dict[str, ModelScores],
    cfg: PersonalizationConfig,
    plots_dir: Path | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Fine-tune a copy of the global model at each site on that site's training data only.

    Returns:
        (report.json's personalization, {site: personalized model's probabilities on its local test}).
    """
    aucs, probs, fine_tuned, kept_global = {}, {}, {}, []
    for site in data.sites:
        personal = personalize(
            global_model, site.train.images, site.train.labels, cfg, validation=(site.val.images, site.val.labels)
        )
        if personal.kept_global:
            kept_global.append(site.name)
        probs[site.name] = predict_proba(personal.model, site.test.images, cfg.train.device)
        labels = site.test.labels
        aucs[site.name] = {
            "global": rank_auc(federated.per_site[site.name], labels),
            "personalized": rank_auc(probs[site.name], labels),
            "local_only": rank_auc(local_only[site.name].per_site[site.name], labels),
            "centralized": rank_auc(centralized.per_site[site.name], labels),
        }
        if personal.validation_aucs is not None:
            fine_tuned[site.name] = {
                "validation_global": personal.validation_aucs[0],
                "validation_fine_tuned": personal.validation_aucs[1],
            }
    summary = personalization_summary(aucs)
    gains = [s.gain for s in summary.sites]
    out = {
        **summary.to_dict(),
        "where": "Each hospital fine-tunes its own copy of the global model on its own training data (in the demo: "
        "in one process, site by site, each run reading only that site's data)",
        "config": {
            "epochs": cfg.epochs,
            "lr": cfg.train.lr,
            "schedule": cfg.train.schedule,
            "select_on_validation": cfg.select_on_validation,
        },
        "kept_global_after_validation": kept_global,
        "validation_aucs": fine_tuned,
        "at_least_global": sum(a["personalized"] >= a["global"] for a in aucs.values()),
        "mean_gain": float(np.mean(gains)),
        "lines": [s.line() for s in summary.sites],
    }
    if plots_dir is not None:
        plot_personalization(aucs, plots_dir / "personalization.png")
        out["plot"] = "personalization.png"
    return out, probs


def operating_point_section(
    global_model: torch.nn.Module,
    data: FederatedDataset,
    federated: ModelScores,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    device: str = "cpu",
) -> dict:
    """Per site: the global model's sensitivity/specificity on its local test at the consortium
    threshold and at its own threshold, both chosen for ``target_sensitivity`` on validation scores."""
    val = {s.name: predict_proba(global_model, s.val.images, device) for s in data.sites}
    pooled_labels = np.concatenate([s.val.labels for s in data.sites])
    consortium = threshold_for_sensitivity(
        pooled_labels, np.concatenate([val[s.name] for s in data.sites]), target_sensitivity
    )
    sites = {}
    for site in data.sites:
        test_probs = federated.per_site[site.name]
        entry: dict = {
            "consortium_threshold": sensitivity_specificity(site.test.labels, test_probs, consortium).to_dict()
        }
        try:
            entry["site_threshold"] = site_operating_point(
                site.val.labels, val[site.name], site.test.labels, test_probs, target_sensitivity
            ).to_dict()
        except InputError as err:  # e.g. a validation portion without a pneumonia case
            entry["site_threshold"] = None
            entry["site_threshold_error"] = str(err)
        sites[site.name] = entry
    return {
        "target_sensitivity": float(target_sensitivity),
        "consortium_threshold": consortium,
        "how": "Consortium threshold: chosen on every hospital's validation scores pooled; site threshold: on the "
        "hospital's own validation scores; both the highest threshold reaching the target sensitivity there, then "
        "applied unchanged to the hospital's local test",
        "sites": sites,
    }


def calibration_section(
    data: FederatedDataset,
    federated: ModelScores,
    centralized: ModelScores,
    n_bins: int = 10,
    plots_dir: Path | None = None,
) -> dict:
    """ECE of the global model on each hospital's local test and, beside the centralized model's,
    on the held-out test; a reliability diagram of the held-out test."""
    held = data.held_out_test.labels
    diagrams = {
        "federated": reliability_diagram(held, federated.held_out, n_bins),
        "centralized": reliability_diagram(held, centralized.held_out, n_bins),
    }
    out = {
        "n_bins": n_bins,
        "definition": "ECE of the pneumonia probability over equal-width bins (evaluation.clinical.calibration)",
        "held_out": {name: d.ece for name, d in diagrams.items()},
        "sites": {
            s.name: reliability_diagram(s.test.labels, federated.per_site[s.name], n_bins).ece for s in data.sites
        },
    }
    if plots_dir is not None:
        plot_reliability(diagrams, plots_dir / "reliability.png", title="Calibration on the held-out test")
        out["plot"] = "reliability.png"
    return out


def gradcam_section(
    global_model: torch.nn.Module, data: FederatedDataset, cfg: ClinicalConfig, plots_dir: Path | None = None
) -> dict:
    """Grad-CAM of correct and wrong held-out predictions, the map mass in the centre (lungs)
    against the corners per unit area, and the occlusion check."""
    held = data.held_out_test
    sample = sample_gradcam(
        global_model, held.images, held.labels, cfg.gradcam_correct, cfg.gradcam_incorrect, seed=cfg.seed
    )
    mass = region_mass(sample.maps)
    ratio = mass.ratio[np.isfinite(mass.ratio)]
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(held))[: cfg.occlusion_images]
    centre, corners = region_occlusion_effect(global_model, held.images[idx])
    out = {
        "method": sample.method,
        "target_layer": sample.target_layer,
        "n_correct": int(sample.correct.sum()),
        "n_incorrect": int((~sample.correct).sum()),
        "map_centre_over_corners_per_area_median": float(np.median(ratio)) if len(ratio) else None,
        "maps_favouring_centre": int((ratio > 1).sum()),
        "occlusion_logit_change": {"centre": centre, "corners": corners, "images": len(idx)},
        "caveat": GRADCAM_CAVEAT,
    }
    if plots_dir is not None:
        plot_gradcam(sample, plots_dir / "gradcam.png")
        out["plot"] = "gradcam.png"
    return out


def plot_personalization(aucs: dict[str, dict[str, float]], path: Path) -> Path:
    """Per hospital: AUC of the global, personalized, local-only and centralized models on its local test."""
    from hospital_fl.evaluation.clinical._figures import plt

    kinds = ("global", "personalized", "local_only", "centralized")
    names = list(aucs)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, kind in enumerate(kinds):
        ax.bar(x + (i - 1.5) * 0.2, [aucs[n][kind] for n in names], width=0.2, label=kind.replace("_", "-"))
    low = min(min(a.values()) for a in aucs.values())
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylabel="AUC on the hospital's local test", ylim=(max(0.0, low - 0.05), 1.0), title="Personalization")
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)
