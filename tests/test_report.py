"""The study report: pure tests on simulated studies (fast), then a tiny real study through the commands."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from mnist_ablation import store
from mnist_ablation.config import BASELINE
from mnist_ablation.report import SUMMARY_COLUMNS, StudyData, analysis, build_report, summary_table
from mnist_ablation.studies import STUDIES

from helpers import command_env, run_module

MARKUP_ARM = "<img src=x onerror=alert(1)>"


def simulated_study(arms: dict[str, tuple[dict, float]], n_seeds: int = 3, n_images: int = 4000, seed: int = 0,
                    study: str = "leave-one-out", factors=None, missing=(), epochs: int = 2,
                    precision: dict | None = None) -> StudyData:
    """A study as gather_study would return it, simulated: arm -> (config overrides, logit shift of accuracy)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_images)
    difficulty = rng.normal(0, 1.5, n_images)
    seed_effect = rng.normal(0, 0.1, n_seeds)
    runs, frames, predicted_by_run, cells, history = [], [], {}, [], []
    for arm, (overrides, shift) in arms.items():
        config = BASELINE.replace(epochs=epochs, **overrides)
        for s in range(n_seeds):
            cells.append({"arm": arm, "seed": s, "config_hash": f"{arm}-{s}",
                          "config": config.replace(seed=s).to_dict()})
            run_id = f"run-{arm}-{s}"
            if (arm, s) in missing:
                runs.append({"arm": arm, "seed": s, "run_id": run_id, "status": "FAILED", "test_accuracy": np.nan,
                             "failure_reason": "TrainingDiverged: loss nan", "start_time": s,
                             **{k: v for k, v in config.to_dict().items() if k != "seed"}})
                continue
            logit = 4.5 + difficulty + shift + seed_effect[s] + rng.normal(0, 0.05)
            correct = rng.random(n_images) < 1 / (1 + np.exp(-logit))
            predicted = np.where(correct, labels, (labels + 1) % 10)
            predicted_by_run[run_id] = predicted
            frames.append(pd.DataFrame({"arm": arm, "seed": s, "image": np.arange(n_images), "correct": correct}))
            runs.append({"arm": arm, "seed": s, "run_id": run_id, "status": "FINISHED",
                         "test_accuracy": correct.mean(), "failure_reason": None, "start_time": s,
                         **{k: v for k, v in config.to_dict().items() if k != "seed"}})
            for epoch in range(epochs):
                history.append({"run_id": run_id, "arm": arm, "seed": s, "epoch": epoch,
                                "accuracy": 0.9 + 0.03 * epoch,
                                "val_accuracy": correct.mean() - 0.01 * (epochs - epoch),
                                "loss": 0.3 - 0.1 * epoch, "val_loss": 0.2 - 0.05 * epoch})
    runs = pd.DataFrame(runs)
    finished = runs[runs["status"] == "FINISHED"].reset_index(drop=True)
    definition = {"study": study, "description": STUDIES[study].description, "baseline_arm": "baseline",
                  "factors": factors, "cells": cells, "precision": precision,
                  "command": ["python", "-m", "experiments.ablate", "--study", study, "--tracking-uri",
                              "postgresql://user:***@db.example/store"]}
    return StudyData(study, "sqlite:///store.db", "parent", definition, "baseline", runs, finished,
                     pd.DataFrame([{"arm": c["arm"], "seed": c["seed"]} for c in cells]),
                     unusable=runs.iloc[0:0], histories=pd.DataFrame(history),
                     correct=pd.concat(frames, ignore_index=True), labels=labels, predicted_by_run=predicted_by_run)


LEAVE_ONE_OUT = {
    "baseline": ({}, 0.0),
    "no_batch_norm": ({"batch_norm": False}, -1.5),  # a large, real cost
    "constant_lr": ({"lr_schedule": "constant"}, 0.0),  # identical to the baseline at 2 epochs
    "no_dropout": ({"dropout": False}, 0.0),
}


def test_summary_table_has_the_documented_columns_verdicts_and_paired_seeds():
    data = simulated_study(LEAVE_ONE_OUT, missing={("no_dropout", 2)})
    summary = summary_table(data).set_index("arm")
    assert list(summary.reset_index().columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert "mcnemar_p_value" not in summary.columns
    assert summary.loc["no_batch_norm", "verdict"] == analysis.MATTERS
    assert summary.loc["constant_lr", "identical_to_baseline"] and summary.loc["constant_lr", "verdict"] in (
        analysis.IDENTICAL, analysis.NEGLIGIBLE)
    # A seed missing from one arm: its delta, paired accuracies and n_pairs all use the same two seeds.
    row = summary.loc["no_dropout"]
    assert row["n_seeds"] == 2 and row["n_pairs"] == 2 and row["n_failed"] == 1
    paired = data.correct[data.correct["seed"] < 2]
    means = paired.groupby("arm")["correct"].mean()
    assert row["delta_vs_baseline"] == pytest.approx(means["no_dropout"] - means["baseline"])
    assert row["arm_accuracy_paired"] - row["baseline_accuracy_paired"] == pytest.approx(row["delta_vs_baseline"])
    for arm, line in summary.iterrows():
        assert 0 <= line["test_accuracy_ci_low"] <= line["test_accuracy_mean"] <= line["test_accuracy_ci_high"] <= 1
        if arm != "baseline":
            assert line["delta_ci_low"] <= line["delta_vs_baseline"] <= line["delta_ci_high"]
            assert line["intervals_cover"] == analysis.INTERVALS_COVER
    # Holm counts every compared arm, so the corrected p can only grow.
    compared = summary.drop("baseline")
    assert (compared["p_value_holm"] >= compared["p_value"] - 1e-12).all()


def test_sentences_say_what_the_data_can_say():
    data = simulated_study(LEAVE_ONE_OUT, n_seeds=3)
    summary = summary_table(data)
    text = {f["arm"]: f["text"] for f in analysis.findings(data, summary, 0.95)}
    assert text["no_batch_norm"].startswith("Removing batch norm matters: it costs")
    assert "after Holm over 3 arm(s)" in text["no_batch_norm"]
    assert "same training run as the baseline" in text["constant_lr"]
    verdict = summary.set_index("arm").loc["no_dropout", "verdict"]
    if verdict == analysis.INCONCLUSIVE:
        assert "is inconclusive with 3 seeds" in text["no_dropout"] and "cannot be seen here" in text["no_dropout"]
    else:
        assert verdict == analysis.NEGLIGIBLE and "is negligible: within ±0.10 points" in text["no_dropout"]


def test_two_seeds_of_wildly_different_runs_keep_accuracy_intervals_on_the_axis():
    data = simulated_study({"baseline": ({}, 0.0), "no_batch_norm": ({"batch_norm": False}, -5.0)}, n_seeds=2)
    # One seed of the arm collapses, as batch-norm arms do on tiny budgets (34% and 95% in the audit).
    collapsed = (data.correct["arm"] == "no_batch_norm") & (data.correct["seed"] == 0)
    data.correct.loc[collapsed, "correct"] = np.random.default_rng(1).random(collapsed.sum()) < 0.34
    row = summary_table(data).set_index("arm").loc["no_batch_norm"]
    assert 0 <= row["test_accuracy_ci_low"] < row["test_accuracy_ci_high"] <= 1


def test_report_pages_escape_markup_and_say_what_intervals_cover(tmp_path):
    arms = {**LEAVE_ONE_OUT, MARKUP_ARM: ({"dropout": False, "conv_dropout_rate": 0.3}, -0.1)}
    data = simulated_study(arms)
    command = ["python", "-m", "experiments.report", "--study", "x", "--output", "'a&b'"]
    report = build_report(data, tmp_path, report_command=command)
    html = (tmp_path / "report.html").read_text()
    assert MARKUP_ARM not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html and "<link" not in html  # self-contained, nothing executable
    assert "training seeds and test images" in html and "this test set only" in html
    assert "white-space:pre-wrap" in html  # the Reproduce command wraps
    assert "python -m experiments.report --study x" in html and "user:***@" in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 4  # differences, test error, learning curves, confusion differences
    markdown = (tmp_path / "report.md").read_text()
    assert "| arm |" in markdown and "figures/test_error.png" in markdown and MARKUP_ARM not in markdown
    assert " ".join(command) in markdown  # the Reproduce block is code: copied as is, no HTML entities
    csv = pd.read_csv(tmp_path / "ablation_summary.csv")
    assert list(csv.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS and len(csv) == len(arms)
    assert {p.name for p in report.files} >= {"ablation_summary.csv", "report.html", "report.md", "test_error.png"}


def test_report_md_is_markdown_escaped_not_html_escaped(tmp_path):
    from markdown_it import MarkdownIt

    tricky = "it's \"x\" <b>*y*</b> _z_ a|b"
    arms = {"baseline": ({}, 0.0), tricky: ({"dropout": False}, -0.1)}
    data = simulated_study(arms, n_seeds=2, n_images=500)
    data.definition["description"] = "The trainer's pipeline=\"seed_script\" with p < 0.05 and *no* _emphasis_ | here"
    build_report(data, tmp_path, report_command=["python", "-m", "experiments.report", "--study", "x"])
    markdown = (tmp_path / "report.md").read_text()
    for entity in ("&#39;", "&#34;", "&quot;", "&lt;", "&gt;", "&amp;"):
        assert entity not in markdown
    # Rendered by a CommonMark parser (with tables), the page shows exactly the text: no tag, no emphasis, and
    # the arm stays one cell of its row.
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    shown = html.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert "The trainer's pipeline=\"seed_script\" with p < 0.05 and *no* _emphasis_ | here" in shown
    assert "<b>" not in html and "<em>" not in html.split("<h2")[0]
    row = next(chunk for chunk in html.split("<tr>") if chunk.lstrip().startswith("<td>it"))
    cells = [cell.split("</td>")[0] for cell in row.split("<td>")[1:]]
    assert cells[0].replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">") == tricky


def test_one_epoch_curves_and_failed_arms_are_drawn(tmp_path):
    arms = {"baseline": ({}, 0.0), "no_batch_norm": ({"batch_norm": False}, -0.5)}
    data = simulated_study(arms, epochs=1, missing={("no_batch_norm", 0), ("no_batch_norm", 1), ("no_batch_norm", 2)})
    build_report(data, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "failed" in html and "TrainingDiverged" in html
    assert (tmp_path / "figures" / "learning_curves.png").stat().st_size > 5000


def test_precision_rule_and_stop_reasons_are_recorded(tmp_path):
    data = simulated_study(LEAVE_ONE_OUT, precision={"target_ci_width": 0.004, "max_seeds": 3, "confidence": 0.95})
    summary = summary_table(data).set_index("arm")
    reasons = set(summary.drop("baseline")["stop_reason"])
    assert reasons <= {"target width reached", "max seeds reached"} or any("test set limits" in r for r in reasons)
    build_report(data, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "Precision-driven seeding" in html and "0.40 points" in html and "why it stopped" in html


def test_factorial_report_leads_with_effects_and_flags_identical_cells(tmp_path):
    study = STUDIES["factorial"]
    shifts = {"augmentation": 0.3, "batch_norm": 0.6, "dropout": 0.0, "step_lr": 0.0}
    arms = {arm: ({k: v for k, v in config.to_dict().items() if v != BASELINE.to_dict()[k]},
                  sum(shift for c, shift in shifts.items() if study.factors[arm][c]) - sum(shifts.values()))
            for arm, config in study.arms.items()}
    data = simulated_study(arms, n_seeds=2, n_images=2000, study="factorial", factors=study.factors)
    report = build_report(data, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert html.index("Factorial effects") < html.index("Each arm against the baseline")
    assert "Batch norm:" in html and "after Holm over the 10 main effects and two-way interactions" in html
    effects = pd.read_csv(tmp_path / "factorial_effects.csv").set_index("term")
    assert effects.loc["batch_norm", "p_value_holm"] < 0.05 and len(effects) == 15
    assert any("identical by construction" in note for note in report.notes)  # step_lr does nothing at 2 epochs
    assert (tmp_path / "figures" / "factorial_effects.png").exists()
    # Pooled seed error (issue 21): at 2 seeds the terms get 15 df, not 1, and intervals of a usable width.
    assert "pooled over the 15 orthogonal terms" in html
    main = effects[effects["order"] == 1]
    assert (effects["df"] > 10).all() and (main["ci_high"] - main["ci_low"]).max() < 0.015
    assert "74" not in " ".join(note for note in report.notes if "smallest visible" in note)


def test_planning_sentences_are_for_the_stated_effect_and_per_seed_differences_show(tmp_path):
    data = simulated_study(LEAVE_ONE_OUT, n_seeds=3)
    small = summary_table(data, smallest_effect=0.001).set_index("arm")
    large = summary_table(data, smallest_effect=0.05).set_index("arm")
    assert list(small.columns[-5:]) == ["smallest_effect", "df", "comparison", "worst_seed", "worst_seed_delta"]
    assert (small.drop("baseline")["smallest_effect"] == 0.001).all()
    # The plan depends on the stated effect, not on the observed difference.
    assert (small.drop("baseline")["seeds_needed"] >= large.drop("baseline")["seeds_needed"]).all()
    assert summary_table(data, equivalence_margin=0.002).set_index("arm").loc["no_dropout", "smallest_effect"] \
        == 0.002
    row = small.loc["no_dropout"]
    per_seed = data.correct.groupby(["arm", "seed"])["correct"].mean()
    deltas = {s: per_seed["no_dropout", s] - per_seed["baseline", s] for s in range(3)}
    assert row["worst_seed"] == min(deltas, key=deltas.get)
    assert row["worst_seed_delta"] == pytest.approx(min(deltas.values()))
    text = {f["arm"]: f["text"] for f in analysis.findings(data, small.reset_index(), 0.95)}["no_dropout"]
    assert f"the worst is seed {row['worst_seed']}" in text
    if row["verdict"] == analysis.INCONCLUSIVE:
        assert "0.10 points (--smallest-effect)" in text and "observed" not in text
    report = build_report(data, tmp_path, smallest_effect=0.002)
    assert (tmp_path / "figures" / "per_seed_differences.png").exists()
    assert any("rarer than about 1 in 3 seeds" in note for note in report.notes)
    csv = pd.read_csv(tmp_path / "ablation_summary.csv")
    assert list(csv.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS and (csv["smallest_effect"] == 0.002).all()
    with pytest.raises(ValueError, match="smallest effect 5"):
        summary_table(data, smallest_effect=5)


def test_two_seeds_say_what_they_can_see_and_nothing_beyond_the_range():
    data = simulated_study(LEAVE_ONE_OUT, n_seeds=2)
    summary = summary_table(data)
    notes = analysis.notes(data, summary, 0.95)
    assert any("Two seeds estimate the seed-to-seed variation from a single difference" in note for note in notes)
    row = summary.set_index("arm").loc["no_dropout"].copy()
    assert analysis.visible_phrase(2.0, analysis.largest_possible_difference(row)).startswith("no difference")
    for finding in analysis.findings(data, summary, 0.95):
        for number in re.findall(r"(\d+\.\d+) points", finding["text"]):
            assert float(number) <= 100
    # A 1-df interval or plan can reach past what accuracy allows; the page cuts it there (the CSV keeps it).
    from mnist_ablation.report import render

    wide = summary.copy()
    arm = wide["arm"] == "no_dropout"
    wide.loc[arm, ["delta_ci_low", "delta_ci_high", "mde"]] = [-3.0, 2.5, 4.0]
    shown = render.summary_display(wide, "baseline", 0.95)
    text = json.dumps(shown, ensure_ascii=False, default=str)
    assert "beyond the range" in text
    assert all(abs(float(number)) <= 100 for number in re.findall(r"[-+]?\d+\.\d+", text))
    row = wide[arm].iloc[0]
    low, high, clipped = analysis.shown_difference_interval(row)
    assert clipped and low == pytest.approx(-row["baseline_accuracy_paired"]) and high <= 1


def test_an_arm_on_other_seeds_gets_an_unpaired_comparison():
    data = simulated_study({"baseline": ({}, 0.0), "no_batch_norm": ({"batch_norm": False}, -1.5)}, n_seeds=3)
    moved = data.correct["arm"] == "no_batch_norm"
    data.correct.loc[moved, "seed"] += 10
    data.finished.loc[data.finished["arm"] == "no_batch_norm", "seed"] += 10
    summary = summary_table(data).set_index("arm")
    row = summary.loc["no_batch_norm"]
    assert row["comparison"] == "unpaired (no seed in common with the baseline)" and row["n_pairs"] == 0
    assert row["verdict"] == analysis.MATTERS and row["delta_ci_low"] < row["delta_vs_baseline"] < 0
    text = {f["arm"]: f["text"] for f in analysis.findings(data, summary.reset_index(), 0.95)}["no_batch_norm"]
    assert "an unpaired comparison" in text


# -- a tiny real study through the commands (trains models: slow) -------------------------------------------


@pytest.fixture(scope="module")
def two_seed_study(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    env = command_env(uri, data_dir)
    run_module("experiments.ablate", "--study", "leave-one-out", "--arms", "baseline,no_batch_norm", "--seeds", "2",
               "--train-subset", "200", "--epochs", "1", "--no-report", env=env, cwd=root)
    return root, uri, env


@pytest.mark.slow
def test_report_command_writes_summary_page_and_parent_artifacts(two_seed_study):
    root, uri, env = two_seed_study
    output = root / "report"
    result = run_module("experiments.report", "--study", "leave-one-out", "--tracking-uri", uri, "--output",
                        str(output), "--target-ci-width", "0.01", env=env, cwd=root)
    assert "report:" in result.stdout and "Seeds per arm for a 95% difference interval" in result.stdout
    summary = pd.read_csv(output / "ablation_summary.csv")
    assert list(summary["arm"]) == ["baseline", "no_batch_norm"] and list(summary["n_seeds"]) == [2, 2]
    arm = summary.set_index("arm").loc["no_batch_norm"]
    assert 0 <= arm["test_accuracy_ci_low"] <= arm["test_accuracy_mean"] <= arm["test_accuracy_ci_high"] <= 1
    assert arm["delta_ci_low"] <= arm["delta_vs_baseline"] <= arm["delta_ci_high"]
    assert 0 <= arm["p_value"] <= arm["p_value_holm"] <= 1 and arm["n_pairs"] == 2 and arm["mde"] > 0
    page = (output / "report.html").read_text()
    assert "Removing batch norm" in page and "python -m experiments.ablate" in page
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    parent = store.find_parent_run("leave-one-out")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/ablation_summary.csv", "report/report.html", "report/report.md", "report/figures"} <= logged
    assert parent.data.params["arms"] == "baseline,no_batch_norm" and parent.data.params["seeds"] == "2"
    assert any(key.startswith("test_accuracy_mean/") for key in parent.data.metrics)


@pytest.mark.slow
def test_report_functions_return_dataframes(two_seed_study):
    import mnist_ablation

    _, uri, _ = two_seed_study
    summary = mnist_ablation.ablation_summary("leave-one-out", tracking_uri=uri)
    assert list(summary["arm"]) == ["baseline", "no_batch_norm"]
    curves = mnist_ablation.learning_curves("leave-one-out", tracking_uri=uri, threshold=0.5)
    assert set(curves["arm"]) == {"baseline", "no_batch_norm"} and (curves["best_epoch_mean"] == 1).all()
    plan = mnist_ablation.seeds_needed("leave-one-out", 0.01, tracking_uri=uri)
    assert list(plan["arm"]) == ["no_batch_norm"] and plan["n_pairs"].iloc[0] == 2


@pytest.mark.slow
def test_report_of_an_unknown_study_fails_clearly(two_seed_study):
    root, uri, env = two_seed_study
    result = run_module("experiments.report", "--study", "factorial", "--tracking-uri", uri, env=env, cwd=root,
                        check=False)
    assert result.returncode == 2
    assert "no study 'factorial'" in result.stderr and "experiments.ablate --study factorial" in result.stderr


def test_one_paired_seed_gives_no_interval():
    data = simulated_study({"baseline": ({}, 0.0), "no_batch_norm": ({"batch_norm": False}, -0.5)}, n_seeds=1)
    summary = summary_table(data)
    for column in ("test_accuracy_ci_low", "delta_ci_low", "p_value", "p_value_holm"):
        assert summary[column].isna().all(), column
    text = analysis.findings(data, summary, 0.95)[1]["text"]
    assert "no interval or test can be computed" in text and math.isnan(summary["mde"].iloc[1])


def test_the_visible_effect_note_leaves_out_arms_identical_to_the_baseline():
    """An arm that is the baseline's own training run says nothing about what the seeds can see."""
    data = simulated_study(LEAVE_ONE_OUT, n_seeds=3)
    summary = summary_table(data)
    compared = summary[summary["arm"].isin(["no_batch_norm", "no_dropout"])]
    assert summary.set_index("arm").loc["constant_lr", "identical_to_baseline"]
    note = next(n for n in analysis.notes(data, summary, 0.95) if "smallest visible effect" in n)
    assert f"median {analysis.points(float(compared['mde'].median()))} points" in note
    assert summary.set_index("arm")["worst_seed"].dropna().map(type).eq(int).all()  # seed numbers, not 1.0
    # Its row shows no "smallest visible effect" (its difference is exactly zero): the CSV keeps the number.
    from mnist_ablation.report import render

    shown = render.summary_display(summary, "baseline", 0.95)
    column = shown["columns"].index("smallest visible effect (points)")
    visible = {row[0]: row[column] for row in shown["rows"]}
    assert visible["constant_lr"] == render.SAME_RUNS
    assert visible["no_dropout"] not in ("", render.SAME_RUNS)
