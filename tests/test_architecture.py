"""The layout's rules, checked on the source: who may import what, one home per name, and a clean linter."""

from __future__ import annotations

import ast
import os
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


# The commands that read or log results and never build, train, save or load a model, and the library modules
# they run on: importing them must not load Keras or TensorFlow (about 5 s of every such command's start-up).
WITHOUT_KERAS = ("experiments.doctor", "experiments.report", "experiments.ensemble", "experiments.ablate",
                 "mnist_ablation.store", "mnist_ablation.sweep", "mnist_ablation.compare", "mnist_ablation.tracking",
                 "mnist_ablation.doctor", "mnist_ablation.report", "mnist_ablation.ensemble",
                 "mnist_ablation.ablation", "mnist_ablation.offline_import", "mnist_ablation.explorer",
                 "mnist_ablation.results")


def test_commands_that_train_no_model_load_no_keras():
    probe = (f"import sys, {', '.join(WITHOUT_KERAS)}; "
             "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_the_gpu_lease_path_imports_without_tensorflow_mlflow_optuna_or_pydantic():
    # The GPU machine of a lease (benchmarks/gpu_lease.sh) has JAX and Keras' wheels but none of these: every module
    # the lease runs must import, and the offline packed command parse, with them absent (``sys.modules[name] =
    # None`` is how Python marks a module missing: importing it fails, ``find_spec`` answers None).
    pytest.importorskip("jax")
    lease_modules = ("experiments.ablate", "experiments.cli", "mnist_ablation.offline", "mnist_ablation.packed",
                     "mnist_ablation.train", "mnist_ablation.sweep", "benchmarks.packing", "benchmarks.gpu_lease")
    probe = (
        "import sys\n"
        "for name in ('tensorflow', 'mlflow', 'optuna', 'pydantic'):\n"
        "    sys.modules[name] = None\n"
        f"import {', '.join(lease_modules)}\n"
        "from experiments import ablate, cli\n"
        "cli._quiet_libraries()\n"
        "args = ablate.parse_args(['--study', 'architecture', '--offline', 'cells', '--pack', '5'])\n"
        "import keras\n"
        "print(keras.backend.backend(), args.pack)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["jax", "5"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_imports(path: Path) -> set[str]:
    """The library modules ``path`` imports, at any depth (lazy imports count), ``if TYPE_CHECKING:`` left out."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for statement in node.body for inner in ast.walk(statement)}
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    known = {module_name(p) for p in library_modules()}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            target = ".".join(filter(None, [base, node.module]))
            # `from . import store` imports the module store; `from .config import BASELINE` the module config.
            found |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names}
    # Importing a submodule runs its package first: that edge is Python's, not the module's.
    return {name for name in found & known if name != module and not module.startswith(f"{name}.")}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (module -> the modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target):], node, target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_circle_among_library_modules():
    # A circle (config -> seed_pipeline -> train -> config, once) means no module of it can be read, tested or
    # replaced alone. Lazy imports count: they are the same dependency, paid later.
    graph = {module_name(p): library_imports(p) for p in library_modules()}
    assert {"mnist_ablation.config", "mnist_ablation.data"} <= graph["mnist_ablation.train"]  # the graph sees imports
    cycle = import_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


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


def _library_path(name: str) -> str:
    return str((LIBRARY / name).relative_to(REPO_ROOT))


def test_one_cell_type():
    # A study's cell (arm, seed, config hash) and its key are defined once, in sweep.py: the queue, the offline
    # path, the import, the summary and the report all use that type.
    cell_types, keys = [], []
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Cell"):
                cell_types.append(f"{path.relative_to(REPO_ROOT)}:{node.name}")
            if isinstance(node, ast.JoinedStr) and any(  # f"{arm}-seed{seed}"
                    isinstance(text, ast.Constant) and str(text.value).endswith("-seed")
                    and isinstance(value, ast.FormattedValue) for text, value in zip(node.values, node.values[1:])):
                keys.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert cell_types == [f"{_library_path('sweep.py')}:Cell"], cell_types
    assert len(keys) == 1 and keys[0].startswith(_library_path("sweep.py")), (
        f"cell keys spelled outside sweep.cell_key: {keys}")


def test_the_library_reports_and_the_commands_print():
    # Progress and results leave the library through an observer or `logging`; only experiments/ prints.
    offenders = {}
    for path in library_modules():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Name) and node.id == "print":
                found.append(f"print (line {node.lineno})")
            if isinstance(node, ast.Attribute) and node.attr == "write" and isinstance(node.value, ast.Name) \
                    and node.value.id == "tqdm":
                found.append(f"tqdm.write (line {node.lineno})")
        if "tqdm" in imports(path):
            found.append("imports tqdm (progress bars live in the command layer)")
        if found:
            offenders[str(path.relative_to(REPO_ROOT))] = found
    assert not offenders, offenders


def _names(path: Path) -> set[str]:
    """Identifiers, attributes, keywords and string constants of a module's code."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.keyword, ast.arg)) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_study_and_precision_rule_go_from_the_command_through_the_sweep_to_store_and_stats():
    # `ablate --study S --target-ci-width W --max-seeds M`: the command looks the study up and hands the rule's
    # values to sweep.PrecisionRule, which checks them once and decides through stats; the runner (ablation),
    # the queue and the store never see the values, only the plan (sweep.Plan) built from them.
    command = REPO_ROOT / "experiments" / "ablate.py"
    tree = ast.parse(command.read_text(), str(command))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    rule_flags = ("target_ci_width", "max_seeds")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in rule_flags and ast.unparse(node.value) == "args":
            parent = parents[node]
            assert isinstance(parent, ast.Call) and _call_name(parent) == "sweep.PrecisionRule.from_options", (
                f"experiments/ablate.py line {node.lineno}: args.{node.attr} must go straight to "
                "sweep.PrecisionRule.from_options (checked once, in the library)")
        if isinstance(node, ast.Compare):
            assert not any(name in ast.unparse(node) for name in rule_flags), (
                f"experiments/ablate.py line {node.lineno} checks a precision flag; sweep.PrecisionRule does")
    handlers = {str(p.relative_to(REPO_ROOT)) for p in library_modules() if _names(p) & set(rule_flags)}
    # sweep decides, defaults checks, stats computes, the report shows the rule recorded in study.json.
    allowed = {_library_path(name) for name in ("sweep.py", "defaults.py", "stats.py", "report/__init__.py",
                                                "report/analysis.py")}
    assert handlers <= allowed, sorted(handlers - allowed)
    # The study: looked up by the command, carried by the plan; the runner never looks a study up itself.
    assert "STUDIES" in _names(command)
    runner = _names(LIBRARY / "ablation.py")
    assert "STUDIES" not in runner and "get_study" not in runner and "Plan" in runner
    # The sweep is pure: it reads studies, configs and statistics, never the store, the queue or a framework.
    sweep_imports = {node.module for node in ast.walk(ast.parse((LIBRARY / "sweep.py").read_text()))
                     if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    sweep_imports |= {alias.name for node in ast.walk(ast.parse((LIBRARY / "sweep.py").read_text()))
                      if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
                      for alias in node.names}
    assert sweep_imports <= {"config", "data", "defaults", "errors", "naming", "stats", "studies"}, sweep_imports
    assert not imports(LIBRARY / "sweep.py") & {"mlflow", "optuna", "keras", "tensorflow"}
