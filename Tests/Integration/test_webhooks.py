"""Outgoing webhooks (signed, retried, logged, surviving a restart, SSRF-guarded) and RunPod by URL and
by webhook, through the whole mesh: real Media, Audio, Dispatcher and Gateway, the RunPod emulator,
and a webhook receiver on loopback. The signature is checked with the README's own snippet."""
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, free_port
from test_dispatcher import Mesh, inputs, routes  # noqa: F401
from test_gateway import Gateway, new_key
from tmdispatcher import dispatcher_pb2 as pb


def readme_verifier():
    """The README's `verify_talkmesh_signature`, executed as written."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- webhook-verification -->\n```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(block, scope)  # noqa: S102 - the README's snippet is what the test checks
    return scope["verify_talkmesh_signature"]


class Receiver:
    """A webhook receiver: records every POST, answers 500 to the first `fail_first`."""

    def __init__(self, port=0, fail_first=0):
        self.requests = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                status = 500 if len(receiver.requests) <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait(self, count, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline and len(self.requests) < count:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} webhook requests, expected {count}"
        return self.requests

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def setup(inputs):  # noqa: F811
    directory = tempfile.mkdtemp(prefix="talkmesh-webhooks-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000", "--job-rate", "100", "--job-burst", "100")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=4", "-ar", "16000",
                    f"{directory}/tone.wav"], check=True)
    state = {"dir": directory, "keys": keys_file, "key": key, "face": f"{inputs['dir']}/face.png", "tone": f"{directory}/tone.wav",
             "cleanup": []}
    yield state
    for close in reversed(state["cleanup"]):
        close()
    shutil.rmtree(directory, ignore_errors=True)


def start(setup, dispatcher_env=None, gateway_env=None, **mesh_args):
    mesh = Mesh(dispatcher_env=dispatcher_env, **mesh_args)
    setup["cleanup"].append(mesh.stop)
    gateway = Gateway(mesh, setup["keys"], **(gateway_env or {}))
    setup["cleanup"].append(gateway.stop)
    return mesh, gateway


def create(gateway, setup, **fields):
    form = {"image": "@" + setup["face"], "audio": "@" + setup["tone"], "width": "128", "height": "128"}
    form.update({name: str(value) for name, value in fields.items()})
    return gateway.json("POST", "/v1/jobs", key=setup["key"], form=form)


def wait_job(gateway, setup, job_id, until=lambda job: job["status"] in ("completed", "failed", "cancelled", "timed_out"),
             timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, _, job = gateway.json("GET", f"/v1/jobs/{job_id}", key=setup["key"])
        assert status == 200, job
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {job}")


def test_a_signed_webhook_is_retried_after_two_failures_and_logged_in_the_job(setup):
    verify = readme_verifier()
    receiver = Receiver(fail_first=2)
    setup["cleanup"].append(receiver.close)
    mesh, gateway = start(setup, {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_BACKOFF_INITIAL": "200ms"})
    status, _, created = create(gateway, setup, webhook_url=receiver.url)
    assert status == 202, created
    requests = receiver.wait(3)
    time.sleep(0.5)
    assert len(receiver.requests) == 3, "a delivered event is not sent again"
    deliveries = set()
    for headers, body, _ in requests:
        assert verify(setup["key"], headers["talkmesh-signature"], body)
        assert not verify(setup["key"], headers["talkmesh-signature"], body + b" ")
        assert not verify("tmk_another", headers["talkmesh-signature"], body)
        assert headers["talkmesh-event"] == "job.completed" and headers["content-type"] == "application/json"
        deliveries.add(headers["talkmesh-delivery"])
        event = json.loads(body)
        assert event["event"] == "job.completed" and event["job"]["id"] == created["id"]
        assert event["job"]["status"] == "completed" and event["job"]["video"]["duration_sec"] > 3
        assert "webhook" not in event["job"]
    assert len(deliveries) == 1, "every attempt of one event carries the same delivery id"
    # Backoff: the second retry waits longer than the first.
    times = [at for _, _, at in requests]
    assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.3, times
    job = wait_job(gateway, setup, created["id"], until=lambda job: len(job.get("webhook", {}).get("deliveries", [])) == 3)
    log = job["webhook"]["deliveries"]
    assert [entry["attempt"] for entry in log] == [1, 2, 3]
    assert [entry["delivered"] for entry in log] == [False, False, True]
    assert [entry.get("http_status") for entry in log] == [500, 500, 200]
    assert "500" in log[0]["error"] and "pending" not in job["webhook"]
    assert job["webhook"]["url"] == receiver.url
    # The signing key never leaves the Dispatcher, not over REST and not over gRPC.
    _, _, raw = gateway.curl("GET", f"/v1/jobs/{created['id']}", key=setup["key"])
    secret = hmac.new(setup["key"].encode(), b"talkmesh-webhook-v1", hashlib.sha256).hexdigest()
    assert secret.encode() not in raw and b"secret" not in raw
    stored = mesh.stub.GetJob(pb.GetJobRequest(id=created["id"]), timeout=10)
    assert stored.webhook.url == receiver.url and stored.webhook.secret == "" and stored.runpod_webhook_secret == ""
    assert len(stored.webhook.deliveries) == 3


def test_progress_webhooks_then_the_terminal_one(setup, inputs):  # noqa: F811
    receiver = Receiver()
    setup["cleanup"].append(receiver.close)
    # ~28 s of speech in chunks of 6 s, about 1.5 s of work each, three at a time: progress between waves.
    _, gateway = start(setup, {"WEBHOOK_ALLOW_PRIVATE": "true"}, emulator_args=("--speed", "0.25"))
    setup["tone"] = f"{inputs['dir']}/short.wav"
    status, _, created = create(gateway, setup, webhook_url=receiver.url, webhook_progress="true", chunk_target_sec=6)
    assert status == 202, created
    wait_job(gateway, setup, created["id"])
    deadline = time.time() + 30
    while time.time() < deadline and not any(h["talkmesh-event"] == "job.completed" for h, _, _ in receiver.requests):
        time.sleep(0.05)
    events = [h["talkmesh-event"] for h, _, _ in receiver.requests]
    assert events[-1] == "job.completed", events
    assert events.count("job.completed") == 1 and "job.progress" in events, events
    progress = [json.loads(body)["job"]["chunks"]["completed"] for h, body, _ in receiver.requests if h["talkmesh-event"] == "job.progress"]
    assert progress == sorted(progress) and progress[0] >= 1, progress


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/hook", "http://169.254.169.254/latest",
                                 "http://10.1.2.3/hook", "http://0x7f000001/hook", "http://192.168.1.1:8080/", "ftp://example.com/hook",
                                 "http://user:pass@example.com/hook", "not a url"])
def test_a_private_or_malformed_webhook_target_is_refused_and_its_uploads_deleted(setup, url):
    mesh, gateway = start(setup)
    status, _, error = create(gateway, setup, webhook_url=url)
    assert status == 400 and error["error"]["code"] == "INVALID_WEBHOOK_URL", (url, status, error)
    assert mesh.blob_keys("uploads") == [], "the refused request's uploads are deleted"
    assert mesh.blob_keys("jobs") == []


def test_a_pending_webhook_survives_a_dispatcher_restart(setup):
    port = free_port()
    mesh, gateway = start(setup, {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_BACKOFF_INITIAL": "300ms", "WEBHOOK_TIMEOUT": "1s"})
    status, _, created = create(gateway, setup, webhook_url=f"http://127.0.0.1:{port}/hook")  # nobody listens yet
    assert status == 202, created
    job = wait_job(gateway, setup, created["id"], until=lambda job: len(job.get("webhook", {}).get("deliveries", [])) >= 2)
    assert not any(entry["delivered"] for entry in job["webhook"]["deliveries"]) and job["webhook"]["pending"]["event"] == "job.completed"
    mesh.kill_dispatcher()
    receiver = Receiver(port=port)
    setup["cleanup"].append(receiver.close)
    mesh.start_dispatcher()
    headers, body, _ = receiver.wait(1)[0]
    assert readme_verifier()(setup["key"], headers["talkmesh-signature"], body)
    assert json.loads(body)["job"]["id"] == created["id"]
    stored = mesh.wait(created["id"], until={pb.COMPLETED})
    deadline = time.time() + 10
    while time.time() < deadline and not (stored.webhook.deliveries and stored.webhook.deliveries[-1].delivered):
        time.sleep(0.1)
        stored = mesh.stub.GetJob(pb.GetJobRequest(id=created["id"]), timeout=10)
    assert stored.webhook.deliveries[-1].delivered and stored.webhook.pending_event == ""


def test_a_webhook_that_keeps_failing_is_abandoned_after_max_age(setup):
    receiver = Receiver(fail_first=10**6)
    setup["cleanup"].append(receiver.close)
    mesh, gateway = start(setup, {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_BACKOFF_INITIAL": "100ms", "WEBHOOK_MAX_AGE": "1s"})
    status, _, created = create(gateway, setup, webhook_url=receiver.url)
    assert status == 202, created
    job = wait_job(gateway, setup, created["id"], until=lambda job: any(e.get("abandoned") for e in job.get("webhook", {}).get("deliveries", [])))
    assert "pending" not in job["webhook"] and job["webhook"]["deliveries"][-1]["abandoned"]
    sent = len(receiver.requests)
    time.sleep(1)
    assert len(receiver.requests) == sent, "nothing is sent after the event was abandoned"


def test_runpod_by_url_and_by_webhook_on_s3_with_fewer_status_calls(setup, inputs):  # noqa: F811
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1/runpod-webhook"
    # Chunks take about 1.5 s on the emulator: polled, each costs several /status calls.
    mesh, gateway = start(setup, {"RUNPOD_WEBHOOK_BASE_URL": base, "RUNPOD_WEBHOOK_POLL": "60s"}, {"PORT": str(port)},
                          store="s3", emulator_args=("--speed", "0.25", "--webhook-retry", "1s"))
    mesh.put("in/speech.wav", f"{inputs['dir']}/short.wav")
    mesh.put("in/face.png", setup["face"])

    def run_job():
        before = len(routes(mesh, "status"))
        started = time.time()
        job = mesh.create(options={"chunk_target_sec": 6, "max_concurrent_chunks": 8})
        job = mesh.wait(job.id)
        assert job.status == pb.COMPLETED, job
        return job, len(routes(mesh, "status")) - before, time.time() - started

    job, webhook_status_calls, elapsed = run_job()
    chunks = len(job.chunks)
    assert chunks >= 3
    stats = mesh.emulator_json("/_emulator/stats")
    assert stats["url_inputs"] == chunks, stats  # presigned image_url and wav_url, fetched by the worker
    assert stats["webhooks_sent"] >= chunks and stats["webhooks_failed"] == 0, stats
    assert webhook_status_calls <= chunks + 1, webhook_status_calls
    assert elapsed < 45, "the webhook, not the 60 s safety-net poll, finished the chunks"
    for entry in mesh.emulator_json("/_emulator/requests"):
        assert entry[0] in ("run", "status", "cancel", "retry", "health", "purge-queue")

    # The same job polled, without the webhook and with base64 inputs: more /status calls.
    mesh.dispatcher.stop()
    mesh.start_dispatcher(RUNPOD_WEBHOOK_BASE_URL="", RUNPOD_INPUTS="base64")
    job, polled_status_calls, _ = run_job()
    assert polled_status_calls > webhook_status_calls, (polled_status_calls, webhook_status_calls)
    assert mesh.emulator_json("/_emulator/stats")["url_inputs"] == chunks, "base64 when asked"


def test_the_runpod_webhook_route_wants_the_jobs_secret(setup):
    mesh, gateway = start(setup)
    status, _, created = create(gateway, setup)
    assert status == 202
    for path in (f"/v1/runpod-webhook/{created['id']}/0/wrong", f"/v1/runpod-webhook/job_000000000000000000000000/0/x",
                 f"/v1/runpod-webhook/{created['id']}/-1/x", "/v1/runpod-webhook/nothing/0/x"):
        status, _, error = gateway.json("POST", path, data='{"id": "x", "status": "COMPLETED"}')
        assert status == 404 and error["error"]["code"] == "JOB_NOT_FOUND", (path, status, error)
