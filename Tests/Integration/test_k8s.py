"""k8s/: every overlay renders with kustomize, validates against the Kubernetes 1.30 schemas, and
holds the policy a platform team checks before it deploys: probes, limits, non-root, read-only
root file system, every setting a service reads set or defaulted (and valid, by the service's own
check), the Services and probes wired to the right ports, and NetworkPolicies that let only the
documented callers in."""
import copy
import os
import subprocess

import pytest
import yaml

from k8s_manifests import (K8S, OVERLAYS, SERVICES, check_settings, declared_settings, ingress_allowed, named,
                           of_kind, pod_labels, render, resolved_env, workloads)

CORE = ["talkmesh-media", "talkmesh-audio", "talkmesh-dispatcher", "talkmesh-gateway"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(os.path.join(K8S, "overlays", request.param))


def validate(objects, tmp_path, name="rendered.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(["kubernetes-validate", "--kubernetes-version", "1.30.0", "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=300)


def test_every_overlay_renders_and_validates_against_the_kubernetes_1_30_schemas(overlay, tmp_path):
    name, objects = overlay
    result = validate(objects, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
            "ServiceAccount", "ConfigMap", "Namespace"} <= kinds
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {named(objects, "Namespace", "talkmesh-dev" if name == "dev" else "talkmesh")["metadata"]["name"]}


def test_the_validation_refuses_a_misspelt_field_and_a_wrong_type(tmp_path):
    objects = render(os.path.join(K8S, "overlays", "dev"))
    misspelt = copy.deepcopy(objects)
    named(misspelt, "Deployment", "talkmesh-media")["spec"]["template"]["spec"]["containers"][0]["livenessProbee"] = {}
    assert validate(misspelt, tmp_path, "misspelt.yaml").returncode != 0
    wrong = copy.deepcopy(objects)
    named(wrong, "Deployment", "talkmesh-media")["spec"]["replicas"] = "two"
    assert validate(wrong, tmp_path, "wrong.yaml").returncode != 0


def _pod_or_container(spec, container, key):
    return (container.get("securityContext") or {}).get(key, (spec.get("securityContext") or {}).get(key))


def test_every_container_has_limits_and_runs_non_root_on_a_read_only_root(overlay):
    _, objects = overlay
    checked = 0
    for workload, spec in workloads(objects):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: service-account token mounted"
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container.get("resources") or {}
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound} missing"
            assert _pod_or_container(spec, container, "runAsNonRoot") is True, where
            assert (_pod_or_container(spec, container, "runAsUser") or 0) > 0, f"{where}: runs as uid 0"
            assert (_pod_or_container(spec, container, "seccompProfile") or {}).get("type") == "RuntimeDefault", where
            own = container.get("securityContext") or {}
            assert own.get("readOnlyRootFilesystem") is True, f"{where}: writable root file system"
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("capabilities", {}).get("drop") == ["ALL"], where
            if workload["kind"] == "Deployment":
                assert container.get("livenessProbe") and container.get("readinessProbe"), f"{where}: probes missing"
            checked += 1
    assert checked >= 4


def test_the_services_drain_before_kubernetes_kills_them(overlay):
    _, objects = overlay
    for name in CORE:
        spec = named(objects, "Deployment", name)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container.get("startupProbe"), name
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        env, _ = resolved_env(objects, container)
        drain = env.get("DRAIN_TIMEOUT", "30s")
        assert drain.endswith("s") and not drain.endswith("ms"), f"{name}: DRAIN_TIMEOUT={drain} (seconds expected here)"
        assert spec["terminationGracePeriodSeconds"] > pause + float(drain[:-1]), name
        assert "MAX_CONNECTION_AGE" in env, f"{name}: without MAX_CONNECTION_AGE new pods get no traffic"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}: no writable /tmp on a read-only root"


def test_every_setting_a_service_reads_is_declared_and_set_or_defaulted_and_valid(overlay):
    name, objects = overlay
    config_keys = set()
    for workload, spec in workloads(objects):
        deployment = workload["metadata"]["name"]
        if deployment not in SERVICES:
            continue
        executable = SERVICES[deployment]
        declared = declared_settings(executable)
        container = spec["containers"][0]
        for var in container.get("env", []):
            assert var["name"] in declared, f"{deployment}: sets {var['name']}, which {executable} does not read"
        env, _ = resolved_env(objects, container)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                config_keys |= set(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        for setting, row in declared.items():
            if row.get("required"):
                assert setting in env, f"{deployment}: {setting} is required and not set"
        relevant = {k: v for k, v in env.items() if k in declared}
        result = check_settings(executable, relevant)
        assert result.returncode == 0, f"{deployment} in {name}: {result.stderr}"
        if deployment in CORE:
            assert int(env.get("EVENT_LOOPS", "0")) > 0, f"{deployment}: a pod sees the node's cores, not its limit"
            assert env.get("BLOB_STORE", "").startswith("s3://"), f"{deployment}: replicas share no disk; blobs go to S3"
    every_declared = set().union(*(declared_settings(e) for e in SERVICES.values()))
    assert config_keys and config_keys <= every_declared, f"ConfigMap keys no service reads: {config_keys - every_declared}"


def test_the_check_catches_a_bad_value_and_a_missing_required_setting():
    objects = render(os.path.join(K8S, "overlays", "dev"))
    container = named(objects, "Deployment", "talkmesh-dispatcher")["spec"]["template"]["spec"]["containers"][0]
    env, _ = resolved_env(objects, container)
    declared = declared_settings("talkmesh-dispatcher")
    relevant = {k: v for k, v in env.items() if k in declared}
    assert check_settings("talkmesh-dispatcher", relevant).returncode == 0
    bad = check_settings("talkmesh-dispatcher", {**relevant, "MAX_CONNECTION_AGE": "2mins"})
    assert bad.returncode == 2 and "MAX_CONNECTION_AGE=2mins" in bad.stderr
    missing = check_settings("talkmesh-dispatcher", {k: v for k, v in relevant.items() if k != "RUNPOD_ENDPOINT_ID"})
    assert missing.returncode == 2 and "RUNPOD_ENDPOINT_ID is required" in missing.stderr


def test_the_job_store_and_the_rate_limits_are_shared_by_every_replica(overlay):
    name, objects = overlay
    dispatcher = named(objects, "Deployment", "talkmesh-dispatcher")["spec"]["template"]["spec"]["containers"][0]
    env, _ = resolved_env(objects, dispatcher)
    if name == "dev":
        assert env["JOB_STORE"].startswith("postgres://")
    else:
        assert env["JOB_STORE"] == "secret:talkmesh-postgres/url"
    gateway = named(objects, "Deployment", "talkmesh-gateway")["spec"]["template"]["spec"]["containers"][0]
    gateway_env, _ = resolved_env(objects, gateway)
    assert "REDIS_URL" in gateway_env, "Gateways without Redis each keep their own limits"


def test_services_probes_and_addresses_meet_the_pods(overlay):
    _, objects = overlay
    for name in CORE:
        deployment = named(objects, "Deployment", name)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        service = named(objects, "Service", name)
        assert all(deployment["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in service["spec"]["selector"].items()), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: Service targets {port['targetPort']}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec = container[probe]
            target = (spec.get("grpc") or spec.get("httpGet"))["port"]
            assert target in ports or target in ports.values(), f"{name}: {probe} on {target}"
        if name == "talkmesh-gateway":
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP" and service["spec"].get("clusterIP") != "None"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        else:
            assert service["spec"]["clusterIP"] == "None", f"{name}: dns:/// balancing needs a headless Service"
            assert "grpc" in container["livenessProbe"] and "grpc" in container["readinessProbe"], name
        hpa = named(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        pdb = named(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    addresses = resolved_env(objects, named(objects, "Deployment", "talkmesh-dispatcher")["spec"]["template"]["spec"]["containers"][0])[0]
    for variable, service in (("MEDIA_ADDR", "talkmesh-media"), ("AUDIO_ADDR", "talkmesh-audio"),
                              ("DISPATCHER_ADDR", "talkmesh-dispatcher")):
        port = named(objects, "Service", service)["spec"]["ports"][0]["port"]
        assert addresses[variable] == f"dns:///{service}:{port}"
    assert named(objects, "HorizontalPodAutoscaler", "talkmesh-dispatcher")["spec"]["metrics"][0]["pods"]["metric"]["name"] \
        == "talkmesh_dispatcher_jobs_driven"


@pytest.mark.parametrize("source,destination,port,allowed", [
    ("talkmesh-gateway", "talkmesh-dispatcher", 50053, True),
    ("talkmesh-gateway", "talkmesh-media", 50051, True),
    ("talkmesh-dispatcher", "talkmesh-media", 50051, True),
    ("talkmesh-dispatcher", "talkmesh-audio", 50052, True),
    ("talkmesh-media", "talkmesh-dispatcher", 50053, False),
    ("talkmesh-audio", "talkmesh-media", 50051, False),
    ("talkmesh-dispatcher", "talkmesh-gateway", 8080, True),
    ("talkmesh-gateway", "talkmesh-gateway", 9999, False),
    (None, "talkmesh-gateway", 8080, True),
    (None, "talkmesh-media", 50051, False),
    (None, "talkmesh-dispatcher", 50053, False),
])
def test_network_policies_let_only_the_documented_callers_in(overlay, source, destination, port, allowed):
    _, objects = overlay
    labels = pod_labels(objects, source) if source else {"app": "anything-else"}
    assert ingress_allowed(objects, labels, pod_labels(objects, destination), port) is allowed


def test_prometheus_may_scrape_and_dev_stores_take_only_their_callers():
    objects = render(os.path.join(K8S, "overlays", "dev"))
    scraper = {"app.kubernetes.io/name": "prometheus"}
    monitoring = {"talkmesh.io/scrape": "true"}
    assert ingress_allowed(objects, scraper, pod_labels(objects, "talkmesh-media"), 50051, namespace_labels=monitoring)
    assert not ingress_allowed(objects, scraper, pod_labels(objects, "talkmesh-media"), 50051, namespace_labels={})
    for source, destination, port, allowed in [
        ("talkmesh-dispatcher", "talkmesh-postgres", 5432, True), ("talkmesh-gateway", "talkmesh-postgres", 5432, False),
        ("talkmesh-gateway", "talkmesh-redis", 6379, True), ("talkmesh-media", "talkmesh-redis", 6379, False),
        ("talkmesh-media", "talkmesh-minio", 9000, True), ("talkmesh-postgres", "talkmesh-minio", 9000, False),
        ("talkmesh-dispatcher", "talkmesh-runpod-emulator", 8090, True),
        ("talkmesh-gateway", "talkmesh-runpod-emulator", 8090, False),
    ]:
        got = ingress_allowed(objects, pod_labels(objects, source), pod_labels(objects, destination), port)
        assert got is allowed, f"{source} → {destination}:{port}"


def test_prod_carries_no_secret_and_names_the_ones_it_needs():
    objects = render(os.path.join(K8S, "overlays", "prod"))
    assert of_kind(objects, "Secret") == []
    needed = set()
    for _, spec in workloads(objects):
        for container in spec["containers"]:
            needed |= resolved_env(objects, container)[1]
        needed |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    ingress = named(objects, "Ingress", "talkmesh-gateway")
    needed |= {t["secretName"] for t in ingress["spec"]["tls"]}
    assert needed == {"talkmesh-postgres", "talkmesh-redis", "talkmesh-runpod", "talkmesh-s3", "talkmesh-api-keys",
                      "talkmesh-tls"}
    documented = open(os.path.join(K8S, "overlays", "prod", "kustomization.yaml")).read()
    assert all(secret in documented for secret in needed)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "talkmesh-gateway"
    assert backend["port"]["name"] in {p["name"] for p in named(objects, "Service", "talkmesh-gateway")["spec"]["ports"]}
    images = {c["image"] for _, spec in workloads(objects) for c in spec["containers"]}
    assert all(i.startswith("registry.example.com/talkmesh/") and i.endswith(":1.0.0") for i in images), images
