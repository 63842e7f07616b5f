"""jobs/: the submit script on a real Ray cluster started on loopback, and the cluster/KubeRay manifests checked
against Ray's own schema, pyproject and the config schema."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from sftray.config import compose_config

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def _load_submit():
    spec = importlib.util.spec_from_file_location("sftray_jobs_submit", JOBS / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = _load_submit()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _overrides(words: list[str]) -> list[str]:
    assert words[:4] == ["python", "-m", "sftray.cli", "sweep"], words[:4]
    return words[4:]


# -- manifests -------------------------------------------------------------------------------------------------


def test_runtime_env_ships_the_checkout_and_every_dependency_but_ray_and_torch():
    deps = submit.dependencies()
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith(("ray", "torch")) for d in deps)
    assert len(deps) == len(declared) - 2 and set(deps) < set(declared)
    env = submit.runtime_env(deps="pip")
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"]
    assert env["pip"]["packages"] == deps
    assert "pip" not in submit.runtime_env(deps="image")


def test_dry_run_passes_overrides_paths_and_mlflow_uri_through(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    assert (
        submit.main(
            ["--address", "http://h:8265", "--output-dir", "/shared/x", "--dry-run", "--", "sweep.epochs=[1,2]"]
        )
        == 0
    )
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[cmd.index("--address") + 1] == "http://h:8265"
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert env["working_dir"] == str(ROOT)
    overrides = _overrides(cmd[cmd.index("--") + 1 :])
    assert overrides == [
        "paths.output_dir=/shared/x",
        "paths.cache_dir=/shared/x/cache",
        "tracking.uri=sqlite:////shared/x/mlflow.db",
        "sweep.epochs=[1,2]",
    ]
    compose_config(overrides)  # the entrypoint's overrides are valid sftray config


def test_relative_output_dir_is_refused(capsys):
    with pytest.raises(SystemExit):
        submit.main(["--output-dir", "outputs", "--dry-run"])
    assert "absolute path" in capsys.readouterr().err


def test_cluster_launcher_yaml_is_valid_for_ray():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((JOBS / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")


def test_rayjob_manifest_matches_pyproject_ray_and_the_config_schema():
    import ray

    job = yaml.safe_load((JOBS / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    compose_config(_overrides(shlex.split(spec["entrypoint"])))
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["pip"]["packages"] == submit.dependencies()
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray:{ray.__version__}")
            assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0]


# -- a real cluster --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` on loopback with its own ports, temp dir and auth token; killed as a group."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must stay under 108 bytes
    gcs, dash, agent, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = _free_ports(9)
    # Not the test session's Ray, nor an MLflow store a developer's shell points at: the job logs where it is told.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # The job's `python` must be the one with Ray and sftray, as on a cluster image.
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            # outside Linux's ephemeral range, apart from the default 10002-19999 another local Ray uses
            "--min-worker-port=20100",
            "--max-worker-port=20600",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering, even if it wants the token: it is up
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(
                    f"ray head did not start:\n{(Path(temp) / 'head.log').read_text()[-3000:]}"
                ) from None
            time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever outlived `ray start`'s own shutdown
    except ProcessLookupError:
        pass
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_submitted_sweep_succeeds_on_a_local_cluster_and_lands_in_mlflow(
    ray_cluster, cache_dir, random_base, tmp_path, write_sums
):
    from mlflow import MlflowClient

    address, env = ray_cluster
    data = write_sums(tmp_path / "chats.jsonl", range(16))
    val = write_sums(tmp_path / "val.jsonl", range(20, 22))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(JOBS / "submit.py"),
            "--address",
            address,
            "--output-dir",
            str(out),
            "--cache-dir",
            str(cache_dir),
            "--deps",
            "image",  # this cluster runs in the test's own environment
            "--job-id",
            "sftray-test-job",
            "--",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            f"data.val_sources=[{{path:'{val}'}}]",
            "data.max_seq_len=64",
            f"model.name_or_path={random_base}",
            "mix.ratio=0.1",
            "eval.num_probes=2",
            "eval.max_new_tokens=4",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",
            "train.micro_batch_size=8",
            "sweep.name=jobs-tiny",
            "sweep.lr.values=[1e-3,3e-3]",
            "sweep.seeds=[0]",
            "sweep.epochs=[1]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "job sftray-test-job: SUCCEEDED" in proc.stdout
    assert "best trial:" in proc.stdout  # the sweep's own table, streamed back from the cluster
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jobs-tiny")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [1e-3, 3e-3]
    assert all(r.info.status == "FINISHED" and "eval/score" in r.data.metrics for r in children)


def test_corrupt_data_writes_a_noisy_copy_and_lists_what_it_changed(tmp_path):
    """``jobs/corrupt_data.py`` as the README runs it: 10% of the demo's answers shuffled across their questions."""
    out = tmp_path / "demo-noisy.jsonl"

    def corrupt(share: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "corrupt_data.py"), "--share", share, "--out", str(out)],
            env={**os.environ, "SFTRAY_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = corrupt("0.1")
    assert done.returncode == 0, done.stderr
    clean = (tmp_path / "cache" / "builtin" / "demo-train.jsonl").read_text().splitlines()
    noisy = out.read_text().splitlines()
    lines = json.loads(Path(f"{out}.corrupted.json").read_text())["lines"]
    assert len(noisy) == len(clean) == 2000 and 180 <= len(lines) <= 200
    changed = [i for i, (a, b) in enumerate(zip(clean, noisy), start=1) if a != b]
    assert changed == sorted(lines)  # exactly the listed conversations differ...
    for i in changed:  # ...in their answers only: the questions stay
        users = lambda line: [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]  # noqa: E731
        assert users(clean[i - 1]) == users(noisy[i - 1])
    bad = corrupt("1.5")
    assert bad.returncode == 1 and "error: --share" in bad.stderr
