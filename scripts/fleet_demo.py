"""The whole fleet on one machine, for the README's main command (`scripts/caption_examples.sh`).

Starts what a real deployment runs, as separate processes: redis-server, one `scalecap worker`
holding the engine, the I/O worker (webhooks), and the HTTP API; creates an API key; starts a small
webhook receiver that verifies signatures with that key's secret; submits the example photos over
HTTP; shows progress; writes the batch's records to OUT/captions.jsonl; prints the viewer's URL
and the webhook it received. Everything it started is stopped on Ctrl-C or when done (with
`--hold`, after Enter or Ctrl-C, so the viewer can be browsed first).

    python scripts/fleet_demo.py --manifest examples/manifest.jsonl --model MODEL \
        [--worker-arg=--max-model-len --worker-arg=2048 ...] [--config-json '{...}'] [--hold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(msg: str) -> None:
    print(f"[fleet] {msg}", flush=True)


class Services:
    """The processes this demo started, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], ready: str | None = None, timeout: float = 600) -> None:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                    start_new_session=True)
        self.procs.append((name, proc, log))
        if ready is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if ready in text:
                return
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; its log ({log}):\n{text[-4000:]}")
            time.sleep(0.2)
        raise SystemExit(f"{name} not ready after {timeout:.0f} s; its log: {log}")

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                raise SystemExit(f"{name} died ({proc.returncode}); its log ({log}):\n{text[-4000:]}")

    def stop(self) -> None:
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60 if name == "worker" else 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()


def start_redis(services: Services) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: run scripts/setup_cpu_env.sh (it installs it)")
    port = free_port()
    services.start("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(services.workdir)],
                   ready="Ready to accept connections", timeout=30)
    return f"redis://127.0.0.1:{port}/0"


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps only events whose signature verifies."""

    def __init__(self, secret: str) -> None:
        from scalecap.fleet.signatures import verify_webhook

        events: list[dict[str, Any]] = []
        rejected: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if verify_webhook(secret, self.headers, body):
                    events.append({"webhook-id": self.headers.get("webhook-id"), **json.loads(body)})
                    self.send_response(204)
                else:
                    rejected.append(self.headers.get("webhook-id") or "?")
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.events, self.rejected = events, rejected
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/scalecap"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def create_key(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "scalecap_command", "keys", "create", "--name", "demo",
                          "--scopes", "submit,read", "--all-data"],  # the demo's own files and bucket
                         env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if ": " in line and not line.startswith("#")]
    fields = dict(line.split(": ", 1) for line in lines)
    if "key" not in fields or "webhook_secret" not in fields:
        raise SystemExit(f"unexpected output of scalecap keys create:\n{out}")
    return fields


def wait_http(url: str, services: Services, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout:.0f} s")


def run(args: argparse.Namespace, services: Services) -> int:
    import httpx
    from tqdm import tqdm

    lines = Path(args.manifest).read_text().splitlines()
    images = [str(Path(json.loads(line)["image"]).resolve()) for line in lines if line.strip()]
    roots = sorted({str(Path(p).parent) for p in images})

    url = start_redis(services)
    env = services.env
    env.update(SCALECAP_BROKER_URL=url, SCALECAP_ALLOWED_ROOTS=",".join(roots),
               # The receiver listens on 127.0.0.1: a real deployment keeps private URLs refused.
               SCALECAP_ALLOW_PRIVATE_URLS="1")
    say(f"redis-server up at {url}")
    key = create_key(env)
    say(f"API key created for 'demo' (id {key.get('key_id')}); its webhook secret signs its events")
    receiver = Receiver(key["webhook_secret"])
    try:
        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        services.start("api", [sys.executable, "-m", "scalecap_command", "api", "--host", "127.0.0.1",
                               "--port", str(port)])
        services.start("worker-io", [sys.executable, "-m", "scalecap_command", "worker", "--io",
                                     "--hostname", "demo-io@%h"], ready=" ready.", timeout=120)
        say("starting the caption worker (loads the engine once; on a CPU this takes a minute)")
        services.start("worker", [sys.executable, "-m", "scalecap_command", "worker", "--model", args.model,
                                  "--concurrency", str(args.concurrency), "--hostname", "demo-gpu@%h",
                                  *args.worker_arg], ready=" ready.", timeout=900)
        wait_http(f"{base}/healthz", services)
        say(f"API up at {base} (OpenAPI docs at {base}/docs)")

        auth = {"Authorization": f"Bearer {key['key']}"}
        body = {"images": images, "model": args.model, "sink": "redis", "webhook": receiver.url,
                "config": json.loads(args.config_json) if args.config_json else {}}
        r = httpx.post(f"{base}/v1/batches", json=body, headers=auth, timeout=60)
        if r.status_code != 202:
            raise SystemExit(f"submit failed: HTTP {r.status_code} {r.text}")
        batch_id = r.json()["batch_id"]
        say(f"submitted {len(images)} images over HTTP: batch {batch_id}")

        bar = tqdm(total=len(images), desc="captioning", unit="img")
        while True:
            services.check_alive()
            st = httpx.get(f"{base}/v1/batches/{batch_id}", headers=auth, timeout=30).json()
            final = st.get("done", 0) + st.get("failed", 0) + st.get("cancelled", 0)
            bar.update(final - bar.n)
            bar.set_postfix(running=st.get("running", 0), failed=st.get("failed", 0))
            if st.get("finished_at"):
                break
            time.sleep(0.5)
        bar.close()

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        results_url = f"{base}/v1/batches/{batch_id}/results"
        with httpx.stream("GET", results_url, headers=auth, timeout=120) as resp, open(out, "w") as f:
            if resp.status_code != 200:
                raise SystemExit(f"results failed: HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if line.strip():
                    f.write(line + "\n")
                    n += 1
        say(f"{n} records written to {out}: {st.get('done', 0)} captioned, {st.get('failed', 0)} failed")

        deadline = time.monotonic() + 60
        done: list[dict[str, Any]] = []
        while not done and time.monotonic() < deadline:
            done = [e for e in receiver.events if e.get("type") == "batch.completed"]
            time.sleep(0.2)
        if done:
            say(f"webhook received and verified (webhook-id {done[0]['webhook-id']}): "
                + json.dumps({k: v for k, v in done[0].items() if k != "webhook-id"})[:400])
        else:
            say(f"no verified batch.completed webhook within 60 s (rejected: {receiver.rejected})")

        say(f"viewer: {base}/batches/{batch_id}  (log in at {base}/login with the key below)")
        say(f"key for the viewer and curl: {key['key']}")
        if args.hold:
            say("services stay up so you can browse the viewer; press Enter or Ctrl-C to stop them")
            try:
                input()
            except EOFError:
                pass
        return 0 if n == len(images) and done else 1
    finally:
        receiver.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="JSONL manifest of local images ({'image': path})")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="out/captions.jsonl")
    p.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    p.add_argument("--concurrency", type=int, default=16, help="images in flight in the worker")
    p.add_argument("--worker-arg", action="append", default=[], help="extra `scalecap worker` argument")
    p.add_argument("--config-json", default=None, help="chain config fields for the batch, as JSON")
    p.add_argument("--hold", action="store_true", help="keep the services up until Enter or Ctrl-C")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="scalecap-fleet-"))
    services = Services(workdir, {**os.environ, "PYTHONPATH": str(REPO)})

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args, services)
    except KeyboardInterrupt:
        say("interrupted: stopping what was started")
        return 130
    finally:
        services.stop()
        say(f"stopped redis-server, the workers and the API (logs in {workdir})")


if __name__ == "__main__":
    raise SystemExit(main())
