"""The layout the README describes, enforced: layers point down (core <- train <- app), no module imports
another package's private name, one folder per paper under core/methods/, every package is installed."""

from __future__ import annotations

import ast
import re
import tomllib

import pytest

from helpers import ROOT

LAYERS = {"core": 0, "train": 1, "app": 2}


def _modules():
    """(dotted module name, path) of every module of the three layers."""
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield "ovseg." + ".".join(parts), path


def _imports(path):
    """(imported module, imported names, line) of every ovseg import in a file, lazy ones inside functions too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ovseg"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ovseg"):
                    yield a.name, [], node.lineno


def layer_violations(modules) -> list[str]:
    out = []
    for name, path in modules:
        mine = LAYERS[name.split(".")[1]]
        for target, names, line in _imports(path):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] in LAYERS and LAYERS[parts[1]] > mine:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a layer above)")
            # `from pkg.mod import _x` reaches into a private name unless pkg is the importer's own package
            own_package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
            for n in names:
                if n.startswith("_") and not target.startswith(own_package):
                    out.append(f"{path.relative_to(ROOT)}:{line} imports the private name {target}.{n}")
    return out


def test_layers_point_down_and_no_private_names_cross_packages():
    assert layer_violations(_modules()) == []


def test_the_check_catches_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    """The checker itself: a core module importing the app, and a train module taking a private name."""
    (tmp_path / "core").mkdir()
    (tmp_path / "train").mkdir()
    bad_core = tmp_path / "core" / "bad.py"
    bad_core.write_text("def f():\n    from ovseg.app.cli import main\n")
    bad_train = tmp_path / "train" / "bad.py"
    bad_train.write_text("from ovseg.core.predictor import _private\nfrom ovseg.core.types import Prior\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = layer_violations([("ovseg.core.bad", bad_core), ("ovseg.train.bad", bad_train)])
    assert len(found) == 2
    assert "imports ovseg.app.cli (a layer above)" in found[0]
    assert "private name ovseg.core.predictor._private" in found[1]


def test_one_folder_per_method_each_registering_its_own_name():
    from ovseg.core.registry import available_methods, get_method

    folders = sorted(p.name for p in (ROOT / "core" / "methods").iterdir()
                     if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == available_methods()
    for name in folders:
        assert (ROOT / "core" / "methods" / name / "method.py").is_file()
        assert get_method(name).__module__ == f"ovseg.core.methods.{name}.method"


def test_trainers_register_themselves_and_the_cli_offers_each():
    from ovseg.app.cli import _parser
    from ovseg.train.registry import trainers

    found = trainers()
    assert set(found) >= {"cls_saliency", "concept_mask", "xpm"}
    for name, trainer in found.items():
        assert trainer.run.__module__ == f"ovseg.train.methods.{name}"
    cli = (ROOT / "app" / "cli.py").read_text()
    assert not re.search(r"train\.methods\.\w+ import", cli), "cli.py must not list trainers by hand"
    args = _parser().parse_args(["train", "xpm", "--max-images", "3"])
    assert args.method == "xpm" and args.max_images == 3


def test_every_package_is_installed():
    """pyproject.toml lists every package (a folder with an __init__.py), or `pip install .` drops it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("core", "train", "app", "assets"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            if "fiftyone_plugins" in rel.parts:  # package data, loaded by FiftyOne from its folder
                continue
            found.add("ovseg." + ".".join(rel.parts))
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}; stale: {sorted(listed - found)}"


@pytest.mark.parametrize("folder", ["core", "train", "app"])
def test_tests_mirror_the_tree(folder):
    assert (ROOT / "tests" / folder).is_dir()
    assert any((ROOT / "tests" / folder).glob("test_*.py"))
