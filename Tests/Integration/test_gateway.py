"""The Gateway against the real mesh (Media, Audio, the RunPod emulator, the Dispatcher), driven
with curl over HTTP/1.1 and h2c: keys and their file, auth, limits, streamed uploads (JSON base64
and multipart) with their refusals, job reads, the video with ETag and Range, SSE, OpenAPI."""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import BIN, Service
from test_dispatcher import Mesh, inputs  # noqa: F401  (inputs is a fixture)

PROTOCOLS = [["--http1.1"], ["--http2-prior-knowledge"]]


def talkmesh(*args, env=None):
    return subprocess.run([os.path.join(BIN, "talkmesh"), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def new_key(path, *extra):
    result = talkmesh("keys", "create", "--name", "test", "--keys-file", path, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


class Gateway:
    def __init__(self, mesh, keys_file, **env):
        self.mesh = mesh
        self.keys_file = keys_file
        self.service = Service("talkmesh-gateway", env={**mesh.blob_env, "API_KEYS_FILE": keys_file,
                                                        "DISPATCHER_ADDR": mesh.dispatcher.address, **env})
        self.url = f"{'https' if 'TLS_CERT_FILE' in env else 'http'}://{self.service.address}"

    def curl(self, method, path, key=None, protocol=("--http1.1",), headers=(), data=None, form=None, output=None, extra=()):
        """Runs curl; returns (status, headers dict, body bytes)."""
        head = tempfile.NamedTemporaryFile(delete=False)
        body = output or tempfile.NamedTemporaryFile(delete=False).name
        command = ["curl", "-s", "-X", method, *protocol, "-D", head.name, "-o", body, "--max-time", "60", *extra]
        if key:
            command += ["-H", f"Authorization: Bearer {key}"]
        for header in headers:
            command += ["-H", header]
        if data is not None:
            command += ["-H", "Content-Type: application/json", "--data-binary", "@" + data if data.startswith("/") else data]
        for name, value in (form or {}).items():
            command += ["-F", f"{name}={value}"]
        subprocess.run(command + [self.url + path], check=False)
        lines = open(head.name, "rb").read().decode("latin-1").split("\r\n")
        statuses = [line for line in lines if line.startswith("HTTP/")]
        status = int(statuses[-1].split()[1]) if statuses else 0
        parsed = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                parsed[name.strip().lower()] = value.strip()
        content = open(body, "rb").read()
        os.unlink(head.name)
        if not output:
            os.unlink(body)
        return status, parsed, content

    def json(self, *args, **kwargs):
        status, headers, body = self.curl(*args, **kwargs)
        return status, headers, json.loads(body) if body else None

    def rss_kb(self):
        for line in open(f"/proc/{self.service.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    def stop(self):
        if self.service.proc.poll() is None:
            self.service.stop()


@pytest.fixture(scope="module")
def world(inputs):  # noqa: F811
    directory = tempfile.mkdtemp(prefix="talkmesh-gateway-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000", "--job-rate", "100", "--job-burst", "100", "--max-active-jobs", "50")
    other = new_key(keys_file, "--rate", "1000", "--burst", "1000")
    mesh = Mesh()
    gateway = Gateway(mesh, keys_file)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=6", "-ar", "16000",
                    f"{directory}/tone.wav"], check=True)
    files = {"face": f"{inputs['dir']}/face.png", "speech": f"{directory}/tone.wav", "dir": directory}
    yield {"gateway": gateway, "key": key, "other": other, "files": files, "keys_file": keys_file, "mesh": mesh}
    gateway.stop()
    mesh.stop()
    shutil.rmtree(directory, ignore_errors=True)


def video_url_ok(gateway, url, job_id, origin=""):
    """A completed job's video URL: the Gateway's own route on a file store; on S3 a presigned
    URL of the job's video that works with no API key."""
    s3 = gateway.mesh.s3
    if not s3:
        return url == f"{origin}/v1/jobs/{job_id}/video"
    if not (url.startswith(f"{s3.endpoint}/mesh/blobs/jobs/{job_id}/") and "X-Amz-Signature=" in url):
        return False
    fetched = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", url], capture_output=True)
    return fetched.stdout.endswith(b"\n200") and fetched.stdout[4:8] == b"ftyp"


def multipart(files, **fields):
    form = {"image": "@" + files["face"], "audio": "@" + files["speech"], "width": "320", "height": "320"}
    form.update({name: str(value) for name, value in fields.items()})
    return form


def wait_terminal(gateway, key, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, _, job = gateway.json("GET", f"/v1/jobs/{job_id}", key=key)
        if job["status"] in ("completed", "failed", "cancelled", "timed_out"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def uploads(world):
    """Every uploaded blob kept (a removed upload may leave its empty folder on a file store)."""
    return world["mesh"].blob_keys("uploads/")


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["http1", "h2c"])
def test_a_multipart_job_runs_to_a_video_and_every_read_route_answers(world, protocol):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    status, headers, created = gateway.json("POST", "/v1/jobs", key=key, protocol=protocol, form=multipart(files, prompt="hello"))
    assert status == 202, created
    assert created["status"] == "in_queue" and headers["location"] == f"/v1/jobs/{created['id']}"
    assert created["links"]["video"] == f"/v1/jobs/{created['id']}/video"
    assert int(headers["ratelimit-limit"]) == 1000 and "x-request-id" in headers
    job = wait_terminal(gateway, key, created["id"])
    assert job["status"] == "completed", job
    assert job["progress"] == 100 and job["chunks"]["total"] >= 1 and job["chunks"]["completed"] == job["chunks"]["total"]
    assert video_url_ok(gateway, job["video"]["url"], job["id"]) and abs(job["video"]["duration_sec"] - 6) < 0.5
    assert "video_base64" not in job
    # The whole video, then a range of it, then a conditional GET.
    target = os.path.join(files["dir"], "video.mp4")
    status, headers, _ = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol, output=target)
    assert status == 200 and headers["content-type"] == "video/mp4"
    whole = open(target, "rb").read()
    assert len(whole) == int(headers["content-length"]) and whole[4:8] == b"ftyp"
    etag = headers["etag"]
    status, headers, part = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol, headers=["Range: bytes=100-199"])
    assert status == 206 and part == whole[100:200] and headers["content-range"] == f"bytes 100-199/{len(whole)}"
    status, _, part = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol, headers=["Range: bytes=-10"])
    assert status == 206 and part == whole[-10:]
    # An end past Int64's range (found by the byte-range fuzz target: it used to overflow and kill the Gateway).
    status, _, part = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol,
                                   headers=["Range: bytes=10-9223372036854775807"])
    assert status == 206 and part == whole[10:]
    status, _, _ = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol, headers=[f"If-None-Match: {etag}"])
    assert status == 304
    status, _, error = gateway.json("GET", f"/v1/jobs/{job['id']}/video", key=key, protocol=protocol, headers=[f"Range: bytes={len(whole) + 5}-"])
    assert status == 416 and error["error"]["code"] == "RANGE_NOT_SATISFIABLE"
    # Inline only when asked.
    status, _, inline = gateway.json("GET", f"/v1/jobs/{job['id']}?include=video_base64", key=key, protocol=protocol)
    assert status == 200 and base64.b64decode(inline["video_base64"]) == whole
    # The chunks' places in the audio and their RunPod timings, only when asked for.
    assert "chunk_list" not in job and job["completed_at"] >= job["created_at"]
    status, _, detailed = gateway.json("GET", f"/v1/jobs/{job['id']}?include=chunks", key=key, protocol=protocol)
    chunks = detailed["chunk_list"]
    assert status == 200 and len(chunks) == job["chunks"]["total"] and "video_base64" not in detailed
    assert [c["index"] for c in chunks] == list(range(len(chunks))) and chunks[0]["start_sec"] == 0
    assert abs(sum(c["duration_sec"] for c in chunks) - job["video"]["duration_sec"]) < 0.1
    assert all(c["status"] == "completed" and c["attempts"] == 1 and c["finished_at"] >= c["submitted_at"] for c in chunks)
    # The list has it, newest first; a status filter; cancelling a finished job is a conflict.
    status, _, page = gateway.json("GET", "/v1/jobs?status=completed&page_size=1", key=key, protocol=protocol)
    assert status == 200 and len(page["jobs"]) == 1 and page["jobs"][0]["status"] == "completed"
    status, _, error = gateway.json("DELETE", f"/v1/jobs/{job['id']}", key=key, protocol=protocol)
    assert status == 409 and error["error"]["code"] == "JOB_TERMINAL"
    # One access-log line per request, with the route pattern, the key id and the bytes sent (a
    # streamed video's too).
    lines = [json.loads(line) for line in gateway.service.read_log().splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("msg") == "request" and line.get("route") == "/v1/jobs/{id}/video"
              and line.get("status") == "200" and line.get("bytes") == str(len(whole))]
    assert served and all(line["key_id"].startswith("key_") and line["request_id"] for line in served), lines[-5:]


def test_a_json_base64_job_with_a_data_uri_and_unknown_fields(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    body = os.path.join(files["dir"], "body.json")
    image = base64.b64encode(open(files["face"], "rb").read()).decode()
    audio = base64.b64encode(open(files["speech"], "rb").read()).decode()
    # A JSON escape inside the base64 (`\/`), line breaks, and members nobody asked for.
    audio = audio[:40] + "\n" + audio[40:]
    with open(body, "w") as fh:
        json.dump({"unknown": [1, {"a": "}"}], "image_base64": "data:image/png;base64," + image, "audio_base64": audio,
                   "width": 320, "height": 320, "dry_run": False, "prompt": "a \"quoted\" prompt"}, fh)
    status, _, created = gateway.json("POST", "/v1/jobs", key=key, data=body, headers=["Idempotency-Key: json-1"])
    assert status == 202, created
    # The same idempotency key names the same job; its second upload is not kept.
    before = uploads(world)
    status, _, again = gateway.json("POST", "/v1/jobs", key=key, data=body, headers=["Idempotency-Key: json-1"])
    assert status == 202 and again["id"] == created["id"]
    assert uploads(world) == before
    assert wait_terminal(gateway, key, created["id"])["status"] == "completed"


def test_server_sent_events_until_terminal_and_resumed_after_the_last_event(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    _, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files))
    events = subprocess.run(["curl", "-sN", "--max-time", "60", "-H", f"X-API-Key: {key}", f"{gateway.url}/v1/jobs/{created['id']}/events"],
                            capture_output=True, text=True).stdout
    blocks = [block for block in events.split("\n\n") if "event: job" in block]
    assert blocks, events
    versions = [int(line[4:]) for block in blocks for line in block.splitlines() if line.startswith("id: ")]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    last = json.loads([line[6:] for line in blocks[-1].splitlines() if line.startswith("data: ")][0])
    assert last["status"] == "completed"
    # Resumed after an earlier event: only the later ones come again.
    resumed = subprocess.run(["curl", "-sN", "--max-time", "30", "-H", f"X-API-Key: {key}", "-H", f"Last-Event-ID: {versions[0]}",
                              f"{gateway.url}/v1/jobs/{created['id']}/events"], capture_output=True, text=True).stdout
    again = [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")]
    assert again and min(again) > versions[0]


def test_the_auth_matrix_and_a_revoked_key(world):
    gateway, key, other, files = world["gateway"], world["key"], world["other"], world["files"]
    _, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files, dry_run="true"))
    for path in ["/v1/jobs", f"/v1/jobs/{created['id']}", f"/v1/jobs/{created['id']}/video", "/v1/nothing"]:
        status, headers, error = gateway.json("GET", path)
        assert status == 401 and error["error"]["code"] == "UNAUTHORIZED" and headers["www-authenticate"] == "Bearer"
        status, _, error = gateway.json("GET", path, key="tmk_wrong")
        assert status == 401
    # Another tenant's job does not exist for this key; X-API-Key works like Bearer.
    status, _, error = gateway.json("GET", f"/v1/jobs/{created['id']}", key=other)
    assert status == 404 and error["error"]["code"] == "JOB_NOT_FOUND"
    status, _, _ = gateway.json("GET", f"/v1/jobs/{created['id']}", headers=[f"X-API-Key: {key}"])
    assert status == 200
    status, _, listed = gateway.json("GET", "/v1/jobs", key=other)
    assert status == 200 and all(job["id"] != created["id"] for job in listed["jobs"])
    # Health and the document need no key; no key ever reaches the log.
    assert gateway.curl("GET", "/healthz")[0] == 200 and gateway.curl("GET", "/readyz")[0] == 200
    assert gateway.json("GET", "/openapi.json")[2]["openapi"] == "3.1.0"
    log = gateway.service.read_log()
    assert key not in log and other not in log and "tmk_wrong" not in log
    # A revoked key is refused once the file is reloaded (SIGHUP here; a change is seen within 1 s too).
    revoked = new_key(world["keys_file"])
    deadline = time.time() + 5
    while time.time() < deadline and gateway.curl("GET", "/v1/jobs", key=revoked)[0] != 200:
        time.sleep(0.2)
    assert gateway.curl("GET", "/v1/jobs", key=revoked)[0] == 200
    key_id = talkmesh("keys", "list", "--keys-file", world["keys_file"]).stdout.strip().splitlines()[-1].split("\t")[0]
    assert talkmesh("keys", "revoke", key_id, "--keys-file", world["keys_file"]).returncode == 0
    gateway.service.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while time.time() < deadline and gateway.curl("GET", "/v1/jobs", key=revoked)[0] != 401:
        time.sleep(0.2)
    assert gateway.curl("GET", "/v1/jobs", key=revoked)[0] == 401
    assert gateway.curl("GET", "/v1/jobs", key=key)[0] == 200


def test_rate_limits_burst_refill_headers_and_the_job_budget(world, tmp_path):
    keys_file = str(tmp_path / "keys.json")
    key = new_key(keys_file, "--rate", "2", "--burst", "5", "--job-rate", "0.01", "--job-burst", "1", "--max-active-jobs", "1")
    gateway = Gateway(world["mesh"], keys_file)
    try:
        statuses = [gateway.curl("GET", "/v1/jobs", key=key) for _ in range(8)]
        accepted = [s for s, _, _ in statuses if s == 200]
        refused = [(s, h) for s, h, _ in statuses if s == 429]
        assert 5 <= len(accepted) <= 6 and refused
        status, headers = refused[0]
        assert int(headers["retry-after"]) >= 1 and headers["ratelimit-remaining"] == "0" and headers["ratelimit-limit"] == "5"
        time.sleep(1.6)  # 2 per second refill
        assert gateway.curl("GET", "/v1/jobs", key=key)[0] == 200
        time.sleep(2.5)
        # One job creation, then the job budget (not the request budget) refuses the next.
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"], dry_run="true"))
        assert status == 202, created
        status, headers, error = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"]))
        assert status == 429 and error["error"]["code"] == "RATE_LIMITED" and "retry-after" in headers
    finally:
        gateway.stop()


def test_the_active_jobs_cap(world, tmp_path):
    keys_file = str(tmp_path / "keys.json")
    key = new_key(keys_file, "--job-rate", "100", "--job-burst", "100", "--max-active-jobs", "1")
    mesh = Mesh(emulator_args=["--speed", "2"])
    gateway = Gateway(mesh, keys_file)
    try:
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"]))
        assert status == 202
        status, _, error = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"]))
        assert status == 429 and error["error"]["code"] == "TOO_MANY_ACTIVE_JOBS"
        status, _, cancelled = gateway.json("DELETE", f"/v1/jobs/{created['id']}", key=key)
        assert status == 202 and cancelled["status"] == "cancelled"
        status, _, _ = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"], dry_run="true"))
        assert status == 202
    finally:
        gateway.stop()
        mesh.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["http1", "h2c"])
def test_wrong_types_by_content_and_wrong_fields_are_refused_and_leave_nothing(world, protocol):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    text = os.path.join(files["dir"], "note.png")
    with open(text, "w") as fh:
        fh.write("not an image, whatever the name says\n")
    before = uploads(world)
    cases = [
        (multipart(files, image="@" + text), 400, "INVALID_IMAGE"),
        (multipart(files, audio="@" + files["face"]), 400, "INVALID_AUDIO"),
        (multipart(files, width="wide"), 400, "INVALID_REQUEST"),
        (multipart(files, width="32"), 400, "INVALID_REQUEST"),
        (multipart(files, dry_run="maybe"), 400, "INVALID_REQUEST"),
        ({"image": "@" + files["face"], "width": "320", "height": "320"}, 400, "INVALID_REQUEST"),
    ]
    for form, status, code in cases:
        got, _, error = gateway.json("POST", "/v1/jobs", key=key, protocol=protocol, form=form)
        assert (got, error["error"]["code"]) == (status, code), (form, error)
    for body, code, field in [('{"width": "abc", "height": 320}', "INVALID_REQUEST", "width"),
                              ('{"image_base64": "!!!", "width": 320, "height": 320}', "INVALID_REQUEST", "image_base64"),
                              ('{"image_base64": "aGVsbG8gd29ybGQ=", "audio_base64": "", "width": 320, "height": 320}', "INVALID_IMAGE", "image"),
                              ('[1, 2]', "INVALID_REQUEST", "object"), ('{"width": 320', "INVALID_REQUEST", "ended")]:
        got, _, error = gateway.json("POST", "/v1/jobs", key=key, protocol=protocol, data=body)
        assert got == 400 and error["error"]["code"] == code and field in error["error"]["message"], (body, error)
    got, _, error = gateway.json("POST", "/v1/jobs", key=key, protocol=protocol, headers=["Content-Type: text/plain"], extra=["--data", "x"])
    assert got == 415 and error["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert uploads(world) == before


def test_the_openapi_document_is_valid(world):
    _, _, document = world["gateway"].json("GET", "/openapi.json")
    from openapi_spec_validator import validate
    validate(document)
    for path in ["/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/video", "/v1/jobs/{id}/events", "/healthz", "/readyz", "/metrics",
                 "/health", "/jobs", "/jobs/{id}", "/generate", "/status/{job_id}", "/result/{job_id}"]:
        assert path in document["paths"]


def dispatcher_get_jobs(mesh):
    metrics = urllib.request.urlopen(f"http://{mesh.dispatcher.address}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("talkmesh_grpc_server_requests_total") and "DispatcherService/GetJob\"" in line)


@pytest.mark.parametrize("ttl", ["0", "2s"])
def test_polls_reuse_the_answer_for_job_cache_ttl_and_own_changes_show_at_once(world, ttl):
    """JOB_CACHE_TTL: polls of one job within it cost the Dispatcher nothing; 0 asks every time.
    What this Gateway changes itself (a cancel) is never answered stale."""
    gateway = Gateway(world["mesh"], world["keys_file"], JOB_CACHE_TTL=ttl)
    try:
        key, files = world["key"], world["files"]
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files, chunk_target_sec="5"))
        assert status == 202, created
        before = dispatcher_get_jobs(world["mesh"])
        start = time.time()
        answers = [gateway.json("GET", f"/v1/jobs/{created['id']}", key=key)[2] for _ in range(20)]
        elapsed = time.time() - start
        calls = dispatcher_get_jobs(world["mesh"]) - before
        assert all(answer["id"] == created["id"] for answer in answers)
        if ttl == "0":
            assert calls >= 20
        else:
            assert elapsed < 2 and calls == 0, (calls, elapsed)  # the creation stored the first answer
            # Another key never sees it, cached or not.
            assert gateway.json("GET", f"/v1/jobs/{created['id']}", key=world["other"])[0] == 404
        status, _, cancelled = gateway.json("DELETE", f"/v1/jobs/{created['id']}", key=key)
        if status == 202:  # not finished yet: the cancel is what the next poll shows
            assert gateway.json("GET", f"/v1/jobs/{created['id']}", key=key)[2]["status"] == cancelled["status"] == "cancelled"
        wait_terminal(gateway, key, created["id"])
    finally:
        gateway.stop()


def test_a_poll_after_an_event_never_answers_an_older_state(world):
    """The events stream refreshes the cache: with a minute-long JOB_CACHE_TTL the creation's
    answer ("in_queue") would otherwise be served long after the stream said "completed"."""
    gateway = Gateway(world["mesh"], world["keys_file"], JOB_CACHE_TTL="60s")
    try:
        key, files = world["key"], world["files"]
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files))
        assert status == 202, created
        assert gateway.json("GET", f"/v1/jobs/{created['id']}", key=key)[2]["status"] == created["status"]
        events = subprocess.run(["curl", "-sN", "--max-time", "60", "-H", f"X-API-Key: {key}", f"{gateway.url}/v1/jobs/{created['id']}/events"],
                                capture_output=True, text=True).stdout
        assert '"status":"completed"' in events, events[-500:]
        assert gateway.json("GET", f"/v1/jobs/{created['id']}", key=key)[2]["status"] == "completed"
    finally:
        gateway.stop()


def test_a_job_cache_ttl_out_of_range_stops_the_gateway_at_start(world):
    result = subprocess.run([os.path.join(BIN, "talkmesh-gateway"), "--port", "0", "--job-cache-ttl", "2m"], capture_output=True, text=True,
                            env={**os.environ, "API_KEYS_FILE": world["keys_file"]}, timeout=20)
    assert result.returncode == 2 and "JOB_CACHE_TTL" in result.stderr
