"""The cross-site matrix: every model scored on every hospital's own test data.

Rows are models (the global model and each hospital's local-only model), columns are
hospitals' test data, each cell an AUC with its bootstrap 95% CI. Models travel to the
sites; images never leave them: a site scores each model on its own test data and submits
(labels, scores), or only the cell it computed with ``score_cell``.

Submissions are ``{submitting site: {model name: scores}}``, the submitting site being the
identity the transport authenticated (FLARE's client name), never a field the site wrote.
``scores`` is ``(y_true, y_score)`` (computed on the submitter's own data) or a
``SiteScores`` that names the data it was computed on; a SiteScores naming another site's
data is refused: a site cannot hold, so cannot score, another hospital's test images, and a
cell filled that way would be unverifiable.

What the federated job sends is the smaller form: each site computes its cell itself
(``site_cell``: AUC, percentile bootstrap 95% CI, test count, the site's own name) and only
that travels; ``matrix_from_cells`` checks and assembles those cells under the same rules
(the cell names the sender's own data, every site scored the same models on one test set).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical._checks import binary_labels_and_scores
from hospital_fl.evaluation.clinical.bootstrap import ConfidenceInterval, bootstrap_auc

__all__ = [
    "CrossSiteMatrix",
    "SiteCell",
    "SiteScores",
    "build_cross_site_matrix",
    "complete_models",
    "cross_site_markdown",
    "matrix_from_cells",
    "plot_cross_site",
    "score_cell",
    "site_cell",
    "validate_submissions",
]


@dataclass(frozen=True)
class SiteScores:
    """One model's scores on one site's test data, with the site whose data they came from."""

    data_site: str
    y_true: np.ndarray
    y_score: np.ndarray


Submission = SiteScores | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class CrossSiteMatrix:
    """AUC with CI of each model (row) on each hospital's test data (column)."""

    models: tuple[str, ...]
    sites: tuple[str, ...]
    cells: tuple[tuple[ConfidenceInterval, ...], ...]  # cells[model][site]
    n_test: tuple[int, ...]  # test images per site (column)

    def cell(self, model: str, site: str) -> ConfidenceInterval:
        return self.cells[self.models.index(model)][self.sites.index(site)]

    def auc_array(self) -> np.ndarray:
        """(models, sites) AUC point estimates."""
        return np.array([[c.estimate for c in row] for row in self.cells])

    def to_dict(self) -> dict:
        """Plain data for report.json: {"models", "sites", "n_test", "auc", "ci95"}."""
        return {
            "models": list(self.models),
            "sites": list(self.sites),
            "n_test": list(self.n_test),
            "auc": [[c.estimate for c in row] for row in self.cells],
            "ci95": [[[c.low, c.high] for c in row] for row in self.cells],
        }


def _as_site_scores(submitter: str, model: str, entry: Submission) -> SiteScores:
    if isinstance(entry, SiteScores):
        return entry
    if isinstance(entry, tuple) and len(entry) == 2:
        return SiteScores(submitter, *entry)
    raise InputError(
        f"submission of {submitter} for model {model}",
        type(entry).__name__,
        "it must be (y_true, y_score) or a SiteScores",
        "send the labels and scores of the site's own test images",
    )


def validate_submissions(
    submissions: Mapping[str, Mapping[str, Submission]], sites: tuple[str, ...] | list[str] | None = None
) -> dict[str, dict[str, SiteScores]]:
    """Check the submissions and normalise them to {site: {model: SiteScores}}.

    Rules: each entry was computed on the submitter's own data; every site submits the same
    models; within a site every model was scored on the same labels (the same test set);
    labels binary and scores probabilities, one per label; with ``sites`` given, exactly
    those hospitals submitted.

    Raises:
        InputError: naming the site, the model and the broken rule.
    """
    if not submissions:
        raise InputError("submissions", {}, "at least one site must submit scores", "collect each site's scores first")
    if sites is not None and set(sites) != set(submissions):
        raise InputError(
            "submitting sites",
            sorted(submissions),
            f"exactly the hospitals {sorted(sites)} must submit",
            "wait for the missing sites, or drop the extra ones from the evaluation",
        )
    first_site = next(iter(submissions))
    models = tuple(submissions[first_site])
    out: dict[str, dict[str, SiteScores]] = {}
    for submitter, by_model in submissions.items():
        if tuple(sorted(by_model)) != tuple(sorted(models)):
            raise InputError(
                f"models scored by {submitter}",
                sorted(by_model),
                f"every site must score the same models as {first_site} ({sorted(models)})",
                "send every site the same set of models to score",
            )
        out[submitter] = {}
        reference: np.ndarray | None = None
        for model in models:
            entry = _as_site_scores(submitter, model, by_model[model])
            if entry.data_site != submitter:
                raise InputError(
                    f"{submitter}'s scores for model {model}",
                    f"computed on {entry.data_site}'s test data",
                    "a site may only submit scores computed on its own test data",
                    f"let {entry.data_site} score the model on its own data and submit them itself",
                )
            labels, scores = binary_labels_and_scores(entry.y_true, entry.y_score)
            if reference is None:
                reference = labels
            elif len(labels) != len(reference) or (labels != reference).any():
                raise InputError(
                    f"{submitter}'s labels for model {model}",
                    f"{len(labels)} labels, {int(labels.sum())} positive",
                    f"every model must be scored on the same test set ({len(reference)} labels, "
                    f"{int(reference.sum())} positive for {models[0]})",
                    "score all models on the site's one test split, in the same order",
                )
            out[submitter][model] = SiteScores(submitter, labels.astype(np.int64), scores)
    return out


def score_cell(y_true: np.ndarray, y_score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> ConfidenceInterval:
    """One cell: AUC with percentile bootstrap 95% CI (a site can compute it itself)."""
    return bootstrap_auc(y_true, y_score, n_boot=n_boot, seed=seed)


def build_cross_site_matrix(
    submissions: Mapping[str, Mapping[str, Submission]],
    *,
    sites: tuple[str, ...] | list[str] | None = None,
    models: tuple[str, ...] | list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> CrossSiteMatrix:
    """Validate the submissions and compute every cell.

    Args:
        submissions: {submitting site: {model name: (y_true, y_score) | SiteScores}}.
        sites: the expected hospitals, in column order (default: submission order).
        models: row order (default: the first site's order), e.g. ("global", "local site-1", ...).
        n_boot / seed: bootstrap settings of every cell's CI.
    """
    checked = validate_submissions(submissions, sites)
    columns = tuple(sites) if sites is not None else tuple(checked)
    present = tuple(next(iter(checked.values())))
    rows = tuple(models) if models is not None else present
    if sorted(rows) != sorted(present):
        raise InputError("models", list(rows), f"they must be the submitted models {sorted(present)}", "list each once")
    cells = tuple(
        tuple(score_cell(checked[s][m].y_true, checked[s][m].y_score, n_boot, seed) for s in columns) for m in rows
    )
    n_test = tuple(len(checked[s][rows[0]].y_true) for s in columns)
    return CrossSiteMatrix(models=rows, sites=columns, cells=cells, n_test=n_test)


@dataclass(frozen=True)
class SiteCell:
    """One model's AUC with its bootstrap CI, computed by a site on its own test data.

    This is all a site sends for a cell of the matrix: no image, label or per-image score.
    ``data_site`` is the site's own name; the receiver compares it with the sender's
    authenticated identity.
    """

    data_site: str
    auc: ConfidenceInterval
    n_test: int

    METRIC_KEYS = ("data_site", "auc", "auc_ci_low", "auc_ci_high", "ci_level", "n_boot", "n_skipped", "n_test")

    def to_metrics(self) -> dict:
        """Flat plain values, as a validation reply's metrics carry them."""
        a = self.auc
        return {
            "data_site": self.data_site,
            "auc": a.estimate,
            "auc_ci_low": a.low,
            "auc_ci_high": a.high,
            "ci_level": a.level,
            "n_boot": a.n_boot,
            "n_skipped": a.n_skipped,
            "n_test": self.n_test,
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping, where: str) -> SiteCell:
        """Read a cell back from ``to_metrics``' form, checking every value.

        Raises:
            InputError: naming ``where`` (e.g. "site-2's cell for model global"), when a key is
                missing or a value is out of range.
        """
        missing = [k for k in cls.METRIC_KEYS if k not in (metrics or {})]
        if missing:
            raise InputError(
                where,
                sorted(metrics or {}),
                f"a cross-site cell holds {list(cls.METRIC_KEYS)}",
                "let the site score the model with evaluation.clinical.cross_site.site_cell",
            )
        try:
            low, estimate, high = (float(metrics[k]) for k in ("auc_ci_low", "auc", "auc_ci_high"))
            n_test, n_boot, n_skipped = (int(metrics[k]) for k in ("n_test", "n_boot", "n_skipped"))
            level = float(metrics["ci_level"])
        except (TypeError, ValueError) as err:
            raise InputError(
                where, dict(metrics), f"values must be numbers ({err})", "send the cell as computed"
            ) from err
        if not (0 <= low <= estimate <= high <= 1) or n_test < 1 or not 0 <= n_skipped <= n_boot or not 0 < level < 1:
            raise InputError(
                where,
                {"auc": estimate, "ci": (low, high), "n_test": n_test, "n_boot": n_boot, "n_skipped": n_skipped},
                "an AUC and its interval satisfy 0 <= low <= auc <= high <= 1, with n_test >= 1 and "
                "0 <= n_skipped <= n_boot",
                "send the cell as site_cell computed it",
            )
        return cls(str(metrics["data_site"]), ConfidenceInterval(estimate, low, high, level, n_boot, n_skipped), n_test)


def site_cell(data_site: str, y_true: np.ndarray, y_score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> SiteCell:
    """The cell a site computes on its own test data: AUC, bootstrap 95% CI and test count."""
    labels, _ = binary_labels_and_scores(y_true, y_score)
    return SiteCell(data_site, score_cell(y_true, y_score, n_boot, seed), len(labels))


def complete_models(
    cells: Mapping[str, Mapping[str, Mapping | SiteCell | None]], sites: tuple[str, ...] | list[str]
) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """(models every site returned a cell for, {model: sites that returned none}).

    An empty entry (``{}`` or None) is a site that failed or declined to score that model
    (FLARE records it so); a model missing anywhere cannot fill a row of the matrix.
    """
    models: list[str] = []
    for by_model in cells.values():
        models += [m for m in by_model if m not in models]
    missing = {m: [s for s in sites if not (cells.get(s) or {}).get(m)] for m in models}
    return tuple(m for m in models if not missing[m]), {m: v for m, v in missing.items() if v}


def matrix_from_cells(
    cells: Mapping[str, Mapping[str, Mapping | SiteCell]],
    *,
    sites: tuple[str, ...] | list[str],
    models: tuple[str, ...] | list[str],
) -> CrossSiteMatrix:
    """The matrix from cells the sites computed themselves.

    Args:
        cells: {sender: {model: SiteCell or its to_metrics() dict}}, the sender being the
            identity the transport authenticated (FLARE's client name).
        sites: the hospitals, in column order; exactly these must have sent cells.
        models: the rows, in order; every site must have sent a cell for each.

    Raises:
        InputError: a sender that is not one of ``sites`` (or a site that sent nothing), a
            cell naming another site's data, a missing cell, or one site's cells counting
            different test sets.
    """
    senders = set(cells)
    if senders != set(sites):
        raise InputError(
            "cross-site senders",
            sorted(senders),
            f"exactly the hospitals {sorted(sites)} must send cells (keyed by their authenticated names)",
            "wait for the missing sites; drop results from any other sender",
        )
    columns = []
    for site in sites:
        column, n_test = [], None
        for model in models:
            where = f"{site}'s cell for model {model}"
            entry = cells[site].get(model)
            if not entry:
                raise InputError(where, entry, "every site must score every model", "wait for the site's result")
            cell = entry if isinstance(entry, SiteCell) else SiteCell.from_metrics(entry, where)
            if cell.data_site != site:
                raise InputError(
                    where,
                    f"computed on {cell.data_site}'s test data",
                    "a site may only send cells computed on its own test data",
                    f"let {cell.data_site} score the model on its own data and send the cell itself",
                )
            if n_test is not None and cell.n_test != n_test:
                raise InputError(
                    where,
                    f"{cell.n_test} test images",
                    f"every model must be scored on the site's one test set ({n_test} images for {models[0]})",
                    "score all models on the site's one local test split",
                )
            n_test = cell.n_test
            column.append(cell)
        columns.append((column, n_test))
    return CrossSiteMatrix(
        models=tuple(models),
        sites=tuple(sites),
        cells=tuple(tuple(columns[j][0][i].auc for j in range(len(sites))) for i in range(len(models))),
        n_test=tuple(n for _, n in columns),
    )


def cross_site_markdown(matrix: CrossSiteMatrix) -> str:
    """A Markdown table: one row per model, one column per hospital, "AUC (low-high)"."""
    header = "| model \\ test data | " + " | ".join(f"{s} (n={n})" for s, n in zip(matrix.sites, matrix.n_test)) + " |"
    lines = [header, "|---" * (len(matrix.sites) + 1) + "|"]
    for model, row in zip(matrix.models, matrix.cells):
        lines.append(f"| {model} | " + " | ".join(f"{c.estimate:.3f} ({c.low:.3f}-{c.high:.3f})" for c in row) + " |")
    return "\n".join(lines)


def plot_cross_site(
    matrix: CrossSiteMatrix, path: str | Path, title: str = "AUC of each model on each hospital's test data"
) -> Path:
    """Heatmap of the matrix, each cell annotated with its AUC and 95% CI; writes a PNG."""
    from hospital_fl.evaluation.clinical._figures import plt, save_figure

    aucs = matrix.auc_array()
    fig, ax = plt.subplots(figsize=(1.6 * len(matrix.sites) + 2.5, 0.7 * len(matrix.models) + 1.8))
    image = ax.imshow(aucs, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix.cells):
        for j, c in enumerate(row):
            ax.text(
                j,
                i,
                f"{c.estimate:.3f}\n({c.low:.2f}-{c.high:.2f})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if c.estimate < 0.8 else "black",
            )
    ax.set_xticks(range(len(matrix.sites)), [f"{s}\n(n={n})" for s, n in zip(matrix.sites, matrix.n_test)], fontsize=8)
    ax.set_yticks(range(len(matrix.models)), matrix.models, fontsize=8)
    ax.set(xlabel="test data of hospital", ylabel="model", title=title)
    fig.colorbar(image, ax=ax, label="AUC")
    return save_figure(fig, path)
