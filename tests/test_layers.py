"""The package's imports go only downward through the pipeline's layers.

    foundation (errors, settings, meta_keys, pass_infra) and runtime/ (the leaf)
    -> capture/ -> analysis/ -> planning/ -> rewrite/ -> search/ -> api/ -> deployment/ -> the command line

deployment/ (export formats, engines, serving) sits above the api; the api reaches it only through
its registry (api/engines.py), which deployment fills when imported.

models/ and data/ stand beside the pipeline: they may use runtime/ and the foundation, and no stage
of the pipeline imports them, except api/, which reads folders of images through data/ (`recover`). Every import of a mambaprune module (absolute or relative, at module
level or inside a function) is checked.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mambaprune"

PIPELINE = ["capture", "analysis", "planning", "rewrite", "search", "api", "deployment"]
FOUNDATION = {"errors": set(), "meta_keys": set(), "runtime": {"errors"}, "pass_infra": {"errors"},
              "settings": {"runtime", "errors"}}
BESIDE = {"models": {"runtime", "errors"}, "data": {"errors"}}
DEPLOYMENT = "deployment"   # serving and packaging above the api: imports every layer below, none imports it
TOP = {"__init__", "__main__", "visualize"}   # may import anything
# api/ may read data/: `recover` takes a folder of images (data.image_folder); data/ imports no pipeline stage
ACROSS = {"api": {"data"}}


def allowed(unit: str) -> set:
    if unit in FOUNDATION:
        return FOUNDATION[unit] | {unit}
    if unit in BESIDE:
        return BESIDE[unit] | {unit}
    if unit in PIPELINE:
        return set(FOUNDATION) | set(PIPELINE[:PIPELINE.index(unit) + 1]) | ACROSS.get(unit, set())
    if unit == DEPLOYMENT:
        return set(FOUNDATION) | set(BESIDE) | set(PIPELINE) | {DEPLOYMENT}
    if unit in TOP:
        return set(FOUNDATION) | set(BESIDE) | set(PIPELINE) | {DEPLOYMENT} | TOP
    raise AssertionError(f"mambaprune/{unit} belongs to no layer: add it to tests/test_layers.py")


def unit_of(module_path: str) -> str:
    """'mambaprune.analysis.tokens.views' -> 'analysis'."""
    parts = module_path.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str, module: str, is_package: bool = False) -> list:
    """(line, imported unit) for every import of a mambaprune module in `source`, the code of
    `module` (dotted name; `is_package` for an __init__)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                names = [f"{base}.{node.module}"] if node.module else [_submodule_or_package(base, a.name)
                                                                       for a in node.names]
            else:
                names = [node.module or ""]
            found += [(node.lineno, unit_of(name)) for name in names if name.startswith("mambaprune")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, unit_of(a.name)) for a in node.names if a.name.startswith("mambaprune")]
    return found


def _submodule_or_package(package: str, name: str) -> str:
    """`from package import name`: the submodule if there is one, else the package (an attribute)."""
    folder = PACKAGE.parent.joinpath(*package.split("."))
    return f"{package}.{name}" if (folder / f"{name}.py").exists() or (folder / name).is_dir() else package


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_go_only_downward(path):
    module = module_name(path)
    unit = unit_of(module) if path.name != "__init__.py" or module != "mambaprune" else "__init__"
    imports = imports_of(path.read_text(), module, is_package=path.name == "__init__.py")
    bad = [(line, target) for line, target in imports if target not in allowed(unit)]
    assert not bad, f"{path.relative_to(PACKAGE)} ({unit}) imports upward or beside: {bad}"


def test_the_checker_sees_upward_and_sideways_imports():
    assert imports_of("from ..search import calibration\n", "mambaprune.rewrite.probe") == [(1, "search")]
    assert imports_of("from . import gather\n", "mambaprune.rewrite", is_package=True) == [(1, "rewrite")]
    assert imports_of("import mambaprune.models\n", "mambaprune.capture.probe") == [(1, "models")]
    assert "search" not in allowed("rewrite") and "models" not in allowed("capture")
    assert "analysis" in allowed("planning") and "runtime" in allowed("capture")
    assert "deployment" not in allowed("api") and "api" in allowed("deployment")
    assert all("deployment" not in allowed(u) for u in PIPELINE if u != "deployment")


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in FILES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over ~400 lines: {long}"
