"""Scale-out through Hydra's launcher plugins (conf/launcher/): submitit's local executor and its Slurm
job array, Ray on a cluster started here, and the GPU each job takes. The plugins are extras
(`pip install -e ".[slurm,ray]"`); without them these tests skip, except where MOM_BENCH_LAUNCHER_TESTS
is `required` (.ci/run sets it), where a missing plugin fails them."""
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from mom_bench import claims, records, runtime, sweep
from test_cli import TINY, cli

TWO = ["model=gla,linear_attention", *TINY]  # two points of a few seconds each


def plugin(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("MOM_BENCH_LAUNCHER_TESTS") == "required":
            pytest.fail(f"{module} is not installed ({exc}); .ci/run installs the slurm and ray extras")
        pytest.skip(f"{module} is not installed (pip install -e '.[slurm,ray]')")


def complete(folder: Path) -> set:
    """The run ids of the complete records under `folder`; every record must be valid."""
    valid, invalid = records.scan(folder)
    assert not invalid, invalid
    return {r["run_id"] for r in valid if r["status"] == "complete"}


# ------------------------------------------------------------------------------------------- submitit
def test_submitit_local_runs_a_sweep_as_submitit_jobs(tmp_path):
    plugin("hydra_plugins.hydra_submitit_launcher")
    out = cli("sweep", *TWO, f"results_dir={tmp_path}", "launcher=submitit_local", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(complete(tmp_path)) == 2
    # each point ran as a submitit job of its own: a job folder with its pickled result and its log
    results = list(tmp_path.glob("hydra/*/.submitit/*/*_result.pkl"))
    logs = ["".join(p.read_text() for p in result.parent.glob("*_log.*")) for result in results]
    assert len(results) == 2 and all("mean accuracy" in log for log in logs)


def test_the_slurm_launcher_submits_one_job_array_with_its_settings(tmp_path):
    # No Slurm here: a stand-in `sbatch` keeps the script it is given and refuses it (`srun` must exist).
    plugin("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "sbatch: error: no Slurm" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    out = subprocess.run([sys.executable, "-m", "mom_bench", "sweep", *TWO, f"results_dir={tmp_path / 'r'}",
                          "launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                          "hydra.launcher.array_parallelism=1"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=120)
    assert out.returncode == 1 and "sbatch: error: no Slurm" in out.stderr
    script = (tmp_path / "job.sh").read_text()
    for line in ("--array=0-1%1", "--partition=gpu", "--time=30", "--gpus-per-node=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script
    assert "-m submitit.core._submit" in script


# ------------------------------------------------------------------------------------------------ ray
@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster without GPUs, started as README says (`ray start --head`) and ended by its
    process group. Yields the address and the environment a driver joins it with."""
    plugin("hydra_plugins.hydra_ray_launcher")
    temp = tempfile.mkdtemp(prefix="mom_bench-ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_USAGE_STATS_ENABLED": "0"}
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--port=0", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = Path(temp) / "ray_current_cluster"
    deadline = time.time() + 90
    while not address.exists() and head.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert address.exists(), "the Ray head did not start"
        yield address.read_text().strip(), env
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # its own process group: the head and every process it started
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_runs_a_sweep_on_a_cluster_without_gpus(tmp_path, ray_cluster):
    # The shipped config as it stands: one GPU per task only where the cluster has one, so no hang here.
    address, env = ray_cluster
    out = subprocess.run([sys.executable, "-m", "mom_bench", "sweep", *TWO, f"results_dir={tmp_path}",
                          "launcher=ray", f"hydra.launcher.ray.init.address={address}"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = out.stdout + out.stderr
    assert "Connecting to existing Ray cluster" in logs and logs.count("(_run_job pid=") >= 2  # Ray tasks
    assert len(complete(tmp_path)) == 2


# ------------------------------------------------------------------------------------------------ GPUs
def test_jobs_ask_for_gpus_only_where_there_are_some(monkeypatch):
    # `${mom_bench_gpus:N}` in conf/launcher/: a Ray task that asks for a GPU on a CPU host never starts
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep.gpus() == sweep.gpus(1) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sweep.gpus() == 4 and sweep.gpus(1) == 1
    import mom_bench.conf
    from omegaconf import OmegaConf

    launcher = OmegaConf.load(Path(mom_bench.conf.__file__).with_name("launcher") / "ray.yaml")
    assert OmegaConf.to_container(launcher.hydra.launcher.ray.remote, resolve=True) == {"num_cpus": 1, "num_gpus": 1}


def test_a_worker_keeps_the_gpu_its_launcher_gave_it(monkeypatch):
    # Slurm and Ray give a job its GPU through CUDA_VISIBLE_DEVICES, so the process sees one GPU: it keeps
    # it. Where it sees several (the joblib or submitit_local launcher), its worker slot picks one.
    monkeypatch.setenv(claims.PARENT_ENV, f"{socket.gethostname()}:1")
    monkeypatch.setattr(claims, "sweep_slot", lambda: 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert runtime._sweep_gpu() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime._sweep_gpu() is None


def test_a_launcher_without_its_plugin_names_the_extra(monkeypatch, capsys):
    # Hydra alone says "Could not find 'hydra/launcher/submitit_slurm'"; the CLI names what to install.
    import importlib.util

    from mom_bench import __main__ as cli_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    for launcher, extra in [("slurm", "slurm"), ("submitit_local", "slurm"), ("ray", "ray")]:
        assert cli_main.main(["sweep", f"launcher={launcher}"]) == 2
        assert f'pip install -e ".[{extra}]"' in capsys.readouterr().err
    assert cli_main._missing_launcher(["launcher=parallel"]) is None
