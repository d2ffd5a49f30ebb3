"""Studies of the user's own (``ablate --study-file FILE``): validation, one-line errors, and the study as recorded."""

import json

import pytest

from mnist_ablation import naming, store
from mnist_ablation.config import BASELINE
from mnist_ablation.studies import STUDIES, study_from_definition
from mnist_ablation.study_file import StudyFileError, line_of, load_study_file

from helpers import command_env, run_module

# The form issue 23 spells out, verbatim.
EXAMPLE = '''name = "my-study"
question = "Does a narrower dense layer cost accuracy?"
[baseline]              # optional: overrides of the seed's recipe shared by every arm
epochs = 15
[arms.narrow_dense]     # the baseline arm is always `baseline`
dense_units = 128
'''
HEAD = 'name = "mine"\nquestion = "q?"\n'


def _load(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return load_study_file(path)


def _error(tmp_path, text) -> str:
    with pytest.raises(StudyFileError) as raised:
        _load(tmp_path, text)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "study.toml"))
    return message


def test_the_issue_example_defines_a_baseline_and_one_arm(tmp_path):
    study = _load(tmp_path, EXAMPLE)
    assert study.name == "my-study" and study.description == "Does a narrower dense layer cost accuracy?"
    assert list(study.arms) == ["baseline", "narrow_dense"] and study.baseline_arm == "baseline"
    assert study.arms["baseline"] == BASELINE.replace(epochs=15)
    assert study.overrides("narrow_dense") == {"dense_units": 128}
    # What the store records rebuilds the same study, without the file.
    assert json.loads(json.dumps(study.definition)) == study.definition
    again = study_from_definition(study.definition)
    assert again.arms == study.arms and again.description == study.description


def test_components_make_a_factorial_study(tmp_path):
    study = _load(tmp_path, HEAD + '[baseline]\nepochs = 3\n[components.bn]\nbatch_norm = false\n'
                               '[components.step]\nlr_schedule = "constant"\n')
    assert list(study.arms) == ["baseline", "no_step", "no_bn", "no_bn+no_step"]
    assert study.factors["no_bn"] == {"bn": False, "step": True}
    assert study.arms["no_bn+no_step"] == BASELINE.replace(epochs=3, batch_norm=False, lr_schedule="constant")
    assert study_from_definition(study.definition).factors == study.factors


@pytest.mark.parametrize(("text", "where", "says"), [
    (HEAD + "[arms.narrow]\ndense_unit = 128\n", "line 4, key arms.narrow.dense_unit",
     "unknown config field 'dense_unit'. Did you mean 'dense_units'?"),
    ('name = "mine"\nquestoin = "q?"\n[arms.a]\ndropout = false\n', "line 2, key questoin", "Did you mean 'question'?"),
    (HEAD + "[arms.a]\ndense_units = -3\n", "line 4, key arms.a.dense_units", "expected an integer >= 1"),
    (HEAD + '[arms.a]\nlr_schedule = "cosin"\n', "line 4, key arms.a.lr_schedule", "'cosine'"),
    (HEAD + '[baseline]\nbatch_norm = "maybe"\n[arms.a]\ndropout = false\n', "line 4, key baseline.batch_norm",
     "use true/false"),
    (HEAD + "[arms.a]\n[arms.b]\ndropout = false\n", "line 3, key arms.a", "is empty"),
    (HEAD + "[arms.a]\ndropout = false\n[arms.b]\ndropout = false\n", "line 5, key arms.b",
     "same config as 'a'"),
    (HEAD + "[arms.a]\ndropout = false\n[arms.a]\nbatch_norm = false\n", "not valid TOML",
     "Cannot declare ('arms', 'a') twice (at line 5"),
    (HEAD + "[arms.baseline]\ndropout = false\n", "line 3, key arms.baseline", "always `baseline`"),
    (HEAD + "[baseline]\nepochs = 3\n[arms.a]\nepochs = 3\n", "line 5, key arms.a", "baseline again"),
    (HEAD + "[arms.a]\nseed = 3\n", "line 4, key arms.a.seed", "--seeds"),
    ('name = "factorial"\nquestion = "q?"\n[arms.a]\ndropout = false\n', "line 1, key name",
     "is a built-in study's; choose another name"),
    (HEAD, "key arms", "no arms"),
    ('name = "my study"\nquestion = "q?"\n[arms.a]\ndropout = false\n', "line 1, key name", "not a usable name"),
    (HEAD + "[arms.a]\ndense_units = \n", "not valid TOML", "line 4"),
])
def test_each_mistake_is_one_line_naming_the_file_the_key_and_the_fix(tmp_path, text, where, says):
    message = _error(tmp_path, text)
    assert where in message and says in message, message


def test_line_of_finds_tables_and_keys():
    assert line_of(EXAMPLE, ("name",)) == 1 and line_of(EXAMPLE, ("arms", "narrow_dense")) == 5
    assert line_of(EXAMPLE, ("arms", "narrow_dense", "dense_units")) == 6 and line_of(EXAMPLE, ("arms", "x")) is None


def test_built_in_studies_are_not_taken_from_files():
    assert all(study.definition is None for study in STUDIES.values())


def test_a_typo_in_a_study_file_is_one_line_and_exit_2(tmp_path, tracking_uri, data_dir):
    study_file = tmp_path / "typo.toml"
    study_file.write_text(EXAMPLE.replace("dense_units", "dense_unitz"))
    result = run_module("experiments.ablate", "--study-file", str(study_file), env=command_env(tracking_uri, data_dir),
                        cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {study_file}, line 6, key arms.narrow_dense.dense_unitz: unknown config field")
    assert "Did you mean 'dense_units'?" in line
    assert not (tmp_path / "store" / "mlflow.db").exists()  # checked before anything ran


@pytest.mark.slow
def test_a_study_file_runs_and_later_commands_read_it_from_the_store(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir)
    study_file = tmp_path / "my_study.toml"
    study_file.write_text(EXAMPLE)
    tiny = ("--seeds", "1", "--train-subset", "200", "--epochs", "1")
    first = run_module("experiments.ablate", "--study-file", str(study_file), *tiny, "--no-report", env=env,
                       cwd=tmp_path)
    assert "Study 'my-study'" in first.stdout and "narrow_dense" in first.stdout
    recorded = store.study_definition("my-study")
    assert recorded[naming.RECORDED_DEFINITION_KEY]["arms"] == {"narrow_dense": {"dense_units": 128}}
    assert {c["arm"]: c["config"]["dense_units"] for c in recorded["cells"]} == {"baseline": 256, "narrow_dense": 128}

    study_file.unlink()  # from here on, the store holds the only definition
    report = run_module("experiments.report", "--study", "my-study", "--no-mlflow-log", env=env, cwd=tmp_path)
    assert "narrow_dense" in report.stdout
    markdown = (tmp_path / "reports" / "my-study" / "report.md").read_text()
    assert "Does a narrower dense layer cost accuracy?" in markdown and "narrow_dense" in markdown
    rerun = run_module("experiments.ablate", "--study", "my-study", *tiny, "--no-report", env=env, cwd=tmp_path)
    assert "skipping 2 of 2 cells" in rerun.stdout


def test_a_factorial_study_file_is_analysed_by_its_own_components():
    from test_report import simulated_study

    from mnist_ablation.report import analysis

    study = study_from_definition({"name": "mine", "question": "q?",
                                   "components": {"bn": {"batch_norm": False}, "drop": {"dropout": False}}})
    arms = {arm: ({"batch_norm": config.batch_norm, "dropout": config.dropout}, 0.0 if config.batch_norm else -1.0)
            for arm, config in study.arms.items()}
    section = analysis.factorial_section(simulated_study(arms, n_seeds=3, n_images=500, factors=study.factors), 0.95)
    assert list(section["effects"]["term"]) == ["bn", "drop", "bn:drop"]
