"""Declared dependencies mean what they say: every import is declared, every range admits what is installed,
and the lock (constraints.txt) pins a version inside every range.

Imports are read with ``ast`` from the code itself; an import name is mapped to the distributions that
provide it with ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIME_DIRS = ("mnist_ablation", "experiments", "benchmarks")  # shipped in the package
TEST_DIR = "tests"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
REFRESH_HINT = 'pip install -e ".[test]" -c constraints.txt (docs/development.md: the lock)'


def normalize(name: str) -> str:
    """PEP 503 form of a distribution name: ``Jinja2`` and ``jinja2``, ``psycopg_binary`` and ``psycopg-binary``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(group: str) -> list[Requirement]:
    """``dependencies`` or an extra of pyproject.toml, parsed."""
    declared = PROJECT["dependencies"] if group == "dependencies" else PROJECT["optional-dependencies"][group]
    return [Requirement(line) for line in declared]


FEATURE_EXTRAS = [name for name in PROJECT["optional-dependencies"] if name != "test"]
RUNTIME_NAMES = {normalize(r.name) for r in requirements("dependencies")}
FEATURE_NAMES = {normalize(r.name) for extra in FEATURE_EXTRAS for r in requirements(extra)} - RUNTIME_NAMES
TEST_NAMES = {normalize(r.name) for r in requirements("test")}


def first_party() -> set[str]:
    """Top-level names that are this repository's own code (packages, and the tests' helper modules)."""
    names = {path.name for path in REPO_ROOT.iterdir() if (path / "__init__.py").is_file()}
    names |= {path.stem for path in (REPO_ROOT / TEST_DIR).glob("*.py")}
    return names | set(RUNTIME_DIRS) | {TEST_DIR}


def imports(directories) -> dict[str, list[tuple[str, bool]]]:
    """Absolute top-level import name -> [(file:line, at module level?)] for every .py file under the directories."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for directory in directories:
        for path in sorted((REPO_ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            module_level = set()  # run at import time: top-level statements, including try/if blocks
            for statement in tree.body:
                if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    module_level.update(id(node) for node in ast.walk(statement))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                for name in names:
                    found.setdefault(name.split(".")[0], []).append((where, id(node) in module_level))
    return found


def third_party(found: dict) -> dict[str, list[tuple[str, bool]]]:
    own = first_party()
    return {name: places for name, places in found.items()
            if name not in sys.stdlib_module_names and name not in own}


@functools.cache
def _distributions_by_import_name() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def providers(import_name: str) -> set[str]:
    """Normalized names of the installed distributions that provide a top-level import name."""
    return {normalize(dist) for dist in _distributions_by_import_name().get(import_name, [])}


def test_the_import_scan_sees_the_imports_it_must_judge():
    # Guards the scan itself: a broken walker would make the other tests pass vacuously.
    runtime = third_party(imports(RUNTIME_DIRS))
    assert {"keras", "mlflow", "optuna", "sqlalchemy", "starlette", "numpy"} <= set(runtime)
    assert not {"os", "mnist_ablation", "experiments"} & set(runtime)
    assert "pytest" in third_party(imports([TEST_DIR]))
    assert providers("jinja2") == {"jinja2"} and providers("sqlalchemy") == {"sqlalchemy"}  # Jinja2, SQLAlchemy


def test_every_package_the_code_imports_is_declared():
    problems = []
    for name, places in sorted(third_party(imports(RUNTIME_DIRS)).items()):
        dists = providers(name)
        where = ", ".join(place for place, _ in places[:3])
        if not dists:
            problems.append(f"{name} (imported at {where}) is provided by no installed distribution")
        elif dists & RUNTIME_NAMES:
            continue
        elif dists & FEATURE_NAMES:
            # An optional extra's package may only be imported where that feature is used, never at import time.
            eager = [place for place, module_level in places if module_level]
            if eager:
                problems.append(f"{name} comes from an optional extra but is imported at module level "
                                f"({', '.join(eager)}): import it inside the function that needs it")
        else:
            problems.append(f"{name} (imported at {where}; distribution {sorted(dists)}) is not declared in "
                            "pyproject.toml's dependencies: add it there")
    assert not problems, "\n".join(problems)


def test_every_package_the_tests_import_is_declared_for_tests():
    problems = []
    for name, places in sorted(third_party(imports([TEST_DIR])).items()):
        dists = providers(name)
        where = ", ".join(place for place, _ in places[:3])
        if not dists:
            problems.append(f"{name} (imported at {where}) is provided by no installed distribution")
        elif not dists & (RUNTIME_NAMES | TEST_NAMES):
            problems.append(f"{name} (imported at {where}; distribution {sorted(dists)}) is not declared: add it "
                            "to the test extra in pyproject.toml (or to dependencies if the package uses it)")
    assert not problems, "\n".join(problems)


def test_test_only_packages_stay_out_of_the_runtime_dependencies():
    # A driver or tool the package never imports at run time belongs in the test extra.
    assert not TEST_NAMES & RUNTIME_NAMES
    assert "psycopg2-binary" not in RUNTIME_NAMES and "psycopg" in RUNTIME_NAMES
    assert {"pytest", "ruff", "playwright"} <= TEST_NAMES


@pytest.mark.parametrize("group", ["dependencies", *PROJECT["optional-dependencies"]])
def test_every_declared_range_admits_the_installed_version(group):
    problems = []
    for requirement in requirements(group):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            if group in ("dependencies", "test"):  # the README's set-up installs both
                problems.append(f"{requirement.name} is declared but not installed: {REFRESH_HINT}")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed but {group} declares "
                            f"{requirement.specifier}: {REFRESH_HINT}, or fix the range")
    assert not problems, "\n".join(problems)


def locked_versions() -> dict[str, str]:
    """constraints.txt as {normalized name: version}; every line must be an exact ``name==version`` pin."""
    pins = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        assert match, f"constraints.txt:{number}: {line!r} is not an exact name==version pin"
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def test_the_lock_pins_every_declared_package_inside_its_range():
    pins = locked_versions()
    assert normalize(PROJECT["name"]) not in pins, "the project itself must not be pinned"
    problems = []
    for group in ("dependencies", "test"):
        for requirement in requirements(group):
            name = normalize(requirement.name)
            if name not in pins:
                problems.append(f"{requirement.name} ({group}) is not pinned in constraints.txt")
            elif not requirement.specifier.contains(Version(pins[name]), prereleases=True):
                problems.append(f"constraints.txt pins {requirement.name}=={pins[name]} outside {requirement}")
    # Extras of declared packages (psycopg[binary], uvicorn[standard]) are pinned too.
    assert {"psycopg-binary", "uvloop"} <= set(pins) or sys.platform != "linux"
    assert not problems, "problems with constraints.txt (docs/development.md: refresh the lock):\n" + \
        "\n".join(problems)


def test_the_environment_is_the_locked_one():
    """What runs is what the lock says: a drifted package makes "bit-identical" a claim about another environment."""
    drifted = []
    for name, version in sorted(locked_versions().items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a platform-specific pin of another OS, or a lock newer than this environment
        if Version(installed) != Version(version):
            drifted.append(f"{name} {installed} (locked {version})")
    assert not drifted, f"installed versions differ from constraints.txt: {', '.join(drifted)}. {REFRESH_HINT}"
