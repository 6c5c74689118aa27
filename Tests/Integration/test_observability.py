"""The operations kit in deploy/observability against live services: a real Prometheus server
(Debian's `prometheus`, started here) scrapes every service of a mesh that has run a job, loads
the alert rules, and answers a PromQL query with the job count; `promtool check metrics` passes on
every service's /metrics and `promtool check rules` on the rules; every query of the dashboard
and the rules is valid PromQL naming only metrics the services export."""
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, free_port
from test_dispatcher import BLOB_BACKEND, TERMINAL, Mesh
from test_gateway import Gateway, new_key
from test_gateway_redis import Redis
from tmdispatcher import dispatcher_pb2 as pb

KIT = os.path.join(ROOT, "deploy", "observability")


def fetch(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def ran():
    """A mesh with a Gateway on Redis, after one job completed (so every family has samples)."""
    work = tempfile.mkdtemp(prefix="talkmesh-observability-")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=400x600", "-frames:v", "1", f"{work}/face.png"], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=8", "-ar", "16000", "-ac", "1",
                    f"{work}/tone.wav"], check=True)
    mesh = Mesh()
    keys_file = os.path.join(work, "keys.json")
    key = new_key(keys_file, "--rate", "100", "--burst", "100")
    redis = Redis(work)  # the Gateway's limits in Redis, as deployed: its metrics too
    gateway = Gateway(mesh, keys_file, REDIS_URL=redis.url)
    try:
        mesh.put("in/face.png", f"{work}/face.png")
        mesh.put("in/tone.wav", f"{work}/tone.wav")
        job = mesh.wait(mesh.create(audio="in/tone.wav").id, timeout=120)
        assert job.status == pb.COMPLETED, job
        status, _, _ = gateway.json("GET", "/v1/jobs", key=key)
        assert status == 200
        # Refusals, so their families have samples: no key, a wrong key, a key over its limit.
        assert gateway.json("GET", "/v1/jobs")[0] == 401
        assert gateway.json("GET", "/v1/jobs", key="tmk_wrong")[0] == 401
        tight = new_key(keys_file, "--rate", "0.01", "--burst", "1")
        time.sleep(1.2)  # the Gateway rereads the key file each second
        assert [gateway.json("GET", "/v1/jobs", key=tight)[0] for _ in range(2)] == [200, 429]
        tight_id = json.loads(open(keys_file).read())["keys"][-1]["id"]
        services = {"gateway": gateway.service, "dispatcher": mesh.dispatcher, "media": mesh.media, "audio": mesh.audio,
                    "runpod-emulator": mesh.emulator}
        yield {"services": services, "work": work, "job": job, "tight_id": tight_id}
    finally:
        gateway.stop()
        redis.stop()
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_promtool_finds_no_problem_in_any_services_metrics(ran):
    for name, service in ran["services"].items():
        text = fetch(f"http://{service.address}/metrics")
        assert "process_resident_memory_bytes " in text and 'talkmesh_event_loop_lag_seconds{loop="0"}' in text, name
        checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (name, checked.stdout, checked.stderr)


def test_promtool_accepts_the_alert_rules():
    checked = subprocess.run(["promtool", "check", "rules", os.path.join(KIT, "alerts.yml")], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and "SUCCESS: 10 rules found" in checked.stdout, checked.stdout + checked.stderr


def promql(port, query):
    answer = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})))
    assert answer["status"] == "success", (query, answer)
    return answer["data"]["result"]


def queries():
    """Every PromQL expression of the dashboard and the alert rules."""
    import yaml
    dashboard = json.load(open(os.path.join(KIT, "dashboard.json")))
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load(open(os.path.join(KIT, "alerts.yml")))
    found += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return found


def test_a_real_prometheus_scrapes_every_service_and_counts_the_job(ran):
    work = ran["work"]
    port = free_port()
    shutil.copy(os.path.join(KIT, "alerts.yml"), f"{work}/alerts.yml")
    # The kit's scrape job, with the pods replaced by this machine's services (same job and labels).
    targets = [{"targets": [service.address], "labels": {"app": f"talkmesh-{name}", "pod": f"{name}-0"}}
               for name, service in ran["services"].items()]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["alerts.yml"],
              "scrape_configs": [{"job_name": "talkmesh", "static_configs": targets}]}
    with open(f"{work}/prometheus.yml", "w") as fh:
        json.dump(config, fh)  # JSON is YAML
    server = subprocess.Popen(["prometheus", f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/tsdb",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                              stdout=subprocess.DEVNULL, stderr=open(f"{work}/prometheus.log", "w"))
    try:
        deadline = time.time() + 60
        up = []
        while time.time() < deadline:
            try:
                up = promql(port, 'up{job="talkmesh"}')
            except OSError:
                up = []
            if len(up) == len(targets) and all(sample["value"][1] == "1" for sample in up):
                break
            time.sleep(0.5)
        assert len(up) == len(targets) and all(sample["value"][1] == "1" for sample in up), (up, open(f"{work}/prometheus.log").read())
        completed = promql(port, 'sum(talkmesh_dispatcher_events_total{event="jobs_completed"})')
        assert completed and float(completed[0]["value"][1]) == 1
        # The rules loaded into the server, and none fires on a healthy mesh.
        rules = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/rules"))["data"]["groups"][0]["rules"]
        assert len(rules) == 10 and all(rule["health"] == "ok" for rule in rules), rules
        # Every query of the kit is valid PromQL that names only metrics the services export.
        names = set(json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/label/__name__/values"))["data"])
        for query in queries():
            promql(port, query)
            for metric in re.findall(r"\b((?:talkmesh|process)_[a-z0-9_]+)", query):
                assert metric in names, (metric, query)
    finally:
        server.terminate()
        server.wait(timeout=30)


def samples(service):
    text = fetch(f"http://{service.address}/metrics")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_traffic_refusals_runpod_operations_and_blob_calls_are_measured(ran):
    services, job = ran["services"], ran["job"]
    for name, service in services.items():
        values = samples(service)
        assert values["talkmesh_server_received_bytes_total"] > 0 and values["talkmesh_server_sent_bytes_total"] > 0, name
        # The scrape itself is the one HTTP request in flight.
        assert values['talkmesh_server_requests_in_flight{protocol="grpc"}'] == 0, name
        assert values['talkmesh_server_requests_in_flight{protocol="http"}'] == 1, name
    gateway = samples(services["gateway"])
    assert gateway['talkmesh_gateway_auth_failures_total{reason="missing"}'] >= 1
    assert gateway['talkmesh_gateway_auth_failures_total{reason="invalid"}'] >= 1
    assert gateway[f'talkmesh_gateway_rate_limited_total{{key_id="{ran["tight_id"]}",reason="requests"}}'] == 1
    dispatcher = samples(services["dispatcher"])
    chunks = len(job.chunks)
    assert dispatcher['talkmesh_runpod_requests_total{route="run",code="200"}'] == chunks
    assert dispatcher['talkmesh_runpod_requests_total{route="status",code="200"}'] >= chunks
    assert dispatcher['talkmesh_runpod_request_duration_seconds_count{route="run"}'] == chunks
    assert dispatcher["talkmesh_dispatcher_job_chunks_count"] == 1 and dispatcher["talkmesh_dispatcher_job_chunks_sum"] == chunks
    media, audio = samples(services["media"]), samples(services["audio"])
    for values, operation in ((media, "libav.resize_image"), (media, "libav.stitch_videos"), (audio, "libav.split_audio")):
        assert values[f'talkmesh_operation_duration_seconds_count{{operation="{operation}",outcome="ok"}}'] == 1, operation
        assert values[f'talkmesh_operation_input_bytes_sum{{operation="{operation}"}}'] > 0, operation
        assert values[f'talkmesh_operation_output_bytes_sum{{operation="{operation}"}}'] > 0, operation
    store = "s3" if BLOB_BACKEND == "s3" else "file"
    assert dispatcher[f'talkmesh_blob_operations_total{{store="{store}",operation="store",outcome="ok"}}'] == chunks  # each partial video
    assert media[f'talkmesh_blob_operations_total{{store="{store}",operation="store",outcome="ok"}}'] >= 2  # the image, the video
    assert dispatcher[f'talkmesh_blob_operation_duration_seconds_count{{store="{store}",operation="delete"}}'] > 0  # intermediates
