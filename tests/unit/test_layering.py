"""The package's layers import downward only.

Only hospital_fl.flare may import nvflare (the maths stays usable without FLARE); privacy/
is a leaf under training/; aggregation/ is pure maths; the entry points (cli/, apps/,
bench/) sit on top and nothing below them imports them. Every import counts, also one
inside a function or under ``TYPE_CHECKING``, and relative imports are resolved.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import hospital_fl
import pytest

PACKAGE = Path(hospital_fl.__file__).parent
ROOT = "hospital_fl"
ENTRY_POINTS = ("cli", "apps", "bench")


@dataclass(frozen=True)
class Rule:
    """Modules of the ``sources`` subpackages (every subpackage and top-level module but
    ``exempt`` when ``sources`` is empty) must not import the ``forbidden`` ones."""

    name: str
    forbidden: tuple[str, ...]
    sources: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def covers(self, layer: str) -> bool:
        return layer in self.sources if self.sources else layer not in self.exempt


RULES = (
    Rule(
        "privacy is a leaf",
        sources=("privacy",),
        forbidden=("training", "models", "flare", "data", "segmentation", "apps", "cli", "bench", "evaluation"),
    ),
    Rule("training runs without FLARE or the entry points", sources=("training",), forbidden=("flare", *ENTRY_POINTS)),
    Rule(
        "aggregation is pure maths",
        sources=("aggregation",),
        forbidden=("flare", "training", "models", *ENTRY_POINTS),
    ),
    Rule("nothing below the entry points imports them", exempt=ENTRY_POINTS, forbidden=ENTRY_POINTS),
    Rule("apps import neither cli nor bench", sources=("apps",), forbidden=("cli", "bench")),
    Rule("bench does not import cli", sources=("bench",), forbidden=("cli",)),
)


def _layer(path: Path, root: Path) -> str:
    """The subpackage (or top-level module) a file belongs to: ``privacy``, ``audit``."""
    first = path.relative_to(root).parts[0]
    return first.removesuffix(".py")


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names, relative imports resolved against the
    package (``from hospital_fl import flare`` names ``hospital_fl.flare``)."""
    package = [ROOT, *path.relative_to(root).parts[:-1]]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # only the package itself has subpackages as its imported names
            names |= {f"{module}.{a.name}" for a in node.names} if module == ROOT else {module}
    return names


def layering_violations(root: Path, rule: Rule) -> list[str]:
    """``file: imported module`` for each import under ``root`` (a copy of the package's
    tree) that ``rule`` forbids."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if not rule.covers(_layer(path, root)):
            continue
        for module in sorted(imported_modules(path, root)):
            parts = module.split(".")
            if len(parts) > 1 and parts[0] == ROOT and parts[1] in rule.forbidden:
                found.append(f"{path.relative_to(root)}: {module}")
    return found


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_package_layers_import_downward_only(rule):
    assert layering_violations(PACKAGE, rule) == []


def test_nvflare_is_imported_only_under_flare():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(m.split(".")[0] == "nvflare" for m in imported_modules(p, PACKAGE)) and _layer(p, PACKAGE) != "flare"
    ]

    assert offenders == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "text,module",
    [
        ("from hospital_fl.training.loops import train_local\n", "hospital_fl.training.loops"),
        ("import hospital_fl.models.cxr\n", "hospital_fl.models.cxr"),
        ("from hospital_fl import flare\n", "hospital_fl.flare"),
        ("from ..training import loops\n", "hospital_fl.training"),
        ("from .. import segmentation\n", "hospital_fl.segmentation"),
        ("def late():\n    from hospital_fl.data.federated import SiteData\n", "hospital_fl.data.federated"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hospital_fl.cli import main\n",
            "hospital_fl.cli",
        ),
    ],
)
def test_the_checker_catches_a_back_import(tmp_path, text, module):
    root = _tree(
        tmp_path,
        {
            "privacy/__init__.py": "",
            "privacy/accounting.py": "from hospital_fl.errors import InputError\n",
            "privacy/mechanism.py": "from hospital_fl.privacy.accounting import Release\n" + text,
            "training/loops.py": "from hospital_fl.privacy.accounting import Release\n",
        },
    )

    assert layering_violations(root, RULES[0]) == [f"privacy/mechanism.py: {module}"]  # privacy is a leaf


def test_the_checker_passes_downward_imports_and_exempt_layers(tmp_path):
    root = _tree(
        tmp_path,
        {
            "privacy/accounting.py": "from hospital_fl.errors import InputError\nfrom . import randomness\n",
            "privacy/randomness.py": "import secrets\n",
            "training/dp_sgd.py": "from hospital_fl.privacy.accounting import Release\n",
            "cli/main.py": "from hospital_fl.apps import cxr_demo\nfrom hospital_fl.bench import cxr\n",
            "bench/cxr.py": "from hospital_fl.apps.cxr_demo import run\n",
            "apps/cxr_demo.py": "from hospital_fl.training.dp_sgd import DPSGDTrainer\n",
        },
    )

    assert {r.name: layering_violations(root, r) for r in RULES} == {r.name: [] for r in RULES}


def test_the_checker_names_an_upward_import_of_an_entry_point(tmp_path):
    root = _tree(
        tmp_path,
        {
            "audit.py": "from hospital_fl.cli.main import run\n",
            "bench/cxr.py": "from hospital_fl.cli import main\n",
            "cli/main.py": "",
        },
    )
    by_name = {r.name: r for r in RULES}

    assert layering_violations(root, by_name["nothing below the entry points imports them"]) == [
        "audit.py: hospital_fl.cli.main"
    ]
    assert layering_violations(root, by_name["bench does not import cli"]) == ["bench/cxr.py: hospital_fl.cli"]
