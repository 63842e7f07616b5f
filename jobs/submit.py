#!/usr/bin/env python3
"""Submits an sftray sweep to a Ray cluster as a Ray job: `ray job submit` with this checkout as working dir.

    python jobs/submit.py --address http://HEAD:8265 --output-dir /shared/sftray \
        --mlflow http://mlflow:5000 -- train=full sweep.epochs=[1,2]

Everything after `--` is passed to `sftray sweep` as Hydra overrides. The job runs `python -m sftray.cli sweep`
in a copy of this checkout (conf/ and sftray/ travel with it); the cluster supplies torch and Ray (its image is
built for its accelerators), the runtime env installs the rest of pyproject's dependencies (`--deps image` skips
that when the image already has them). Exit status: 0 when the job SUCCEEDED, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not uploaded: local environments, results, caches and tests (Ray also skips what .gitignore lists).
EXCLUDES = [".venv", ".git", "outputs", "mlruns", "tests", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.html"]
# Supplied by the cluster image: Ray must match the cluster's own, torch its CUDA/ROCm build.
FROM_IMAGE = {"ray", "torch"}
TRANSIENT = ("No available agent", "try again later")  # right after a head starts its agent is not up yet


def dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject's [project].dependencies minus what the cluster image supplies (Ray, torch)."""
    text = pyproject.read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ImportError:  # Python 3.10: no tomllib; the list is one flat array of quoted strings
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
        if block is None:
            raise SystemExit(f"error: no [project] dependencies array in {pyproject}") from None
        deps = re.findall(r'"([^"]+)"', block.group(1))
    return [d for d in deps if re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() not in FROM_IMAGE]


def runtime_env(*, deps: str) -> dict:
    env = {
        "working_dir": str(ROOT),
        "excludes": EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    }
    if deps == "pip":
        env["pip"] = {"packages": dependencies(), "pip_check": False}
    return env


def entrypoint(overrides: list[str], *, output_dir: str, cache_dir: str, mlflow_uri: str) -> list[str]:
    """The job's command as words (`ray job submit` quotes each one for the shell)."""
    # Paths are absolute on the cluster: the job's working dir is a temporary copy that Ray deletes later.
    args = [f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}", f"tracking.uri={mlflow_uri}"]
    return ["python", "-m", "sftray.cli", "sweep", *args, *overrides]


def ray_cli() -> list[str]:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise SystemExit("error: the `ray` command is not installed here (pip install 'ray[default]')")
    return [found]


def client_env() -> dict[str, str]:
    """The environment for the ray CLI: token auth on when a token is at hand and the mode is not set.

    `ray start` turns token auth on whenever a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); the job client does not infer it, so without this it would send no token.
    """
    env = dict(os.environ)
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        env["RAY_AUTH_MODE"] = "token"
    return env


def submit(cmd: list[str], *, env: dict[str, str], timeout_s: float = 120.0) -> None:
    """`ray job submit --no-wait`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            print(proc.stdout.strip())
            return
        output = proc.stdout + proc.stderr
        if not any(t in output for t in TRANSIENT) or time.monotonic() > deadline:
            sys.stderr.write(output)
            raise SystemExit(f"error: `ray job submit` failed (exit {proc.returncode})")
        time.sleep(3)


def job_status(ray: list[str], *, address: str, job_id: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [*ray, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr  # the ray CLI logs its answer to stderr
    # `ray job status` words it per state: "Job 'x' succeeded", "... failed", "... was stopped", else the state.
    for pattern, status in ((r"' succeeded", "SUCCEEDED"), (r"' failed", "FAILED"), (r"' was stopped", "STOPPED")):
        if re.search(pattern, out):
            return status
    found = re.search(r"Status for job '[^']*': (?:JobStatus\.)?(\w+)", out)
    return found.group(1).upper() if found else "UNKNOWN"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- hydra overrides]"
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
        help="the cluster's dashboard (job server) address (default: $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("SFTRAY_OUTPUT"),
        help="absolute folder on the cluster for prepared data, checkpoints and the default MLflow store; "
        "shared storage (NFS, ...) on multi-node clusters (default: $SFTRAY_OUTPUT)",
    )
    parser.add_argument("--cache-dir", help="cluster folder for built base models (default: OUTPUT_DIR/cache)")
    parser.add_argument(
        "--mlflow",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI as seen from the cluster, e.g. http://mlflow:5000 "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/mlflow.db on the head node)",
    )
    parser.add_argument(
        "--deps",
        choices=["pip", "image"],
        default="pip",
        help="pip: the runtime env installs pyproject's dependencies except ray and torch; "
        "image: the cluster image already has them",
    )
    parser.add_argument("--job-id", help="submission id (default: sftray-sweep-<random>)")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of following logs")
    parser.add_argument("--dry-run", action="store_true", help="print the ray command and runtime env, submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for `sftray sweep` (after --)")
    args = parser.parse_args(argv)

    if not args.output_dir or not Path(args.output_dir).is_absolute():
        parser.error("--output-dir (or $SFTRAY_OUTPUT) must be an absolute path on the cluster")
    output_dir = args.output_dir.rstrip("/")
    cache_dir = args.cache_dir or f"{output_dir}/cache"
    mlflow_uri = args.mlflow or f"sqlite:///{output_dir}/mlflow.db"
    job_id = args.job_id or f"sftray-sweep-{uuid.uuid4().hex[:8]}"
    ray = ray_cli()
    env = client_env()
    cmd = [
        *ray,
        "job",
        "submit",
        "--address",
        args.address,
        "--submission-id",
        job_id,
        "--runtime-env-json",
        json.dumps(runtime_env(deps=args.deps)),
        "--no-wait",
        "--",
        *entrypoint(args.overrides, output_dir=output_dir, cache_dir=cache_dir, mlflow_uri=mlflow_uri),
    ]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    submit(cmd, env=env)
    print(f"job {job_id} on {args.address}; MLflow: {mlflow_uri}")
    if args.no_wait:
        print(f"follow: ray job logs --address {args.address} --follow {job_id}")
        return 0
    subprocess.run([*ray, "job", "logs", "--address", args.address, "--follow", job_id], env=env)
    status = job_status(ray, address=args.address, job_id=job_id, env=env)
    while status in {"PENDING", "RUNNING"}:  # logs can end a moment before the status turns final
        time.sleep(2)
        status = job_status(ray, address=args.address, job_id=job_id, env=env)
    print(f"job {job_id}: {status}")
    if status == "SUCCEEDED":
        print(f"browse: mlflow ui --backend-store-uri {mlflow_uri}   (from a machine that can reach it)")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
