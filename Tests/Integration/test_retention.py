"""Retention through the real mesh (either blob store): a job's video and uploads are deleted
VIDEO_RETENTION after it ended and every video route answers 410 EXPIRED; JOB_RETENTION after it
ended the job itself is gone and its owner gets 410 EXPIRED (anyone else 404); with two Dispatchers
on one PostgreSQL database every job is swept once."""
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import Service
from test_dispatcher import Mesh, inputs  # noqa: F401  (inputs is a fixture)
from test_gateway import Gateway, multipart, new_key, wait_terminal
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc

RETENTION = {"VIDEO_RETENTION": "3s", "JOB_RETENTION": "7s", "RETENTION_SWEEP_INTERVAL": "200ms"}


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def exists(mesh, key):
    return key in mesh.blob_keys(os.path.dirname(key) + "/")


def events(service):
    """The Dispatcher's retention counters from /metrics."""
    _, text = service.http_get("/metrics")
    found = dict(re.findall(r'talkmesh_dispatcher_events_total\{event="(retention_\w+)"\} (\d+)', text))
    return {name: int(value) for name, value in found.items()}


@pytest.fixture
def world(inputs):  # noqa: F811
    directory = tempfile.mkdtemp(prefix="talkmesh-retention-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000")
    other = new_key(keys_file, "--rate", "1000", "--burst", "1000")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=4", "-ar", "16000",
                    f"{directory}/tone.wav"], check=True)
    mesh = Mesh(dispatcher_env=RETENTION)
    gateway = Gateway(mesh, keys_file, JOB_CACHE_TTL="0")
    yield {"mesh": mesh, "gateway": gateway, "key": key, "other": other,
           "files": {"face": f"{inputs['dir']}/face.png", "speech": f"{directory}/tone.wav", "dir": directory}}
    gateway.stop()
    mesh.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_a_video_expires_then_the_job_and_every_route_says_so(world):
    mesh, gateway, key, other = world["mesh"], world["gateway"], world["key"], world["other"]
    status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(world["files"]))
    assert status == 202, created
    job_id = created["id"]
    job = wait_terminal(gateway, key, job_id)
    assert job["status"] == "completed" and "video" in job and "video_expired_at" not in job
    stored = mesh.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
    uploads = [stored.image_key, stored.audio_key]
    assert all(exists(mesh, k) for k in uploads) and mesh.blob_keys(f"jobs/{job_id}/")
    status, _, _ = gateway.curl("GET", f"/v1/jobs/{job_id}/video", key=key)
    assert status == 200

    # VIDEO_RETENTION later: the blobs are gone, the job says when, and the video routes answer 410.
    job = wait_for(lambda: (lambda j: j if "video_expired_at" in j else None)(gateway.json("GET", f"/v1/jobs/{job_id}", key=key)[2]),
                   20, "the video to expire")
    assert job["status"] == "completed" and "video" not in job and job["video_expired_at"] >= job["completed_at"]
    assert mesh.blob_keys(f"jobs/{job_id}/") == [] and not any(exists(mesh, k) for k in uploads)
    for path in (f"/v1/jobs/{job_id}/video", f"/v1/jobs/{job_id}?include=video_base64", f"/result/{job_id}"):
        status, _, error = gateway.json("GET", path, key=key)
        assert status == 410 and error["error"]["code"] == "EXPIRED", (path, error)
    status, _, error = gateway.json("GET", f"/jobs/{job_id}", key=key)  # the Infinitetalk API's shape
    assert status == 410 and error["code"] == "EXPIRED"
    status, _, page = gateway.json("GET", "/v1/jobs", key=key)
    assert status == 200 and [j["id"] for j in page["jobs"]] == [job_id]

    # JOB_RETENTION later: the job is deleted; its owner learns it expired, nobody else that it existed.
    wait_for(lambda: gateway.json("GET", f"/v1/jobs/{job_id}", key=key)[0] == 410, 20, "the job to expire")
    status, _, error = gateway.json("GET", f"/v1/jobs/{job_id}", key=key)
    assert error["error"]["code"] == "EXPIRED" and "deleted" in error["error"]["message"]
    for method, path in (("DELETE", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"), ("GET", f"/v1/jobs/{job_id}/video")):
        status, _, error = gateway.json(method, path, key=key)
        assert status == 410 and error["error"]["code"] == "EXPIRED", (method, path, error)
    status, _, error = gateway.json("GET", f"/v1/jobs/{job_id}", key=other)
    assert status == 404 and error["error"]["code"] == "JOB_NOT_FOUND"
    status, _, page = gateway.json("GET", "/v1/jobs", key=key)
    assert status == 200 and page["jobs"] == []
    kept = mesh.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
    assert kept.expired_at_unix_ms > 0 and kept.status == pb.COMPLETED and kept.video_key == "" and kept.image_key == ""
    counted = events(mesh.dispatcher)
    assert counted["retention_blobs_deleted"] == 1 and counted["retention_jobs_expired"] == 1 and counted["retention_sweeps"] > 5


def test_an_upload_two_jobs_share_outlives_the_first(world):
    """Over gRPC two jobs may name one upload: the first job's sweep leaves it to the second."""
    mesh = world["mesh"]
    mesh.put("shared/face.png", world["files"]["face"])
    mesh.put("shared/speech.wav", world["files"]["speech"])
    first = mesh.create(image="shared/face.png", audio="shared/speech.wav", owner="acme")
    wait_for(lambda: mesh.stub.GetJob(pb.GetJobRequest(id=first.id), timeout=10).status == pb.COMPLETED, 60, "the first job")
    second = mesh.create(image="shared/face.png", audio="shared/speech.wav", owner="acme", options={"dry_run": True})
    wait_for(lambda: mesh.stub.GetJob(pb.GetJobRequest(id=first.id), timeout=10).blobs_deleted_at_unix_ms > 0, 20, "the first job's sweep")
    done = mesh.stub.GetJob(pb.GetJobRequest(id=second.id), timeout=10)
    if done.blobs_deleted_at_unix_ms == 0:  # the second ended less than VIDEO_RETENTION ago: its uploads are still there
        assert mesh.blob_keys("shared/") == ["shared/face.png", "shared/speech.wav"]
    wait_for(lambda: mesh.stub.GetJob(pb.GetJobRequest(id=second.id), timeout=10).blobs_deleted_at_unix_ms > 0, 20, "the second job's sweep")
    assert mesh.blob_keys("shared/") == []


def test_two_dispatchers_sweep_every_job_once(inputs, postgres):  # noqa: F811
    _, url = postgres.new_database()
    mesh = Mesh(dispatcher_env={"JOB_STORE": url, "LEASE_TTL": "2s", **RETENTION})
    second = Service("talkmesh-dispatcher", env=mesh.dispatcher_env)
    try:
        mesh.put("in/face.png", f"{inputs['dir']}/face.png")
        ids = []
        for n in range(4):
            mesh.put(f"in/{n}.wav", f"{inputs['dir']}/short.wav")
            ids.append(mesh.create(image="in/face.png", audio=f"in/{n}.wav", owner="acme").id)
        stubs = [mesh.stub, dispatcher_pb2_grpc.DispatcherServiceStub(__import__("grpc").insecure_channel(second.address))]
        wait_for(lambda: all(stubs[1].GetJob(pb.GetJobRequest(id=i), timeout=10).expired_at_unix_ms > 0 for i in ids), 90, "every job to expire")
        counted = [events(mesh.dispatcher), events(second)]
        assert sum(c.get("retention_blobs_deleted", 0) for c in counted) == len(ids), counted
        assert sum(c.get("retention_jobs_expired", 0) for c in counted) == len(ids), counted
        assert all(mesh.stub.GetJob(pb.GetJobRequest(id=i), timeout=10).status == pb.COMPLETED for i in ids)
        assert mesh.blob_keys("jobs/") == [] and mesh.blob_keys("in/") == []
    finally:
        second.stop()
        mesh.stop()
