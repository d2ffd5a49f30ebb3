"""Issue 24: nothing read from the tracking store is trusted, credentials never leave the process, failures are fast.

Each test plants what a hostile or broken store could hold (a SavedModel whose initializer writes a file, a
Lambda layer, wrong shapes, NaN weights, impossible predictions, bad tags) in a real SQLite MLflow store, or
drives a real (tiny, failing) HTTP tracking server, and checks the answer is a 503 or one clear line.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnist_ablation import naming

from helpers import command_env, run_module

PASSWORD = "Pw'd \"q@x"  # quotes, a space and an "@": what finding 3 says leaked
IMAGE = [[0.0] * 28 for _ in range(28)]
JSON = {"Content-Type": "application/json"}


# ---------- planting runs in a real store ----------
def _create_run(tmp_path: Path, name: str, files: dict[str, bytes | str] | None = None, tags: dict | None = None,
                experiment: str = "planted", write=None, metrics: dict | None = None) -> str:
    """A FINISHED run with ``files`` (artifact path -> content) and whatever ``write(folder)`` puts in its model/."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
    root = tmp_path / "plant" / name
    for artifact, content in (files or {}).items():
        path = root / artifact
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if write is not None:
        (root / naming.MODEL_NAME).mkdir(parents=True, exist_ok=True)
        write(root / naming.MODEL_NAME)
    if root.exists():
        client.log_artifacts(run_id, str(root))
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _mlmodel(folder: Path, saved_model: bool = False, data: str = "data") -> None:
    (folder / "MLmodel").write_text(f"flavors:\n  keras:\n    data: {data}\n    keras_backend: tensorflow\n"
                                    f"    save_exported_model: {str(saved_model).lower()}\n")


def _keras_model(input_shape=(28, 28, 1), classes=10, layer=None):
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    if layer is not None:
        x = layer(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def _keras_writer(model):
    def write(folder: Path) -> None:
        _mlmodel(folder)
        (folder / "data").mkdir()
        model.save(folder / "data" / "model.keras")

    return write


def _saved_model_writer(marker: Path):
    """A TensorFlow SavedModel whose resource initializer writes ``marker`` when loaded (checked to be live)."""
    import tensorflow as tf

    class Planted(tf.saved_model.experimental.TrackableResource):
        def __init__(self):
            super().__init__()

        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="planted")

        def _initialize(self):
            tf.io.write_file(str(marker), "code from the store ran")

    def write(folder: Path) -> None:
        _mlmodel(folder, saved_model=True)
        module = tf.Module()
        module.planted = Planted()
        module.planted.resource_handle  # noqa: B018 - created before saving
        tf.saved_model.save(module, str(folder / "data" / "model"))
        tf.saved_model.load(str(folder / "data" / "model"))  # the plant is live: loading it runs the initializer
        assert marker.exists()
        marker.unlink()

    return write


def _client(run_ids: list[str], data_dir=None):
    from fastapi.testclient import TestClient

    from mnist_ablation.explorer import ModelExplorer, OfferedRun
    from mnist_ablation.serve import create_app

    runs = [OfferedRun(run_id, f"run{i}", f"run{i}", "1", None, None, None, None) for i, run_id in enumerate(run_ids)]
    explorer = ModelExplorer(runs, data_dir=data_dir)
    return explorer, TestClient(create_app(explorer, allowed_hosts=["testserver"]))


# ---------- finding 1: a model artifact cannot run code ----------
def test_a_planted_saved_model_runs_nothing_and_is_refused_for_good(tmp_path, tracking_uri):
    from mnist_ablation.explorer import open_explorer

    marker = tmp_path / "ran.txt"
    run_id = _create_run(tmp_path, "saved", write=_saved_model_writer(marker))
    # The default run: the warm-up call refuses it, and the server still starts.
    explorer = open_explorer(run_ids=[run_id], tracking_uri=tracking_uri)
    assert run_id in explorer.refused and "SavedModel" in explorer.refused[run_id]
    _, client = _client([run_id])
    for _ in range(2):  # refused once, answered from the cache after
        answer = client.post("/api/predict", json={"image": IMAGE, "run_id": run_id})
        assert answer.status_code == 503, answer.text
        assert run_id in answer.json()["detail"] and "SavedModel" in answer.json()["detail"]
    assert client.get("/api/health").status_code == 200
    assert not marker.exists(), "loading the model ran the SavedModel's initializer"


def test_a_lambda_layer_is_refused_by_safe_mode(tmp_path, tracking_uri):
    import keras

    marker = tmp_path / "lambda-ran.txt"
    target = str(marker)
    layer = keras.layers.Lambda(lambda x: (open(target, "w").close(), x)[1])  # noqa: SIM115
    run_id = _create_run(tmp_path, "lambda", write=_keras_writer(_keras_model(layer=layer)))
    marker.unlink(missing_ok=True)  # building the model called the lambda once
    _, client = _client([run_id])
    answer = client.post("/api/saliency", json={"image": IMAGE, "run_id": run_id})
    assert answer.status_code == 503 and "safe" in answer.json()["detail"], answer.text
    assert not marker.exists()


@pytest.mark.parametrize("data", ["/etc", "../../elsewhere", "data/../../x"])
def test_a_data_path_outside_the_model_is_refused(tmp_path, tracking_uri, data):
    run_id = _create_run(tmp_path, "escape", write=lambda folder: _mlmodel(folder, data=data))
    _, client = _client([run_id])
    answer = client.post("/api/predict", json={"image": IMAGE, "run_id": run_id})
    assert answer.status_code == 503 and "outside the model directory" in answer.json()["detail"], answer.text


# ---------- finding 4: bad data in the store is a 503 or one line ----------
def test_wrong_shapes_and_nan_weights_are_refused_and_a_good_run_still_answers(tmp_path, tracking_uri):
    nan_model = _keras_model()
    nan_model.set_weights([np.full_like(w, np.nan) for w in nan_model.get_weights()])
    bad = {"wide": _keras_model(input_shape=(32, 32, 1)), "three": _keras_model(classes=3), "nan": nan_model}
    run_ids = {name: _create_run(tmp_path, name, write=_keras_writer(model)) for name, model in bad.items()}
    good = _create_run(tmp_path, "good", write=_keras_writer(_keras_model()))
    _, client = _client([good, *run_ids.values()])
    for name, words in (("wide", "(None, 32, 32, 1)"), ("three", "(None, 3)"), ("nan", "NaN")):
        answer = client.post("/api/predict", json={"image": IMAGE, "run_id": run_ids[name]})
        assert answer.status_code == 503 and words in answer.json()["detail"], answer.text
    answer = client.post("/api/predict", json={"image": IMAGE, "run_id": good})
    assert answer.status_code == 200 and len(answer.json()["probabilities"]) == 10


def test_heat_maps_of_nan_are_zero_not_int_min():
    from mnist_ablation.explorer import quantized

    assert quantized(np.array([np.nan, 0.5, 2.0, -1.0])) == [0, 128, 255, 0]


def _predictions(**changes) -> bytes:
    frame = pd.DataFrame({"index": np.arange(10), "label": np.arange(10), "predicted": np.arange(10),
                          **{f"prob_{k}": np.eye(10)[:, k] for k in range(10)}})
    for column, (row, value) in changes.items():
        frame.loc[row, column] = value
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def test_impossible_predictions_are_a_503_on_the_confusion_matrix_and_the_test_set(tmp_path, tracking_uri, data_dir):
    label_42 = _create_run(tmp_path, "label42", {naming.PREDICTIONS_ARTIFACT: _predictions(label=(3, 42))})
    index_far = _create_run(tmp_path, "index99999", {naming.PREDICTIONS_ARTIFACT: _predictions(index=(3, 99999))})
    _, client = _client([label_42, index_far], data_dir=str(data_dir))
    answer = client.get(f"/api/runs/{label_42}/confusion")
    assert answer.status_code == 503 and "label 42 is not a class" in answer.json()["detail"], answer.text
    answer = client.get(f"/api/runs/{index_far}/examples")
    assert answer.status_code == 503 and "do not match the MNIST test" in answer.json()["detail"], answer.text


def _cell_tags(arm, seed, study="mix"):
    tags = {naming.ROLE_TAG: naming.CELL_ROLE, naming.STUDY_TAG: study, naming.CONFIG_HASH_TAG: "h" + str(seed)}
    if arm is not None:
        tags[naming.ARM_TAG] = arm
    if seed is not None:
        tags[naming.SEED_TAG] = str(seed)
    return tags


def test_an_ensemble_of_a_three_class_and_a_ten_class_run_is_one_clear_error(tmp_path, tracking_uri):
    from mnist_ablation.ensemble import build_ensemble
    from mnist_ablation.errors import UserError

    ten = pd.read_parquet(io.BytesIO(_predictions()))
    narrow = ten.drop(columns=[f"prob_{k}" for k in range(3, 10)]).assign(label=ten["label"] % 3,
                                                                       predicted=ten["predicted"] % 3)
    buffer = io.BytesIO()
    narrow.to_parquet(buffer)
    experiment = naming.ablation_experiment("mix")
    _create_run(tmp_path, "ten", {naming.PREDICTIONS_ARTIFACT: _predictions()}, _cell_tags("baseline", 0),
                experiment=experiment, metrics={"val_accuracy": 0.9})
    _create_run(tmp_path, "three", {naming.PREDICTIONS_ARTIFACT: buffer.getvalue()}, _cell_tags("baseline", 1),
                experiment=experiment, metrics={"val_accuracy": 0.8})
    with pytest.raises(UserError, match=r"lacks the columns prob_3, .*a model of another number of classes"):
        build_ensemble("mix")


@pytest.mark.parametrize("arm, seed, words", [("baseline", "x", "seed' tag 'x'"), (None, 0, "has no 'arm' tag")])
def test_a_cell_run_with_a_bad_seed_or_no_arm_tag_is_one_clear_error(tmp_path, tracking_uri, arm, seed, words):
    from mnist_ablation.errors import UserError
    from mnist_ablation.explorer import study_runs_to_offer
    from mnist_ablation.report.gather import gather_study

    experiment = naming.ablation_experiment("mix")
    _create_run(tmp_path, "parent", tags={naming.ROLE_TAG: naming.STUDY_ROLE, naming.STUDY_TAG: "mix"},
                experiment=experiment)
    _create_run(tmp_path, "good", tags=_cell_tags("baseline", 0), experiment=experiment)
    bad = _create_run(tmp_path, "bad", tags=_cell_tags(arm, seed), experiment=experiment)
    for reader in (study_runs_to_offer, gather_study):  # serve --study, report
        with pytest.raises(UserError, match=words) as raised:
            reader("mix")
        assert bad in str(raised.value)


# ---------- finding 5: IPv6 ----------
def test_an_ipv6_listener_answers_its_own_host_header():
    from fastapi.testclient import TestClient

    from mnist_ablation.explorer import ModelExplorer, OfferedRun
    from mnist_ablation.serve import create_app, trusted_hosts

    explorer = ModelExplorer([OfferedRun("f" * 32, "a", "a", "1", None, None, None, None)])
    client = TestClient(create_app(explorer, allowed_hosts=trusted_hosts("::1")))
    for host in ("[::1]:8000", "[::1]", "127.0.0.1:8000", "localhost"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    for host in ("[::2]:8000", "evil.example", "[::1.evil.example"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 400, host


# ---------- finding 6: control characters in names ----------
def test_doctor_and_serve_print_escape_sequences_in_names_as_text(tmp_path, tracking_uri, capsys):
    from experiments import doctor
    from experiments.serve import describe_offered
    from mnist_ablation.explorer import OfferedRun

    arm = "evil\x1b[2J\x1b[31m"
    _create_run(tmp_path, f"{arm}-seed0", tags={**_cell_tags(arm, 0), naming.FAILURE_REASON_TAG: "boom\x1b[H"},
                experiment=naming.ablation_experiment("mix"))
    from mlflow.tracking import MlflowClient

    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("ablation/mix").experiment_id])[0]
    MlflowClient().set_terminated(run.info.run_id, "FAILED")
    doctor.main(["--tracking-uri", tracking_uri])
    printed = capsys.readouterr().out + describe_offered([OfferedRun("r" * 32, arm, arm, "1", arm, "0", None, None)])
    assert "\x1b" not in printed and "evil\\x1b[2J" in printed


# ---------- finding 7: dead databases and directories fail fast, in one line ----------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_database_and_a_directory_tracking_uri_fail_in_seconds_with_one_line(tmp_path, data_dir):
    dead = f"postgresql://mlflow:{PASSWORD.replace(' ', '%20').replace('@', '%40')}@127.0.0.1:{_free_port()}/mlflow"
    for uri, words in ((dead, "cannot connect to the tracking database"),
                       (str(tmp_path / "a-directory"), f"sqlite:///{tmp_path / 'a-directory' / 'mlflow.db'}")):
        started = time.monotonic()
        result = run_module("experiments.doctor", "--tracking-uri", uri, env=command_env(uri, data_dir), cwd=tmp_path,
                            check=False, timeout=90)
        assert result.returncode == 2 and words in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Pw'd" not in result.stderr + result.stdout
        assert time.monotonic() - started < 40


# ---------- finding 8: seeds and --output are checked before anything runs ----------
def test_a_seed_of_2_to_the_32_fails_validation():
    from mnist_ablation.config import BASELINE, ConfigError, with_overrides

    with pytest.raises(ConfigError, match="seed"):
        with_overrides(BASELINE, {"seed": 2**32})
    assert with_overrides(BASELINE, {"seed": 2**32 - 1}).seed == 2**32 - 1


def test_an_unwritable_output_fails_before_any_cell(tmp_path, tracking_uri, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    started = time.monotonic()
    result = run_module("experiments.ablate", "--arms", "baseline", "--seeds", "1", "--epochs", "1",
                        "--train-subset", "100", "--output", str(blocker / "report"),
                        env=command_env(tracking_uri, data_dir), cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 2 and "--output" in result.stderr and "cannot be written" in result.stderr
    assert "Traceback" not in result.stderr and "finished baseline" not in result.stdout
    assert time.monotonic() - started < 60


# ---------- finding 2: a tracking server that fails requests never gets the password printed ----------
class _FailingTrackingServer(http.server.BaseHTTPRequestHandler):
    """Healthy on /health; every API call fails with a 400 whose message quotes the basic-auth credentials,
    the Host and the path (a chatty proxy), so any error text MLflow builds from it holds the password."""

    def _answer(self):
        if self.path.rstrip("/").endswith("/health"):
            body, status = b"OK", 200
        else:
            auth = self.headers.get("Authorization", "")
            decoded = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else "none"
            body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                               "message": f"refused {self.path} for {decoded} via http://{decoded}@{self.headers['Host']}"
                               }).encode()
            status = 400
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status != 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def failing_tracking_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingTrackingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _grep_tree(root: Path, secret: str) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_the_explorer_never_answers_with_the_password(tmp_path, failing_tracking_server, monkeypatch):
    from urllib.parse import quote

    import mlflow

    from mnist_ablation.tracking import use_tracking_uri

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # use_tracking_uri sets them: restored after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    previous = mlflow.get_tracking_uri()
    use_tracking_uri(f"http://alice:{quote(PASSWORD, safe='')}@{failing_tracking_server}")
    run_id = "a" * 32
    _, client = _client([run_id])
    try:
        answers = [client.get(f"/api/runs/{run_id}"), client.get(f"/api/runs/{run_id}/confusion"),
                   client.post("/api/predict", json={"image": IMAGE, "run_id": run_id})]
    finally:
        mlflow.set_tracking_uri(previous)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert PASSWORD not in answer.text and quote(PASSWORD, safe="") not in answer.text and "***" in answer.text


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_no_command_prints_or_stores_the_password_of_a_failing_tracking_server(tmp_path, failing_tracking_server,
                                                                            data_dir):
    """Every command against a server that answers each request with an MLflow error: one redacted ``error:``
    line naming the server, the request and the server's answer, no traceback, exit 1."""
    from urllib.parse import quote

    uri = f"http://alice:{quote(PASSWORD, safe='')}@{failing_tracking_server}"
    env = command_env(uri, data_dir, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    commands = [
        ("experiments.train", "--epochs", "1", "--train-subset", "100"),
        ("experiments.ablate", "--arms", "baseline", "--seeds", "1", "--epochs", "1", "--train-subset", "100"),
        ("experiments.report", "--study", "leave-one-out"),
        ("experiments.doctor",),
        ("experiments.ensemble", "--study", "leave-one-out", "--top-k", "1"),
        ("experiments.serve", "--study", "leave-one-out", "--port", str(_free_port())),
        ("experiments.tune", "--n-trials", "1", "--epochs", "1", "--train-subset", "100"),
    ]

    def run(command):  # each in its own directory: their local stores (queue, checkpoints) never race
        cwd = tmp_path / command[0]
        cwd.mkdir()
        return run_module(*command, "--tracking-uri", uri, env=env, cwd=cwd, check=False, timeout=180)

    # Each spends most of its ~6 s of CPU importing TensorFlow: one per core at a time, not one after another.
    with ThreadPoolExecutor(max_workers=min(len(commands), max(2, os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, commands))
    shown = f"http://alice:***@{failing_tracking_server}"
    for command, result in zip(commands, results, strict=True):
        output = result.stdout + result.stderr
        assert result.returncode == 1, f"{command[0]} exited {result.returncode}:\n{output[-3000:]}"
        assert "Traceback" not in output, f"{command[0]} printed a traceback:\n{output[-3000:]}"
        errors = _error_lines(output)
        assert len(errors) == 1, f"{command[0]} did not print one error line:\n{output[-3000:]}"
        assert errors[0].startswith(f"error: the MLflow tracking server {shown} refused the request to "), errors
        assert "HTTP 400 INVALID_PARAMETER_VALUE: refused /api/2.0/mlflow/" in errors[0], errors
        assert errors[0].endswith("check --tracking-uri / $MLFLOW_TRACKING_URI and the server's log "
                                  "(MNIST_ABLATION_TRACEBACK=1 shows the traceback)"), errors
        for secret in (PASSWORD, quote(PASSWORD, safe=""), "Pw'd"):
            assert secret not in output, f"{command[0]} printed the password:\n{output[-3000:]}"
    # Nothing written locally (queue database, checkpoints, logs) holds it either.
    assert _grep_tree(tmp_path, "Pw'd") == [] and _grep_tree(tmp_path, quote(PASSWORD, safe="")) == []


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.slow
def test_a_tracking_server_that_is_gone_fails_in_one_line(tmp_path, data_dir):
    """Nothing listening: the check before any work says so (exit 2). A server that answers the health check and
    is gone by the first API call (stopped mid-command): the request's line, connection refused (exit 1), here
    with $MNIST_ABLATION_TRACEBACK=1, so the (redacted) traceback comes first."""
    from urllib.parse import quote

    gone = http.server.HTTPServer(("127.0.0.1", 0), _HealthOnly)
    gone_after_health = f"127.0.0.1:{gone.server_address[1]}"

    def answer_once_and_stop():
        gone.handle_request()
        gone.server_close()

    thread = threading.Thread(target=answer_once_and_stop, daemon=True)
    thread.start()
    not_listening = f"127.0.0.1:{_free_port()}"

    def doctor(host, **extra):
        uri = f"http://alice:{quote(PASSWORD, safe='')}@{host}"
        cwd = tmp_path / host.replace(":", "-")
        cwd.mkdir()
        env = command_env(uri, data_dir, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
                          **extra)
        return run_module("experiments.doctor", "--tracking-uri", uri, env=env, cwd=cwd, check=False, timeout=120)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        before_work = pool.submit(doctor, not_listening)
        mid_command = pool.submit(doctor, gone_after_health, MNIST_ABLATION_TRACEBACK="1")
        before_work, mid_command = before_work.result(), mid_command.result()
    thread.join(timeout=5)
    gone.server_close()
    output = before_work.stdout + before_work.stderr
    assert before_work.returncode == 2 and "Traceback" not in output, output[-3000:]
    reachable = f"error: MLflow tracking server at http://alice:***@{not_listening} is not reachable"
    assert len(_error_lines(output)) == 1 and _error_lines(output)[0].startswith(reachable), output[-3000:]
    output = mid_command.stdout + mid_command.stderr
    assert mid_command.returncode == 1 and "Traceback" in output, output[-3000:]
    assert len(_error_lines(output)) == 1 and output.strip().splitlines()[-1] == (
        f"error: the MLflow tracking server http://alice:***@{gone_after_health} could not be reached for the request "
        "to list the experiments (POST /api/2.0/mlflow/experiments/search: connection refused, retried 0 times "
        "($MLFLOW_HTTP_REQUEST_MAX_RETRIES)); start it or check --tracking-uri / $MLFLOW_TRACKING_URI and the "
        "server's log"), output[-3000:]
    for output in (before_work.stdout + before_work.stderr, mid_command.stdout + mid_command.stderr):
        assert "Pw'd" not in output and quote(PASSWORD, safe="") not in output
    assert time.monotonic() - started < 60


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers as the first path segment of the tracking URI says (``http://host/503``): MLflow JSON errors, a
    proxy's HTML page, a web server that is not MLflow, or no answer within the client's timeout."""

    def _answer(self):
        kind = self.path.strip("/").split("/")[0]
        if kind == "slow":
            time.sleep(2)
        status, body = {
            "400": (400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad\nname \x1b[2J"})),
            "503": (503, json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"})),
            "404-html": (404, "<html><body><h1>Not Found</h1></body></html>"),
            "200-html": (200, "<html><body>a web page</body></html>"),
        }.get(kind, (200, "{}"))
        payload = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (timeout)
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def answering_server(monkeypatch):
    """An HTTP server answering as ``_Answers`` does, MLflow's client talking to it as alice (one try, 1 s)."""
    import mlflow

    from mnist_ablation.redaction import remember_secret

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    remember_secret(PASSWORD)  # as every command does first
    previous = mlflow.get_tracking_uri()
    yield f"127.0.0.1:{server.server_address[1]}"
    mlflow.set_tracking_uri(previous)
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("answer, words", [
    ("400", "refused the request to look up an experiment (GET /400/api/2.0/mlflow/experiments/get-by-name: "
            "HTTP 400 INVALID_PARAMETER_VALUE: bad name \\x1b[2J); check --tracking-uri"),
    ("503", "failed the request to look up an experiment (GET /503/api/2.0/mlflow/experiments/get-by-name: "
            "HTTP 503, retried 0 times ($MLFLOW_HTTP_REQUEST_MAX_RETRIES)); check --tracking-uri"),
    ("404-html", "refused the request to look up an experiment (GET /404-html/api/2.0/mlflow/experiments/"
                 "get-by-name: HTTP 404: <html><body><h1>Not Found</h1></body></html>); check --tracking-uri"),
    ("200-html", "answered the request to look up an experiment with something other than MLflow's JSON (GET "
                 "/200-html/api/2.0/mlflow/experiments/get-by-name: HTTP 200: <html><body>a web page"),
    ("slow", "did not answer the request to look up an experiment within 1 s (GET /slow/api/2.0/mlflow/"
             "experiments/get-by-name: timed out, retried 0 times"),
])
def test_a_failed_request_is_one_line_naming_the_server_the_request_and_the_answer(answering_server, answer,
                                                                                  words):
    import mlflow

    from mnist_ablation.tracking import server_failure

    mlflow.set_tracking_uri(f"http://{answering_server}/{answer}")
    with pytest.raises(mlflow.exceptions.MlflowException) as raised:
        mlflow.tracking.MlflowClient().get_experiment_by_name("mnist")
    line = server_failure(raised.value)
    assert line.startswith(f"the MLflow tracking server http://alice:***@{answering_server}/{answer} {words}"), line
    assert "\n" not in line and "\x1b" not in line and "Pw'd" not in line


def test_an_artifact_upload_the_server_refuses_names_the_upload(answering_server):
    # MLflow's artifact client (mlflow-artifacts:/) raises requests' HTTPError, not an MlflowException.
    import mlflow
    import requests
    from mlflow.utils.rest_utils import MlflowHostCreds, augmented_raise_for_status, http_request

    from mnist_ablation.tracking import server_failure

    mlflow.set_tracking_uri(f"http://{answering_server}/404-html")
    response = http_request(MlflowHostCreds(mlflow.get_tracking_uri(), username="alice", password=PASSWORD),
                            "/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/model.keras", "PUT", data=b"")
    with pytest.raises(requests.HTTPError) as raised:
        augmented_raise_for_status(response)
    assert server_failure(raised.value) == (
        f"the MLflow tracking server http://alice:***@{answering_server}/404-html refused the request to upload an "
        "artifact (PUT /404-html/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/model.keras: HTTP 404: "
        "<html><body><h1>Not Found</h1></body></html>); check --tracking-uri / $MLFLOW_TRACKING_URI and the "
        "server's log")


def test_errors_that_are_not_a_failed_request_keep_their_traceback(answering_server):
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    from mnist_ablation.tracking import server_failure

    mlflow.set_tracking_uri(f"http://{answering_server}/400")
    assert server_failure(ValueError("a bug")) is None
    assert server_failure(MlflowException("Invalid metric name: 'a//b'")) is None  # MLflow's own check, no request
    with pytest.raises(requests.ConnectionError) as raised:  # requests' own call to another server
        requests.get(f"http://127.0.0.1:{_free_port()}/data.npz", timeout=5)
    assert server_failure(raised.value) is None


def test_the_queue_records_failure_reasons_without_the_password(tmp_path):
    """A server stopped mid-study: the FAILED reason (the line and the queue's failure_reason) is redacted."""
    import optuna

    from mnist_ablation.storage import open_storage
    from mnist_ablation.sweep import Cell
    from mnist_ablation.workqueue import CellQueue

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    queue = CellQueue(open_storage(url), "leave-one-out", poll_seconds=0.1)
    study = queue.open_round([Cell("baseline", 0, "h0")], is_done=lambda cell: False)
    claim = queue.claim(study)
    queue.fail(claim, f"MlflowException: API request to http://alice:{PASSWORD}@127.0.0.1:5000/api/2.0/mlflow/"
                      "runs/log-batch failed")
    reasons = [t.user_attrs.get("failure_reason") for t in optuna.load_study(study_name=study.study_name,
                                                                              storage=url).trials]
    assert reasons and all("Pw'd" not in reason and "alice:***@127.0.0.1" in reason for reason in reasons), reasons
