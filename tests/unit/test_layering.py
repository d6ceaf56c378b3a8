"""Only hospital_fl.flare may import nvflare: the maths stays usable without FLARE."""

import ast
from pathlib import Path

import hospital_fl

PACKAGE = Path(hospital_fl.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_nvflare_is_imported_only_under_flare():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "nvflare" in _imports(p) and p.relative_to(PACKAGE).parts[0] != "flare"
    ]

    assert offenders == []
