"""The package's shape: a few modules at the top, folders that show the layers, and no long
module without the reason it is one module stated at its top."""

from pathlib import Path

import hospital_fl

PACKAGE = Path(hospital_fl.__file__).parent
LONG = 450


def test_the_top_level_holds_at_most_five_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 5, modules


def test_each_layer_is_a_folder():
    for folder in ("cli", "apps", "bench", "flare/recipes", "flare/runners", "flare/kits", "flare/stock"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder


def test_a_long_module_says_why_it_is_one_module():
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > LONG:
            docstring = text.split('"""')[1] if text.startswith('"""') else ""
            if "One module (" not in docstring:
                unexplained.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert unexplained == []
