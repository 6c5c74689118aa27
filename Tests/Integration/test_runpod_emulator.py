"""The RunPod emulator over real HTTP (HTTP/1.1 and h2c): RunPod's shapes and lifecycle, auth,
limits, faults, and the video it renders (probed with ffprobe)."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import Service


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media_inputs():
    d = tempfile.mkdtemp(prefix="talkmesh-emulator-")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=384x576", "-frames:v", "1", f"{d}/face.png")
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:sample_rate=16000", "-t", "7.3", "-ac", "1", "-c:a", "pcm_s16le", f"{d}/chunk.wav")
    with open(f"{d}/face.png", "rb") as a, open(f"{d}/chunk.wav", "rb") as b:
        encoded = base64.b64encode(a.read()).decode(), base64.b64encode(b.read()).decode()
    shutil.rmtree(d, ignore_errors=True)
    return encoded


def body(media_inputs, **policy):
    image, wav = media_inputs
    payload = {"input": {"input_type": "image", "person_count": "single", "prompt": "a person talking",
                         "image_base64": image, "wav_base64": wav, "width": 384, "height": 576,
                         "network_volume": False, "force_offload": True}}
    if policy:
        payload["policy"] = policy
    return json.dumps(payload).encode()


def call(service, method, path, data=None, headers=None):
    request = urllib.request.Request(f"http://{service.address}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


def wait_terminal(service, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, job, _ = call(service, "GET", f"/v2/ep/status/{job_id}")
        assert status == 200, job
        if job["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def emulator():
    service = Service("talkmesh-runpod-emulator", args=["--workers", "2"])
    yield service
    assert service.stop() == 0


def test_run_status_lifecycle_and_rendered_video(emulator, media_inputs, tmp_path):
    status, job, _ = call(emulator, "POST", "/v2/ep/run", body(media_inputs))
    assert status == 200 and job["status"] == "IN_QUEUE" and job["id"]
    done = wait_terminal(emulator, job["id"])
    assert done["status"] == "COMPLETED"
    assert {"id", "status", "delayTime", "executionTime", "workerId", "output"} <= set(done)
    video = base64.b64decode(done["output"]["video"])
    path = str(tmp_path / "video.mp4")  # pytest removes it (a mktemp name had stayed in /tmp)
    with open(path, "wb") as fh:
        fh.write(video)
    streams = json.loads(subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-show_streams", path],
                                        capture_output=True, text=True, check=True).stdout)["streams"]
    v = next(s for s in streams if s["codec_type"] == "video")
    a = next(s for s in streams if s["codec_type"] == "audio")
    assert (v["codec_name"], v["width"], v["height"], v["r_frame_rate"]) == ("h264", 384, 576, "25/1")
    assert a["codec_name"] == "aac"
    assert abs(float(v["duration"]) - 7.3) <= 0.04  # the chunk's length, within one frame
    assert abs(float(a["duration"]) - 7.3) <= 0.05


def test_runsync_returns_the_output(emulator, media_inputs):
    status, job, _ = call(emulator, "POST", "/v2/ep/runsync", body(media_inputs))
    assert status == 200 and job["status"] == "COMPLETED" and job["output"]["video"]


def test_health_stats_and_h2c(emulator, media_inputs):
    before = call(emulator, "GET", "/_emulator/stats")[1]
    for _ in range(2):
        call(emulator, "POST", "/v2/ep/run", body(media_inputs))
    after = call(emulator, "GET", "/_emulator/stats")[1]
    assert after["total"] == before["total"] + 2
    assert max(after["submissions"].values()) >= 2  # the same input counted under one hash
    status, health, _ = call(emulator, "GET", "/v2/ep/health")
    assert status == 200 and set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert set(health["workers"]) == {"idle", "running"}
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", f"http://{emulator.address}/v2/ep/health"],
                         capture_output=True, text=True, timeout=10).stdout
    assert json.loads(out)["workers"]


def test_bad_requests(emulator, media_inputs):
    assert call(emulator, "POST", "/v2/ep/run", b'{"no_input": 1}')[0] == 400
    assert call(emulator, "POST", "/v2/ep/run", b"not json")[0] == 400
    image, wav = media_inputs
    big = json.dumps({"input": {"image_base64": image, "wav_base64": "A" * (11 * 1024 * 1024)}}).encode()
    assert call(emulator, "POST", "/v2/ep/run", big)[0] == 413
    assert call(emulator, "GET", "/v2/ep/status/no-such-job")[0] == 404


def test_cancel_purge_and_retry(media_inputs):
    service = Service("talkmesh-runpod-emulator", args=["--workers", "1", "--speed", "1", "--fail-rate", "0"])
    try:
        first = call(service, "POST", "/v2/ep/run", body(media_inputs))[1]
        second = call(service, "POST", "/v2/ep/run", body(media_inputs))[1]
        third = call(service, "POST", "/v2/ep/run", body(media_inputs))[1]
        status, cancelled, _ = call(service, "POST", f"/v2/ep/cancel/{second['id']}")
        assert status == 200 and cancelled["status"] == "CANCELLED"
        assert call(service, "GET", f"/v2/ep/status/{second['id']}")[1]["status"] == "CANCELLED"
        purged = call(service, "POST", "/v2/ep/purge-queue")[1]
        assert purged == {"removed": 1, "status": "completed"}
        assert call(service, "GET", f"/v2/ep/status/{third['id']}")[1]["status"] == "CANCELLED"
        assert wait_terminal(service, first["id"])["status"] == "COMPLETED"
        assert call(service, "POST", f"/v2/ep/retry/{first['id']}")[0] == 404  # only FAILED or TIMED_OUT
    finally:
        assert service.stop() == 0


def test_api_key(media_inputs):
    service = Service("talkmesh-runpod-emulator", env={"RUNPOD_API_KEY": "secret-key"})
    try:
        assert call(service, "GET", "/v2/ep/health")[0] == 401
        assert call(service, "GET", "/v2/ep/health", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(service, "GET", "/v2/ep/health", headers={"Authorization": "Bearer secret-key"})[0] == 200
    finally:
        assert service.stop() == 0


def test_injected_failure_has_the_sdk_error_string_and_can_be_retried(media_inputs):
    service = Service("talkmesh-runpod-emulator", args=["--fail-rate", "1"])
    try:
        job = call(service, "POST", "/v2/ep/run", body(media_inputs))[1]
        done = wait_terminal(service, job["id"])
        assert done["status"] == "FAILED" and "output" not in done
        error = json.loads(done["error"])  # a JSON string, as the RunPod SDK reports handler exceptions
        assert {"error_type", "error_message", "error_traceback"} <= set(error)
        status, retried, _ = call(service, "POST", f"/v2/ep/retry/{job['id']}")
        assert status == 200 and retried == {"id": job["id"], "status": "IN_QUEUE"}
        assert call(service, "GET", "/v2/ep/health")[1]["jobs"]["retried"] == 1
    finally:
        assert service.stop() == 0


def test_completed_without_output(media_inputs):
    service = Service("talkmesh-runpod-emulator", args=["--missing-output-rate", "1"])
    try:
        done = wait_terminal(service, call(service, "POST", "/v2/ep/run", body(media_inputs))[1]["id"])
        assert done["status"] == "COMPLETED" and "output" not in done
    finally:
        assert service.stop() == 0


def test_http_faults(media_inputs):
    service = Service("talkmesh-runpod-emulator", args=["--http-429-rate", "1"])
    try:
        status, _, headers = call(service, "POST", "/v2/ep/run", body(media_inputs))
        assert status == 429 and headers.get("retry-after") == "1"
    finally:
        assert service.stop() == 0
    service = Service("talkmesh-runpod-emulator", args=["--http-500-rate", "1"])
    try:
        assert call(service, "GET", "/v2/ep/health")[0] == 500
    finally:
        assert service.stop() == 0


def test_execution_timeout_ttl_and_hanging_jobs(media_inputs):
    service = Service("talkmesh-runpod-emulator", args=["--speed", "1", "--workers", "2"])
    try:
        timed = call(service, "POST", "/v2/ep/run", body(media_inputs, executionTimeout=500))[1]
        assert wait_terminal(service, timed["id"])["status"] == "TIMED_OUT"
        short = call(service, "POST", "/v2/ep/run", body(media_inputs, ttl=1000))[1]
        time.sleep(1.3)
        assert call(service, "GET", f"/v2/ep/status/{short['id']}")[0] == 404  # expired: gone
    finally:
        assert service.stop() == 0
    service = Service("talkmesh-runpod-emulator", args=["--hang-rate", "1"])
    try:
        job = call(service, "POST", "/v2/ep/run", body(media_inputs))[1]
        time.sleep(1.0)
        assert call(service, "GET", f"/v2/ep/status/{job['id']}")[1]["status"] == "IN_PROGRESS"
    finally:
        assert service.stop() == 0


def test_bad_flags_exit_two():
    from conftest import BIN
    result = subprocess.run([os.path.join(BIN, "talkmesh-runpod-emulator"), "--fail-rate", "2"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "fail-rate" in result.stderr


def test_the_render_scratch_is_under_tmpdir_and_gone_after_stop(media_inputs, tmp_path):
    service = Service("talkmesh-runpod-emulator", env={"TMPDIR": str(tmp_path)})
    scratch = tmp_path / f"talkmesh-runpod-emulator-{service.proc.pid}"
    try:
        status, job, _ = call(service, "POST", "/v2/ep/runsync", body(media_inputs))
        assert status == 200 and job["status"] == "COMPLETED"
        assert scratch.is_dir() and not any(scratch.iterdir()), "each render's files are removed after it"
    finally:
        assert service.stop() == 0
    assert not scratch.exists(), "the directory goes with the emulator"
