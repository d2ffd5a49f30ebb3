"""The layout's rules, checked on the source: who may import what, one home per name, and a clean linter."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = REPO_ROOT / "mnist_ablation"
# The only library modules allowed to import each third-party package (STYLE.md, conventions 4 and 11).
ALLOWED_IMPORTERS = {
    "mlflow": {"store", "tracking"},
    "optuna": {"store", "storage", "workqueue", "tuning", "search_space"},
}


def imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def library_modules():
    return sorted(p for p in LIBRARY.rglob("*.py"))


def test_the_library_never_imports_the_command_layer_or_the_benchmarks():
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(imports(p) & {"experiments", "benchmarks"})
                 for p in library_modules() if imports(p) & {"experiments", "benchmarks"}}
    assert not offenders, offenders


def test_the_library_never_runs_other_modules_through_runpy():
    # runpy (or importlib by name) would run the command layer while slipping past the import check above.
    offenders = sorted(str(p.relative_to(REPO_ROOT)) for p in library_modules()
                       if "runpy" in imports(p)
                       or any(literal.startswith("experiments.") for literal in string_literals(p)))
    assert not offenders, offenders


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTERS))
def test_only_the_owning_modules_import_mlflow_and_optuna(package):
    importers = {p.stem for p in library_modules() if package in imports(p)}
    extra = sorted(importers - ALLOWED_IMPORTERS[package])
    assert not extra, f"{package} imported by {extra}"


def test_importing_the_light_modules_loads_no_framework():
    # Config errors, --list and --help must answer without TensorFlow, Keras, MLflow or Optuna: the light
    # library modules and every command module load none of them when imported.
    commands = sorted(f"experiments.{p.stem}" for p in (REPO_ROOT / "experiments").glob("*.py"))
    probe = ("import sys, mnist_ablation.config, mnist_ablation.studies, mnist_ablation.search_space, "
             f"mnist_ablation.redaction, mnist_ablation.naming, {', '.join(commands)}; "
             "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def string_literals(path: Path) -> list[str]:
    """Every string constant in the code of ``path``, docstrings left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_naming_scheme_is_spelled_once():
    # Experiment prefixes, the role tag, the queue prefix and the run-id attribute live in naming.py only.
    spelled = ("mnist_ablation.role", "ablation/", "ablate/", "tune/", "mlflow_run_id")
    offenders = {}
    for path in library_modules():
        if path.name == "naming.py":
            continue
        found = sorted({name for literal in string_literals(path) for name in spelled if literal.startswith(name)})
        if found:
            offenders[str(path.relative_to(REPO_ROOT))] = found
    assert not offenders, offenders


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed: pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
