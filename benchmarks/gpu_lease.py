"""What a GPU lease brings back: its stages' record, the accuracy of the cells it trained, and the cells themselves.

    python -m benchmarks.gpu_lease --cells DIR --stages FILE --out OUT [--cap-mib 44]

Run by ``benchmarks/gpu_lease.sh`` as its last step (docs/gpu.md#a-15-minute-lease). It reads the cell folders
``ablate --offline`` saved in ``--cells`` (their ``result.json`` and test probabilities; no Keras needed) and writes
``OUT/lease.json``: the stages (status, seconds, deadline) from ``--stages`` (one ``name status seconds deadline``
line each), the machine and its GPU, and per arm each member's test accuracy and per-epoch history with the arm's
mean, standard deviation and ensemble accuracy (the members' test probabilities averaged). The cell folders travel
back as tar files under ``OUT/cells/`` of at most 15 MiB each (the device tool returns files of up to 16 MiB, eight
in all): the complete cells, importable with ``ablate --import-offline``, while they fit in ``--cap-mib``; past it a
cell comes back without its model under ``results-only/`` (its figures, not importable). Unpack them here with ``tar
-xf`` in one folder; ``lease.json`` is a result of this benchmark
(``benchmarks/results/gpu_lease-<date>-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, number, table
from mnist_ablation.offline import MODEL_FILE, RECORD_FILE

PART_BYTES = 15 * 2**20  # one returned file: under the device tool's 16 MiB
MAX_PARTS = 4  # with lease.json, packing.json and lease.log: within the eight files that come back


def read_cells(cells: Path) -> list[dict]:
    """Each complete cell folder's record, with its test accuracy recomputed from its saved probabilities."""
    members = []
    for folder in sorted(cells.iterdir()) if cells.is_dir() else []:
        if folder.name.endswith(".partial") or not (folder / RECORD_FILE).is_file():
            continue
        record = json.loads((folder / RECORD_FILE).read_text())
        probabilities = np.load(folder / "test_probabilities.npy")
        labels = np.load(folder / "test_labels.npy")
        members.append({"folder": folder, "arm": record["arm"], "seed": record["seed"], "key": record["key"],
                        "config_hash": record["config_hash"], "pack": record.get("pack"),
                        "epochs": len(record["history"].get("loss", [])), "test_accuracy": record["test_accuracy"],
                        "train_seconds": record["train_seconds"], "history": record["history"],
                        "probabilities": probabilities, "labels": labels})
    return members


def arm_summaries(members: list[dict]) -> dict[str, dict]:
    """Per arm: its members' test accuracies, their mean and standard deviation, and the ensemble's accuracy."""
    arms: dict[str, list[dict]] = {}
    for member in members:
        arms.setdefault(member["arm"], []).append(member)
    summaries = {}
    for arm, group in arms.items():
        labels = group[0]["labels"]
        if any(not np.array_equal(m["labels"], labels) for m in group):
            raise ValueError(f"arm {arm!r}: its cells were tested on different labels; they cannot be ensembled.")
        accuracies = [m["test_accuracy"] for m in group]
        ensemble = np.mean([m["probabilities"] for m in group], axis=0)
        summaries[arm] = {
            "seeds": [m["seed"] for m in group],
            "test_accuracy": accuracies,
            "mean_test_accuracy": float(np.mean(accuracies)),
            "sd_test_accuracy": float(np.std(accuracies, ddof=1)) if len(group) > 1 else math.nan,
            "ensemble_test_accuracy": float(np.mean(ensemble.argmax(axis=1) == labels)),
            "epochs": sorted({m["epochs"] for m in group}),
            "train_seconds": [m["train_seconds"] for m in group],
        }
    return summaries


def pack_cells(members: list[dict], out: Path, cap_bytes: int) -> tuple[list[str], list[str], list[str]]:
    """Tar the cells into ``out/cells/cells-<n>.tar`` parts; (complete, results-only, left out) cell keys."""
    complete, light, left_out = [], [], []
    parts: list[list[tuple[Path, str]]] = []  # per part: (file, name in the archive)
    sizes: list[int] = []

    def fits(files: list[Path], prefix: str, key: str) -> bool:
        size = sum(f.stat().st_size + 1024 for f in files)  # a tar header per file
        if sum(sizes) + size > cap_bytes or size > PART_BYTES:
            return False
        if not parts or sizes[-1] + size > PART_BYTES:
            if len(parts) == MAX_PARTS:
                return False
            parts.append([])
            sizes.append(0)
        parts[-1] += [(file, f"{prefix}/{key}/{file.name}") for file in files]
        sizes[-1] += size
        return True

    for member in members:
        files = sorted(f for f in member["folder"].iterdir() if f.is_file())
        if fits(files, "cells", member["key"]):
            complete.append(member["key"])
        elif fits([f for f in files if f.name != MODEL_FILE], "results-only", member["key"]):
            light.append(member["key"])
        else:
            left_out.append(member["key"])
    for index, part in enumerate(parts, start=1):
        (out / "cells").mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "cells" / f"cells-{index}.tar", mode="w") as archive:
            for file, name in part:
                archive.add(file, arcname=name)
    return complete, light, left_out


def read_stages(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    stages = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, status, seconds, deadline = line.split()
            stages.append({"stage": name, "status": status, "seconds": int(seconds), "deadline_seconds": int(deadline)})
    return stages


def gpu_details() -> str | None:
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return listed.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_lease", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=Path, required=True, help="the folder ablate --offline saved the cells in")
    parser.add_argument("--stages", type=Path, default=None, help="the stages file gpu_lease.sh wrote")
    parser.add_argument("--out", type=Path, required=True, help="where lease.json and cells/ go ($OUT)")
    parser.add_argument("--cap-mib", type=float, default=44.0,
                        help="at most this many MiB of cell folders come back (default: %(default)s)")
    parser.add_argument("--scale", default=None, help="the lease's LEASE_SCALE, recorded")
    args = parser.parse_args(argv)
    members = read_cells(args.cells)
    complete, light, left_out = pack_cells(members, args.out, int(args.cap_mib * 2**20))
    payload = {
        "benchmark": "gpu_lease",
        "date": date.today().isoformat(),
        "scale": args.scale,
        "command": "bash benchmarks/gpu_lease.sh",
        "machine": finish_machine_record(machine_record()),
        "gpu": gpu_details(),
        "stages": read_stages(args.stages),
        "arms": arm_summaries(members),
        "members": [{k: v for k, v in m.items() if k not in ("folder", "probabilities", "labels")} for m in members],
        "cells_returned": complete,
        "cells_returned_without_model": light,
        "cells_not_returned": left_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lease.json").write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    for stage in payload["stages"]:
        print(f"stage {stage['stage']:<10} {stage['status']:<8} {stage['seconds']:>4} s "
              f"of {stage['deadline_seconds']} s")
    for arm, summary in payload["arms"].items():
        print(f"{arm:<14} {len(summary['seeds'])} seed(s), {summary['epochs']} epoch(s): mean test accuracy "
              f"{summary['mean_test_accuracy']:.4f}, ensemble {summary['ensemble_test_accuracy']:.4f}")
    print(f"cells back: {len(complete)} complete, {len(light)} without their model, {len(left_out)} not returned")
    return 0


def render_report(data: dict, out: Rendered) -> None:
    out.tables.append(table(
        ["arm", "seeds", "epochs", "mean test accuracy", "sd", "ensemble test accuracy"],
        [[arm, len(a["seeds"]), ", ".join(map(str, a["epochs"])), number(a["mean_test_accuracy"], 4),
          number(a["sd_test_accuracy"], 4), number(a["ensemble_test_accuracy"], 4)]
         for arm, a in data.get("arms", {}).items()]))
    stages = ", ".join(f"{s['stage']} {s['status']} ({s['seconds']} of {s['deadline_seconds']} s)"
                       for s in data.get("stages", []))
    out.lines.append(f"Scale {data.get('scale')}; GPU: {data.get('gpu') or 'none'}; "
                     f"stages: {stages or 'none recorded'}. The ensemble averages the seeds' test probabilities; "
                     "the lease's packing.json is in its own section.")


REPORT = Benchmark(
    key="gpu_lease", title="GPU lease", command="bash benchmarks/gpu_lease.sh", order=85,
    about=("One prepared command for a 15-minute GPU lease (docs/gpu.md#a-15-minute-lease): the packing benchmark, "
           "then the architecture study's no_pool arms trained offline as packs of their seeds, each stage under its "
           "own deadline; per arm, the seeds' mean test accuracy and their ensemble's."),
    render=render_report)


if __name__ == "__main__":
    sys.exit(main())
