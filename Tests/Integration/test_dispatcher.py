"""The Dispatcher drives real jobs: real Media and Audio, the RunPod emulator, a SQLite job store.
Speech from espeak-ng; the final MP4 checked with ffprobe; RunPod's side read from the emulator's
stats and request log."""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import grpc
import pytest

from conftest import Service
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc

TERMINAL = {pb.COMPLETED, pb.FAILED, pb.CANCELLED, pb.TIMED_OUT}
SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Speech is split at silences so that each part fits one worker.",
             "Every chunk becomes a short video, and the videos become one."]


def ffprobe(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-show_format", "-show_streams", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def speech(path, seconds):
    """About `seconds` of espeak-ng speech with pauses between sentences."""
    text, words = [], 0
    while words < seconds * 2.9:
        sentence = SENTENCES[len(text) % len(SENTENCES)]
        text.append(sentence + ' <break time="700ms"/> ')
        words += len(sentence.split()) + 1.5
    subprocess.run(["espeak-ng", "-m", "-s", "150", "-w", path, "<speak>" + "".join(text) + "</speak>"], check=True)
    return float(ffprobe(path)["format"]["duration"])


# The blob store the service tests run on: a directory, or S3 (moto behind a signature-checking
# front) when TALKMESH_TEST_BLOB_STORE=s3 — `make check` runs the service tests on both.
BLOB_BACKEND = os.environ.get("TALKMESH_TEST_BLOB_STORE", "file")


class Mesh:
    """Media, Audio, the emulator and one or more Dispatchers on one blob store."""

    def __init__(self, emulator_args=(), dispatcher_env=None, store=None, service_env=None):
        self.dir = tempfile.mkdtemp(prefix="talkmesh-dispatch-")
        self.blobs = os.path.join(self.dir, "blobs")
        os.makedirs(self.blobs)
        self.s3 = None
        if (store or BLOB_BACKEND) == "s3":
            from s3front import S3Front
            self.s3 = S3Front().__enter__()
            self.bucket = self.s3.bucket("mesh")
            shared = self.s3.env(self.bucket, "blobs", S3_SCRATCH_DIR=os.path.join(self.dir, "scratch"))
        else:
            shared = {"BLOB_STORE": "file://" + self.blobs}
        self.blob_env = shared
        workers = [] if "--workers" in emulator_args else ["--workers", "8"]
        self.emulator = Service("talkmesh-runpod-emulator", env=shared, args=[*workers, *emulator_args])
        # `service_env` reaches Media, Audio and the Dispatcher (tracing settings, say).
        shared = {**shared, **(service_env or {})}
        self.media = Service("talkmesh-media", env=shared)
        self.audio = Service("talkmesh-audio", env=shared)
        self.dispatcher_env = {**shared, "JOB_STORE": "sqlite://" + os.path.join(self.dir, "jobs.db"),
                               "MEDIA_ADDR": self.media.address, "AUDIO_ADDR": self.audio.address,
                               "RUNPOD_BASE_URL": f"http://{self.emulator.address}/v2", "RUNPOD_ENDPOINT_ID": "ep",
                               **(dispatcher_env or {})}
        self.dispatcher = None
        self.channel = None
        self.start_dispatcher()

    def start_dispatcher(self, **env):
        self.dispatcher = Service("talkmesh-dispatcher", env={**self.dispatcher_env, **env})
        if self.channel:
            self.channel.close()
        self.channel = grpc.insecure_channel(self.dispatcher.address)
        self.stub = dispatcher_pb2_grpc.DispatcherServiceStub(self.channel)

    def kill_dispatcher(self):
        self.dispatcher.proc.send_signal(signal.SIGKILL)
        self.dispatcher.proc.wait()

    def put(self, key, path):
        if self.s3:
            self.s3.client().upload_file(path, self.bucket, "blobs/" + key)
            return key
        target = os.path.join(self.blobs, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(path, target)
        return key

    def local(self, key):
        """A local path holding the blob's bytes."""
        if not self.s3:
            return os.path.join(self.blobs, key)
        target = os.path.join(self.dir, "fetched", key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.s3.client().download_file(self.bucket, "blobs/" + key, target)
        return target

    def blob_keys(self, prefix=""):
        """Every stored blob's key under `prefix`, sorted."""
        if self.s3:
            return sorted(key[len("blobs/"):] for key in self.s3.keys(self.bucket, "blobs/" + prefix))
        root = self.blobs
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(os.path.join(root, prefix)) for f in files)

    def create(self, image="in/face.png", audio="in/speech.wav", **fields):
        options = fields.pop("options", {})
        request = pb.CreateJobRequest(image_key=image, audio_key=audio, width=fields.pop("width", 320),
                                      height=fields.pop("height", 480), prompt="a person talking",
                                      options=pb.JobOptions(**options), **fields)
        return self.stub.CreateJob(request, timeout=10).job

    def wait(self, job_id, timeout=240, until=TERMINAL):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
            if job.status in until:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} is still {job.status}: {self.dispatcher.read_log()[-4000:]}")

    def emulator_json(self, path):
        with urllib.request.urlopen(f"http://{self.emulator.address}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self):
        if self.channel:
            self.channel.close()
        for service in (self.dispatcher, self.media, self.audio, self.emulator):
            if service and service.proc.poll() is None:
                service.stop()
        if self.s3:
            self.s3.__exit__(None, None, None)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs():
    d = tempfile.mkdtemp(prefix="talkmesh-dispatch-inputs-")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=400x600", "-frames:v", "1", f"{d}/face.png"], check=True)
    long_seconds = speech(f"{d}/long.wav", 180)
    short_seconds = speech(f"{d}/short.wav", 24)
    # For tests about the jobs, not their audio: splitting 24 s five times took 80 s of the
    # ThreadSanitizer pass (make sanitize), in Audio's instrumented sample loops.
    speech(f"{d}/tiny.wav", 6)
    yield {"dir": d, "long": long_seconds, "short": short_seconds}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mesh_factory(inputs):
    meshes = []

    def make(**kwargs):
        mesh = Mesh(**kwargs)
        meshes.append(mesh)
        mesh.put("in/face.png", f"{inputs['dir']}/face.png")
        mesh.put("in/speech.wav", f"{inputs['dir']}/short.wav")
        mesh.put("in/long.wav", f"{inputs['dir']}/long.wav")
        return mesh

    yield make
    for mesh in meshes:
        mesh.stop()


def submissions(mesh):
    return mesh.emulator_json("/_emulator/stats")["submissions"]


def routes(mesh, name):
    return [entry for entry in mesh.emulator_json("/_emulator/requests") if entry[0] == name]


def test_three_minute_speech_job_completes(mesh_factory, inputs):
    mesh = mesh_factory()
    job = mesh.create(audio="in/long.wav", width=320, height=480)
    assert job.status == pb.IN_QUEUE and job.id.startswith("job_")
    job = mesh.wait(job.id, timeout=400)
    assert job.status == pb.COMPLETED, (job.error, mesh.dispatcher.read_log()[-3000:])
    assert inputs["long"] >= 170
    assert job.progress == 1.0 and job.eta_seconds == 0
    assert len(job.chunks) >= int(inputs["long"] // 60) + 1 and all(c.status == pb.CHUNK_COMPLETED for c in job.chunks)
    assert all(c.attempts == 1 and c.runpod_job_id for c in job.chunks)
    info = ffprobe(mesh.local(job.video_key))
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == (320, 480)
    assert abs(float(info["format"]["duration"]) - inputs["long"]) <= 0.04, (info["format"]["duration"], inputs["long"])
    assert abs(job.duration_sec - inputs["long"]) <= 0.04
    # The audio was encoded to AAC while the chunks rendered and copied by the stitch: the
    # video's audio track is the whole recording, starting at 0 (the encoder's priming hidden).
    assert job.encoded_audio_key == f"jobs/{job.id}/audio.m4a"
    audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert audio["codec_name"] == "aac" and abs(float(audio["duration"]) - inputs["long"]) <= 0.04
    assert abs(float(audio.get("start_time", 0))) < 0.001
    # One submission per chunk, and every intermediate blob deleted; the final video stays.
    stats = submissions(mesh)
    assert sum(stats.values()) == len(job.chunks) and set(stats.values()) == {1}
    # The intermediates are deleted right after COMPLETED is stored (a reader may see the state
    # first): wait for them, bounded.
    assert intermediates_left(mesh, job.id, keep=[job.video_key]) == [job.video_key]
    _, metrics = mesh.dispatcher.http_get("/metrics")
    assert 'talkmesh_dispatcher_events_total{event="jobs_completed"} 1' in metrics
    assert f'talkmesh_dispatcher_events_total{{event="runpod_submissions"}} {len(job.chunks)}' in metrics
    assert f"talkmesh_dispatcher_runpod_execution_seconds_count {len(job.chunks)}" in metrics
    assert "talkmesh_dispatcher_job_duration_seconds_count 1" in metrics
    # Every poll is counted by what it found: each chunk was found COMPLETED exactly once, and
    # the polls counted are the /status requests the emulator saw.
    polls = {m.group(1): int(m.group(2)) for m in re.finditer(r'event="runpod_polls_(\w+)"\} (\d+)', metrics)}
    assert polls.get("completed") == len(job.chunks), polls
    status_requests = len(routes(mesh, "status"))
    assert sum(polls.values()) == status_requests, (polls, status_requests)


def test_watch_sees_every_change_in_order(mesh_factory):
    mesh = mesh_factory()
    job = mesh.create(options={"chunk_target_sec": 8})
    seen = list(mesh.stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=120))
    versions = [j.version for j in seen]
    assert versions == sorted(set(versions)) and seen[-1].status == pb.COMPLETED
    statuses = [j.status for j in seen]
    assert statuses[0] in (pb.IN_QUEUE, pb.RUNNING)
    assert pb.RUNNING in statuses and statuses.index(pb.RUNNING) < statuses.index(pb.COMPLETED)
    stages = [j.stage for j in seen if j.status == pb.RUNNING]
    assert stages == sorted(stages) and pb.STAGE_RENDERING in stages and pb.STAGE_STITCHING in stages
    progress = [j.progress for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # Watching a finished job sends it once and ends.
    again = list(mesh.stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=10))
    assert len(again) == 1 and again[0].status == pb.COMPLETED


def test_dry_run_plans_without_runpod(mesh_factory, inputs):
    mesh = mesh_factory()
    job = mesh.wait(mesh.create(options={"dry_run": True, "chunk_target_sec": 6}).id)
    assert job.status == pb.COMPLETED and not job.video_key
    assert len(job.chunks) >= 3 and all(c.status == pb.CHUNK_PENDING for c in job.chunks)
    assert abs(sum(c.duration_sec for c in job.chunks) - inputs["short"]) < 0.1
    assert submissions(mesh) == {}


def test_idempotency_key_returns_the_same_job(mesh_factory):
    mesh = mesh_factory()
    first = mesh.create(owner="alice", idempotency_key="k1", options={"dry_run": True})
    again = mesh.create(owner="alice", idempotency_key="k1", options={"dry_run": True})
    other = mesh.create(owner="bob", idempotency_key="k1", options={"dry_run": True})
    assert first.id == again.id and other.id != first.id


def test_list_jobs_pages_newest_first_and_filters(mesh_factory, inputs):
    mesh = mesh_factory()
    mesh.put("in/tiny.wav", f"{inputs['dir']}/tiny.wav")
    ids = [mesh.create(owner="carol", audio="in/tiny.wav", options={"dry_run": True}).id for _ in range(5)]
    for job_id in ids:
        mesh.wait(job_id)
    mesh.create(owner="dave", audio="in/tiny.wav", options={"dry_run": True})
    pages, token = [], ""
    while True:
        page = mesh.stub.ListJobs(pb.ListJobsRequest(owner="carol", page_size=2, page_token=token), timeout=10)
        pages.append([j.id for j in page.jobs])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    # Newest first; jobs created in the same millisecond are ordered by id (descending).
    created = {i: mesh.stub.GetJob(pb.GetJobRequest(id=i), timeout=10).created_at_unix_ms for i in ids}
    assert [i for p in pages for i in p] == sorted(ids, key=lambda i: (created[i], i), reverse=True)
    done = mesh.stub.ListJobs(pb.ListJobsRequest(owner="carol", status=pb.COMPLETED), timeout=10)
    assert len(done.jobs) == 5
    assert not mesh.stub.ListJobs(pb.ListJobsRequest(owner="carol", status=pb.FAILED), timeout=10).jobs
    with pytest.raises(grpc.RpcError) as info:
        mesh.stub.ListJobs(pb.ListJobsRequest(owner="carol", page_token="garbage"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("fields,code", [
    ({"width": 10}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"image": "in/missing.png"}, grpc.StatusCode.NOT_FOUND),
    ({"image": "../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"options": {"chunk_target_sec": 500}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"options": {"chunk_target_sec": 4}}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_invalid_jobs_are_refused(mesh_factory, fields, code):
    mesh = mesh_factory()
    with pytest.raises(grpc.RpcError) as info:
        mesh.create(**fields)
    assert info.value.code() == code


def test_unknown_job_is_not_found(mesh_factory):
    mesh = mesh_factory()
    for call in (lambda: mesh.stub.GetJob(pb.GetJobRequest(id="job_000000000000000000000000"), timeout=5),
                 lambda: mesh.stub.CancelJob(pb.CancelJobRequest(id="nonsense"), timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_kill_9_mid_job_resumes_without_paying_twice(mesh_factory):
    mesh = mesh_factory(emulator_args=["--speed", "0.5"])
    job = mesh.create(options={"chunk_target_sec": 6, "max_concurrent_chunks": 2})
    mesh.wait(job.id, until={pb.RUNNING}, timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        current = mesh.stub.GetJob(pb.GetJobRequest(id=job.id), timeout=5)
        if any(c.runpod_job_id for c in current.chunks) and any(c.status == pb.CHUNK_PENDING for c in current.chunks):
            break
        time.sleep(0.05)
    mesh.kill_dispatcher()
    mesh.start_dispatcher()
    done = mesh.wait(job.id, timeout=120)
    assert done.status == pb.COMPLETED, done.error
    stats = submissions(mesh)
    log = mesh.dispatcher.read_log()
    # Each chunk is paid for once, except one caught between its SUBMITTING commit and /run's answer
    # (the documented crash window: RunPod takes no idempotency key), which is sent again and logged.
    # At most the two in flight can be there; on a fast machine it is almost never hit.
    resubmitted = log.count("was being submitted when the Dispatcher stopped")
    assert resubmitted <= 2 and len(stats) == len(done.chunks), (resubmitted, stats)
    assert sorted(stats.values()) == [1] * (len(stats) - resubmitted) + [2] * resubmitted, (resubmitted, stats)
    assert "resuming job" in log


def test_faults_are_retried_to_completion(mesh_factory):
    mesh = mesh_factory(emulator_args=["--fail-rate", "0.2", "--missing-output-rate", "0.1", "--http-429-rate", "0.1",
                                       "--http-500-rate", "0.1", "--seed", "7"],
                        dispatcher_env={"CHUNK_MAX_ATTEMPTS": "8"})
    job = mesh.wait(mesh.create(options={"chunk_target_sec": 6}).id, timeout=180)
    assert job.status == pb.COMPLETED, job.error
    assert sum(c.attempts for c in job.chunks) > len(job.chunks)  # some chunk was retried
    assert routes(mesh, "retry") or sum(submissions(mesh).values()) > len(job.chunks)


def test_a_chunk_that_always_fails_fails_the_job_and_cancels_the_rest(mesh_factory):
    # One RunPod worker: while one chunk runs out of attempts the others wait in RunPod's queue,
    # so there is always something in flight to cancel.
    mesh = mesh_factory(emulator_args=["--fail-rate", "1", "--speed", "0.1", "--workers", "1"], dispatcher_env={"CHUNK_MAX_ATTEMPTS": "2"})
    job = mesh.wait(mesh.create(options={"chunk_target_sec": 5, "max_concurrent_chunks": 4}).id, timeout=120)
    assert job.status == pb.FAILED
    assert job.error.code == "RUNPOD_JOB_FAILED" and "failed 2 times" in job.error.message
    statuses = {c.status for c in job.chunks}
    assert pb.CHUNK_FAILED in statuses and statuses <= {pb.CHUNK_FAILED, pb.CHUNK_CANCELLED}
    assert routes(mesh, "cancel"), "the chunks still in flight were cancelled on RunPod"


def intermediates_left(mesh, job_id, keep=(), timeout=20):
    """What is left under the job's folder once its intermediates are gone (waited for, bounded:
    they are deleted right after the end is stored, which a reader may see first)."""
    deadline = time.time() + timeout
    while True:
        left = mesh.blob_keys(f"jobs/{job_id}/")
        if left == sorted(keep) or time.time() > deadline:
            return left
        time.sleep(0.1)


def test_cancel_mid_flight(mesh_factory):
    mesh = mesh_factory(emulator_args=["--speed", "1"])
    job = mesh.create(options={"chunk_target_sec": 6})
    deadline = time.time() + 60
    while not any(c.runpod_job_id for c in mesh.stub.GetJob(pb.GetJobRequest(id=job.id), timeout=5).chunks):
        assert time.time() < deadline
        time.sleep(0.05)
    cancelled = mesh.stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=30)
    assert cancelled.status == pb.CANCELLED and cancelled.error.code == "CANCELLED"
    assert all(c.status == pb.CHUNK_CANCELLED for c in cancelled.chunks)
    assert routes(mesh, "cancel")
    assert intermediates_left(mesh, job.id) == []  # the resized image, the chunks, any partial video
    with pytest.raises(grpc.RpcError) as info:
        mesh.stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_job_timeout_ends_timed_out(mesh_factory):
    # 10 s: time for the resize and split under a sanitizer too (at 4 s a TSan run timed the job
    # out before any chunk reached RunPod, so there was nothing to cancel); a chunk takes 12 s.
    mesh = mesh_factory(emulator_args=["--speed", "2"], dispatcher_env={"JOB_TIMEOUT": "10s"})
    job = mesh.wait(mesh.create(options={"chunk_target_sec": 6}).id, timeout=60)
    assert job.status == pb.TIMED_OUT and job.error.code == "JOB_TIMED_OUT"
    assert routes(mesh, "run"), "no chunk reached RunPod before the timeout"
    assert routes(mesh, "cancel")
    assert intermediates_left(mesh, job.id) == []


def test_media_restarted_mid_job_still_completes(mesh_factory):
    mesh = mesh_factory(emulator_args=["--speed", "0.3"])
    job = mesh.create(options={"chunk_target_sec": 6})
    mesh.wait(job.id, until={pb.RUNNING}, timeout=60)
    while mesh.stub.GetJob(pb.GetJobRequest(id=job.id), timeout=5).stage < pb.STAGE_RENDERING:
        time.sleep(0.05)
    port = mesh.media.port
    mesh.media.proc.send_signal(signal.SIGKILL)
    mesh.media.proc.wait()
    time.sleep(3)
    mesh.media = Service("talkmesh-media", env={**mesh.blob_env, "PORT": str(port)}, port=port)
    done = mesh.wait(job.id, timeout=120)
    assert done.status == pb.COMPLETED, done.error
