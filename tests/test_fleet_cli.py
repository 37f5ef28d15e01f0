"""The `scalecap` command: every command has --help, the producer side never loads torch or vLLM,
and GPU pinning refuses to run after the engine libraries were imported."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from scalecap_command import COMMANDS, main
from tests.fleet_support import REPO


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: scalecap")
    if command is None:
        assert all(name in out for name in COMMANDS)


@pytest.mark.services
def test_producer_commands_never_import_torch_or_vllm(redis_url, tmp_path):
    """submit, status, results and cancel in a fresh interpreter; no engine library is loaded."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "/nowhere/a.png"}\n{"image": "/nowhere/b.png"}\nnot json\n')
    code = f"""
import contextlib, io, json, sys
from scalecap_command import main
url = {redis_url!r}
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = [main(["submit", {str(manifest)!r}, "--model", "m", "--batch-id", "cli1", "--broker-url", url])]
    rc.append(main(["status", "cli1", "--broker-url", url]))
    rc.append(main(["cancel", "cli1", "--broker-url", url]))
    rc.append(main(["results", "cli1", "-o", {str(tmp_path / "r.jsonl")!r}, "--broker-url", url]))
loaded = [m for m in ("torch", "vllm", "transformers") if m in sys.modules]
print(json.dumps({{"rc": rc, "loaded": loaded, "out": out.getvalue()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rc"] == [0, 0, 0, 0]
    assert r["loaded"] == []
    first = json.loads(r["out"].splitlines()[0])
    assert (first["batch_id"], first["submitted"], first["failed"]) == ("cli1", 2, 1)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [row["scalecap_record"]["error"]["type"] for row in rows] == ["MalformedLine"]


def test_submit_rejects_unknown_sink_before_queueing(redis_url, capsys):
    assert main(["submit", "/x/a.png", "--sink", "ftp://nope", "--broker-url", redis_url]) == 1
    assert "unknown sink" in capsys.readouterr().err


def test_gpu_pinning(monkeypatch):
    from workers.gpu import GPUPinningError, pin_gpus

    for name in ("torch", "vllm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    env: dict[str, str] = {}
    assert pin_gpus("1,0", env) == [1, 0]
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert pin_gpus(None, env) is None
    with pytest.raises(GPUPinningError):
        pin_gpus("0,x", env)
    with pytest.raises(GPUPinningError):
        pin_gpus("0,0", env)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    with pytest.raises(GPUPinningError, match="already imported"):
        pin_gpus("0", env)


def test_worker_refuses_to_pin_after_engine_import(tmp_path):
    """`scalecap worker --gpus` in a process that imported torch first fails clearly."""
    code = (
        "import sys, types; sys.modules['torch'] = types.ModuleType('torch');"
        "from scalecap_command import main;"
        "sys.exit(main(['worker', '--gpus', '0', '--backend', 'tests.fleet_vlms:FleetVLM', '--model', 'm']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "already imported" in proc.stderr
