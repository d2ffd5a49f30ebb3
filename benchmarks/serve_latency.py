"""Latency of the model explorer's ``POST /api/predict``, measured over HTTP like a browser would see it.

    python -m benchmarks.serve_latency                       # trains a tiny run into a temporary store
    python -m benchmarks.serve_latency --run-id ID [--tracking-uri URI] --requests 500

Starts ``python -m experiments.serve`` on a free 127.0.0.1 port, warms it up, then sends a bounded
number of sequential requests with one keep-alive httpx client in three scenarios: a 28x28 MNIST test
image, the page's 112x112 drawing (MNIST preprocessing on the server), and the ensemble of all offered
runs. Without ``--run-id``/``--study`` it trains one tiny run (300 images, 1 epoch): the network is the
seed's full 469,578-parameter CNN, so the latency is that of a fully trained model. Prints a table and
writes ``benchmarks/results/serve_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, machine_text, number
from benchmarks.common import table as section_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "serve_latency.json"
DRAWING_SIZE = 112  # what the page sends
START_TIMEOUT_SECONDS = 300.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_latency", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", action="append", help="run(s) to serve; default: train a tiny one")
    which.add_argument("--study", help="serve this study's runs instead")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of --run-id/--study")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (also $MNIST_DATA_DIR)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per scenario (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 10_000:
        parser.error(f"--requests {args.requests} is out of range; use 1..10000 (the load is bounded on purpose).")
    return args


def train_tiny_run(store: Path, data_dir: str | None) -> tuple[str, str]:
    """(tracking URI, run id) of one 300-image, 1-epoch run of the seed's recipe in ``store``."""
    from mnist_ablation import tracking
    from mnist_ablation.config import BASELINE
    from mnist_ablation.data import load_mnist

    uri = tracking.use_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    tracked = tracking.run_training(BASELINE.replace(train_subset=300, epochs=1), load_mnist(data_dir),
                                    experiment_name="serve-latency", run_name="latency-model", verbose=0)
    return uri, tracked.run_id


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(arguments: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "experiments.serve", *arguments, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the server did not become healthy in {START_TIMEOUT_SECONDS:.0f} s:\n"
                       f"{log_path.read_text()[-3000:]}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(client, payloads: list[dict], count: int, warmup: int) -> dict:
    """Sequential POST /api/predict: client round-trip and the server's own model time (Server-Timing)."""
    for k in range(warmup):
        client.post("/api/predict", json=payloads[k % len(payloads)]).raise_for_status()
    round_trip, server_side = [], []
    for k in range(count):
        body = json.dumps(payloads[k % len(payloads)])  # encoding is the client's cost, not the server's
        start = time.perf_counter()
        answer = client.post("/api/predict", content=body, headers={"Content-Type": "application/json"})
        elapsed = (time.perf_counter() - start) * 1000
        answer.raise_for_status()
        round_trip.append(elapsed)
        timing = answer.headers.get("server-timing", "")
        if "dur=" in timing:
            server_side.append(float(timing.split("dur=")[1]))
    return {
        "requests": count,
        "p50_ms": percentile(round_trip, 50),
        "p90_ms": percentile(round_trip, 90),
        "p99_ms": percentile(round_trip, 99),
        "max_ms": max(round_trip),
        "mean_ms": statistics.fmean(round_trip),
        "server_p50_ms": percentile(server_side, 50) if server_side else None,
        "server_p99_ms": percentile(server_side, 99) if server_side else None,
        "body_bytes": len(json.dumps(payloads[0])),
    }


def drawing_payloads(images: np.ndarray, count: int) -> list[dict]:
    """MNIST digits blown up to the page's 112x112 drawing size, as the page would send them."""
    from mnist_ablation.preprocess import area_resize

    return [{"drawing": np.round(np.clip(area_resize(image.astype(np.float64), DRAWING_SIZE, DRAWING_SIZE), 0, 1), 3)
             .tolist()} for image in images[:count]]


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx

    from mnist_ablation.data import load_mnist

    images = load_mnist(args.data_dir).x_test[:50, :, :, 0]
    info = machine_record()
    with tempfile.TemporaryDirectory(prefix="serve_latency_") as scratch:
        scratch_path = Path(scratch)
        if args.study:
            serve_arguments = ["--study", args.study]
        elif args.run_id:
            serve_arguments = [argument for run_id in args.run_id for argument in ("--run-id", run_id)]
        else:
            print("training a tiny run (300 images, 1 epoch) to serve ...", flush=True)
            args.tracking_uri, run_id = train_tiny_run(scratch_path, args.data_dir)
            serve_arguments = ["--run-id", run_id]
        if args.tracking_uri:
            serve_arguments += ["--tracking-uri", args.tracking_uri]
        if args.data_dir:
            serve_arguments += ["--data-dir", args.data_dir]
        process, url = start_server(serve_arguments, scratch_path / "server.log")
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                models = client.get("/api/health").json()["models"]
                scenarios = {
                    "image 28x28": [{"image": image.tolist()} for image in images],
                    f"drawing {DRAWING_SIZE}x{DRAWING_SIZE} (preprocessed)": drawing_payloads(images, 10),
                }
                if len(models) > 1:
                    scenarios[f"ensemble of {len(models)}"] = [{"image": image.tolist(), "run_id": "ensemble"}
                                                                for image in images]
                results = {name: measure(client, payloads, args.requests, args.warmup)
                           for name, payloads in scenarios.items()}
        finally:
            process.terminate()
            process.wait(timeout=30)
    finish_machine_record(info)
    print(f"\nPOST /api/predict, {args.requests} sequential requests per scenario after {args.warmup} warm-up, "
          f"one keep-alive client on 127.0.0.1\n{machine_text(info)}\n")
    header = f"{'scenario':<34}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'server p50':>12}{'body KB':>9}"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        server = f"{row['server_p50_ms']:.2f}" if row["server_p50_ms"] is not None else "-"
        print(f"{name:<34}{row['p50_ms']:>9.2f}{row['p90_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['max_ms']:>9.2f}"
              f"{server:>12}{row['body_bytes'] / 1024:>9.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "serve_latency", "endpoint": "POST /api/predict", "models": models,
        "requests_per_scenario": args.requests, "warmup": args.warmup, "machine": info, "results": results,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    print(f"\nwrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    rows = [[name, row.get("requests"), number(row.get("p50_ms"), 1), number(row.get("p90_ms"), 1),
             number(row.get("p99_ms"), 1), number(row.get("server_p50_ms"), 1)]
            for name, row in data.get("results", {}).items()]
    out.tables.append(section_table(["request", "requests", "p50 (ms)", "p90 (ms)", "p99 (ms)", "server-side p50 (ms)"],
                                    rows))
    models = data.get("models")
    if isinstance(models, list):
        models = ", ".join(str(m.get("label", m.get("run_id"))) for m in models)
    out.lines.append(f"`{data.get('endpoint', 'POST /api/predict')}`, sequential requests after "
                     f"{data.get('warmup')} warm-up requests, one keep-alive httpx client on 127.0.0.1"
                     + (f"; served: {models}." if models else "."))


REPORT = Benchmark(
    key="serve_latency", title="Explorer latency", command="python -m benchmarks.serve_latency", order=50,
    about=("Latency of the model explorer's `POST /api/predict` over HTTP: sequential requests after a warm-up, "
           "one keep-alive client on 127.0.0.1, for a 28x28 image, the page's 112x112 drawing (MNIST "
           "preprocessing on the server) and the ensemble of all offered runs; server-side times come from the "
           "`Server-Timing` header. See [explorer.md](explorer.md)."),
    render=render_report,
    reconstruct=lambda d: (f"python -m benchmarks.serve_latency --requests {d.get('requests_per_scenario')} "
                           f"--warmup {d.get('warmup')}"))


if __name__ == "__main__":
    sys.exit(main())
