"""``ablate --import-offline DIR``: the cells ``offline.run_offline`` saved as folders, logged into a study.

``offline`` trains and saves without MLflow or Optuna; this is the tracking side, on a machine with the store.
Each folder that is a cell of the runner's plan at the same config hash becomes one of the study's child runs
with everything a tracked run has (``tracking.log_offline_result``); a cell of an identical arm, which
``--offline`` does not train, is logged as reusing its source cell's run once that run is in the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import naming, offline, store, tracking
from .sweep import usable_runs_by_cell

if TYPE_CHECKING:
    from .ablation import StudyRunner


def import_offline(runner: StudyRunner, directory: Path) -> tuple[int, int, list[str]]:
    """Log the cells saved in ``directory`` as child runs of ``runner``'s sweep; (imported, skipped, problems).

    A folder counts only if it is a cell of the plan with the same config hash; cells already FINISHED in the
    store are skipped, so importing twice adds nothing. The store's cell runs are read once for every cell
    that reuses another's run. Each imported cell is a line to ``runner.observer``.
    """
    planned = runner.planned_cells()
    runner.publish_definition(planned)
    finished = store.finished_cells(runner.study.name)
    by_key = {cell.key: cell for cell in planned}
    imported, skipped, problems = 0, 0, []
    for folder in offline.saved_cells(directory):
        result, record = offline.load_result(folder)
        cell = by_key.get(record["key"])
        if cell is None or cell.config_hash != record["config_hash"]:
            problems.append(f"{folder.name}: not a cell of this study as defined by this command "
                            f"(config hash {record['config_hash']}); same --study, --seeds, --epochs, "
                            "--train-subset and --set as the offline run?")
            continue
        if cell.identity in finished:
            skipped += 1
            continue
        extra = {naming.WORKER_TAG: record["environment"]["machine"]["hostname"]}
        if record.get("pack"):  # trained as a member of a pack (--offline --pack K)
            extra[naming.PACK_TAG] = str(record["pack"])
        tracked = tracking.log_offline_result(
            result, record, experiment_name=runner.experiment_name, run_name=cell.key,
            tags=runner.cell_tags(cell, extra),
            parent_run_id=runner.parent_run_id, input_example=runner.data.x_test[:1],
        )
        imported += 1
        runner.observer.line(f"imported {cell.key}: test_accuracy {result.test_accuracy:.4f} (run {tracked.run_id})")
    reusing = [cell for cell in planned if runner.plan.source_of(cell) is not None and cell.identity not in finished]
    usable = usable_runs_by_cell(store.cell_runs(runner.study.name, all_sweeps=True)) if reusing else {}
    for cell in reusing:
        source = runner.plan.source_of(cell)
        run = usable.get(source.identity)
        if run is not None:
            run_id = runner.log_reuse(cell, run)
            imported += 1
            runner.observer.line(f"imported {cell.key}: reuses {source.key} (run {run_id})")
    return imported, skipped, problems
