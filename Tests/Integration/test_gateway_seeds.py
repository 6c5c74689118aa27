"""The seeds' APIs on the Gateway, with the request and answer shapes their clients send and read:
the Infinitetalk API (`POST /jobs`, `GET /jobs/{id}`, `GET /health`) and avatar-api
(`POST /generate`, `GET /status/{job_id}`, `GET /result/{job_id}`), on the same keys and jobs."""
import base64
import json
import os
import subprocess
import time

import pytest

from test_gateway import PROTOCOLS, multipart, video_url_ok, world  # noqa: F401  (world is a fixture)
from test_dispatcher import inputs  # noqa: F401


def wait_seed(gateway, key, path, done, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, _, body = gateway.json("GET", path, key=key)
        assert status == 200, body
        if done(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} did not finish: {body}")


def ffprobe_bytes(data, directory):
    path = os.path.join(directory, "seed.mp4")
    with open(path, "wb") as fh:
        fh.write(data)
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["http1", "h2c"])
def test_the_infinitetalk_api_json_job_answers_with_the_video_inline(world, protocol):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    status, _, health = gateway.json("GET", "/health", protocol=protocol)
    assert status == 200 and health == {"status": "ok"}
    body = os.path.join(files["dir"], "seed.json")
    with open(body, "w") as fh:
        json.dump({"image_base64": base64.b64encode(open(files["face"], "rb").read()).decode(),
                   "audio_base64": base64.b64encode(open(files["speech"], "rb").read()).decode(),
                   "width": 384, "height": 576, "push_to_s3": False}, fh)
    status, headers, created = gateway.json("POST", "/jobs", key=key, protocol=protocol, data=body)
    assert status == 202 and set(created) == {"id", "status"} and created["status"] == "IN_QUEUE", created
    job = wait_seed(gateway, key, f"/jobs/{created['id']}", lambda job: job["status"] not in ("IN_QUEUE", "RUNNING"))
    assert job["status"] == "COMPLETED" and job["progress"] == 100 and "video_url" not in job, {k: v for k, v in job.items() if k != "video_base64"}
    video = base64.b64decode(job["video_base64"])
    streams = ffprobe_bytes(video, files["dir"])
    assert [(s["width"], s["height"]) for s in streams if s["codec_type"] == "video"] == [(384, 576)]
    # The same job through /v1: the same bytes.
    status, _, whole = gateway.curl("GET", f"/v1/jobs/{created['id']}/video", key=key)
    assert status == 200 and whole == video


def test_the_infinitetalk_api_multipart_with_push_to_s3_answers_with_a_url(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    status, _, created = gateway.json("POST", "/jobs", key=key, form=multipart(files, push_to_s3="true"))
    assert status == 202 and created["status"] == "IN_QUEUE", created
    job = wait_seed(gateway, key, f"/jobs/{created['id']}", lambda job: job["status"] not in ("IN_QUEUE", "RUNNING"))
    assert job["status"] == "COMPLETED" and "video_base64" not in job
    assert video_url_ok(gateway, job["video_url"], created["id"], origin=gateway.url), job["video_url"]
    status, headers, video = gateway.curl("GET", f"/v1/jobs/{created['id']}/video", key=key)
    assert status == 200 and video[4:8] == b"ftyp"


def test_the_infinitetalk_api_errors_keep_its_flat_shape(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    status, _, error = gateway.json("GET", "/jobs/job_0000000000000000", key=key)
    assert status == 404 and error == {"error": "no job job_0000000000000000", "code": "JOB_NOT_FOUND"}
    status, _, error = gateway.json("GET", "/jobs/job_0000000000000000")
    assert status == 401 and error["code"] == "UNAUTHORIZED" and isinstance(error["error"], str)
    status, _, error = gateway.json("POST", "/jobs", key=key, data='{"image_base64": "iVBORw0KGgo=", "width": "wide"}')
    assert status == 400 and error["code"] == "INVALID_REQUEST" and "width" in error["error"], error
    form = multipart(files)
    del form["width"]
    status, _, error = gateway.json("POST", "/jobs", key=key, form=form)
    assert status == 400 and error == {"error": "width is required", "code": "INVALID_REQUEST"}


def test_avatar_api_generate_status_and_result(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    # avatar-api's clients send the image, the audio and a prompt; no size.
    form = {"image": "@" + files["face"], "audio": "@" + files["speech"], "prompt": "a calm presenter"}
    status, _, created = gateway.json("POST", "/generate", key=key, form=form)
    assert status == 200 and list(created) == ["data"] and created["data"]["job_id"].startswith("job_"), created
    job_id = created["data"]["job_id"]
    status, _, early = gateway.json("GET", f"/result/{job_id}", key=key)
    assert status == 409 and early["error"]["code"] == "JOB_NOT_COMPLETED"
    seen = set()

    def done(body):
        data = body["data"]
        assert data["status"] in ("pending", "processing", "completed", "failed"), data
        assert 0 <= data["progress"] <= 100 and data["eta_seconds"] >= 0
        seen.add(data["status"])
        return data["status"] in ("completed", "failed")

    final = wait_seed(gateway, key, f"/status/{job_id}", done)
    assert final["data"]["status"] == "completed" and final["data"]["progress"] == 100, final
    status, _, result = gateway.json("GET", f"/result/{job_id}", key=key)
    assert status == 200 and video_url_ok(gateway, result["data"]["url"], job_id, origin=gateway.url), result
    # The same job in /v1, at the default size, with the prompt kept.
    status, _, job = gateway.json("GET", f"/v1/jobs/{job_id}", key=key)
    assert status == 200 and (job["width"], job["height"]) == (384, 576)
    # Another key does not see it.
    status, _, error = gateway.json("GET", f"/status/{job_id}", key=world["other"])
    assert status == 404 and error["error"]["code"] == "JOB_NOT_FOUND"


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(world, tmp_path):
    """Property-based requests from /openapi.json with a valid key: positive and negative data,
    every operation (the seeds' included), bounded by examples and time."""
    gateway, key = world["gateway"], world["key"]
    result = subprocess.run(
        ["schemathesis", "run", f"{gateway.url}/openapi.json", "-H", f"Authorization: Bearer {key}",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "25", "--max-time", "60", "--seed", "1", "--workers", "2",
         "--request-timeout", "30", "--suppress-health-check", "all", "--generation-database", "none", "--no-color",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=420, cwd=tmp_path)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
