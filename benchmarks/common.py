"""What every benchmark shares: the one machine record it writes, and the description the report reads.

A benchmark module ``benchmarks/<name>.py`` declares, at module level, ``REPORT = Benchmark(...)``: the section of
docs/benchmarks.md its results get (title, what it measures, its command) and ``render``, the function turning one of
its JSON results into that section's tables and lines; ``python -m benchmarks.report`` finds every module with a
``REPORT``. Its results carry ``"machine": machine_record()`` (then ``finish_machine_record`` at the end), so every
result names its machine the same way. Import-light: a benchmark module imports heavy packages inside functions, so
the report (and ``tests/test_docs.py``) can read every description without loading TensorFlow.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASH = "—"
# The packages a machine record lists (those installed), in this order.
RECORDED_PACKAGES = ("tensorflow", "keras", "jax", "numpy", "scipy", "mlflow", "optuna")


# -- the machine record ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpus() -> list[str]:
    """``nvidia-smi -L``'s lines (one per GPU), or none."""
    if not shutil.which("nvidia-smi"):
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    return [line for line in listed.stdout.splitlines() if line.strip()]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def machine_record() -> dict[str, Any]:
    """The machine a benchmark runs on, as every benchmark records it under ``"machine"`` (no host name).

    ``load_average`` holds ``start`` (now) and, once ``finish_machine_record`` has run, ``end``.
    """
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "packages": {name: version for name in RECORDED_PACKAGES if (version := _version(name))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": {"start": load_average()},
    }


def finish_machine_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the load average at the end of the benchmark (the load during it says how quiet it was)."""
    record["load_average"]["end"] = load_average()
    return record


def machine_text(machine: Any) -> str:
    """A result's machine in words: a ``machine_record`` or, for transcribed results, the text they carry."""
    if machine is None:
        return "not recorded in the file"
    if isinstance(machine, str):
        return machine
    parts = []
    cpu, count = machine.get("cpu"), machine.get("cpu_count")
    if cpu or count:
        parts.append(", ".join(str(p) for p in (cpu, f"{count} CPUs" if count else None) if p))
    if machine.get("gpus"):
        parts.append("; ".join(machine["gpus"]))
    if machine.get("keras_backend"):
        parts.append(f"Keras backend {machine['keras_backend']}")
    packages = machine.get("packages") or {}
    if packages:
        parts.append(", ".join(f"{name} {version}" for name, version in packages.items() if version))
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("platform"):
        parts.append(machine["platform"])
    loads = [value for key, value in (machine.get("load_average") or {}).items() if key in ("start", "end") and value]
    if loads:
        parts.append("load average " + " → ".join(_load(value) for value in loads))
    return "; ".join(parts) or "not recorded in the file"


def _load(value: Any) -> str:
    values = value if isinstance(value, (list, tuple)) else [value]
    return number(values[0], 1) if values else DASH



# -- what the report shows for one result ---------------------------------------------------------------------


@dataclass
class Rendered:
    """What the template shows for one result file."""

    heading: str
    file: str
    date: str
    machine: str
    command: str
    command_note: str
    source: str | None
    lines: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        if not self.command:
            return "not recorded in the file"
        return f"`{self.command}`" + (f" ({self.command_note})" if self.command_note else "")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's section of docs/benchmarks.md: what a benchmark module declares as ``REPORT``.

    Its result files are ``benchmarks/results/<key>[-<anything>].json`` (or carry ``"benchmark": key``).
    """

    key: str
    title: str
    about: str  # what it measures, how: the section's first paragraph
    render: Callable[[dict, Rendered], None]  # one result -> its tables and lines
    command: str = ""  # how to run it, shown in the section
    reconstruct: Callable[[dict], str] | None = None  # the command of a result that did not record it
    order: int = 100  # where the section goes on the page, smallest first
    missing: str = "No results yet: run the command above, then regenerate this page."  # shown without results


# -- formatting ------------------------------------------------------------------------------------------------


def finite(value: Any) -> float | None:
    """``value`` as a float, or None where it is missing, NaN or infinite (what a result file stores as null)."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: Any, digits: int = 1, thousands: bool = False) -> str:
    """``value`` rounded to ``digits`` decimals ('—' when missing)."""
    if is_missing(value):
        return DASH
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def spread(value: Any, digits: int = 1, thousands: bool = False) -> str:
    """A benchmark's ``{"median", "min", "max"}`` as 'median [min-max]' (the median alone when that is all)."""
    if isinstance(value, dict):
        text = number(value.get("median"), digits, thousands)
        if not is_missing(value.get("min")) and not is_missing(value.get("max")):
            text += f" [{number(value['min'], digits, thousands)}-{number(value['max'], digits, thousands)}]"
        return text
    return number(value, digits, thousands)


def percent(fraction: Any, digits: int = 2) -> str:
    return DASH if is_missing(fraction) else f"{100 * fraction:.{digits}f}"


def mean_std_percent(stats: dict | None, digits: int = 2) -> str:
    """``{"mean", "std"}`` of a fraction as 'mean ± std' in percent ('mean' alone without a std)."""
    if not stats or is_missing(stats.get("mean")):
        return DASH
    text = percent(stats["mean"], digits)
    return text if is_missing(stats.get("std")) else f"{text} ± {percent(stats['std'], digits)}"


def points(value: Any, signed: bool = False, digits: int = 3) -> str:
    if is_missing(value):
        return DASH
    return f"{100 * value:+.{digits}f}" if signed else f"{100 * value:.{digits}f}"


def p_value(value: Any) -> str:
    if is_missing(value):
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3g}"


def table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": [[DASH if is_missing(cell) else str(cell) for cell in row] for row in rows]}
