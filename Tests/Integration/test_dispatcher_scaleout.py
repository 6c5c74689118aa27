"""Several Dispatchers on one PostgreSQL database (a real server the fixture starts): leases and
their takeover after a kill -9, epoch fencing of a paused replica, the deployment-wide in-flight
cap (read from the emulator: the most RunPod jobs it ever held at once), and WatchJob, GetJob,
ListJobs and CancelJob on a replica that does not drive the job."""
import re
import signal
import time

import grpc
import pytest

from conftest import Service
from test_dispatcher import Mesh, TERMINAL, inputs, routes  # noqa: F401  (inputs is a fixture)
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc

LEASE = "2s"


class Replicas:
    """A Mesh whose Dispatcher is replica 0, plus more replicas on the same database."""

    def __init__(self, mesh, count):
        self.mesh = mesh
        self.services = [mesh.dispatcher]
        self.channels = [mesh.channel]
        self.stubs = [mesh.stub]
        for _ in range(count - 1):
            self.add()

    def add(self):
        service = Service("talkmesh-dispatcher", env=self.mesh.dispatcher_env)
        channel = grpc.insecure_channel(service.address)
        self.services.append(service)
        self.channels.append(channel)
        self.stubs.append(dispatcher_pb2_grpc.DispatcherServiceStub(channel))

    def wait_all(self, ids, stub, timeout):
        deadline = time.time() + timeout
        pending = set(ids)
        done = {}
        while pending and time.time() < deadline:
            for job_id in list(pending):
                job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
                if job.status in TERMINAL:
                    done[job_id] = job
                    pending.discard(job_id)
            time.sleep(0.2)
        assert not pending, f"{len(pending)} jobs unfinished: " + "\n=====\n".join(s.read_log()[-3000:] for s in self.services)
        return done

    def stop(self):
        for channel, service in zip(self.channels[1:], self.services[1:]):
            channel.close()
            if service.proc.poll() is None:
                service.stop()


@pytest.fixture
def cluster(inputs, postgres):  # noqa: F811
    made = []

    def make(count=2, emulator_args=(), **env):
        _, url = postgres.new_database()
        mesh = Mesh(emulator_args=list(emulator_args),
                    dispatcher_env={"JOB_STORE": url, "LEASE_TTL": LEASE, **env})
        mesh.put("in/face.png", f"{inputs['dir']}/face.png")
        mesh.put("in/speech.wav", f"{inputs['dir']}/short.wav")
        replicas = Replicas(mesh, count)
        made.append(replicas)
        return replicas

    yield make
    for replicas in made:
        replicas.stop()
        replicas.mesh.stop()


def create(stub, width, **options):
    request = pb.CreateJobRequest(image_key="in/face.png", audio_key="in/speech.wav", width=width, height=320,
                                  prompt="a person talking", owner="acme", options=pb.JobOptions(**options))
    return stub.CreateJob(request, timeout=10).job


def stats(mesh):
    return mesh.emulator_json("/_emulator/stats")


def resubmitted_after_crash(service):
    return len(re.findall(r"chunk was being submitted when the Dispatcher stopped", service.read_log()))


def test_two_replicas_share_20_jobs_and_one_finishes_them_after_a_kill_9(cluster):
    cap = 6
    replicas = cluster(emulator_args=["--workers", "16", "--speed", "0.25"], MAX_RUNPOD_JOBS_IN_FLIGHT=str(cap))
    mesh, (a, b) = replicas.mesh, replicas.stubs
    # Distinct widths: every chunk of every job is a distinct input for the emulator's count.
    ids = [create(a if i % 2 == 0 else b, 256 + 16 * i, chunk_target_sec=6, max_concurrent_chunks=3).id for i in range(20)]
    # Both replicas are driving jobs before one dies.
    deadline = time.time() + 90
    while time.time() < deadline and stats(mesh)["total"] < 25:
        time.sleep(0.1)
    assert "chunk submitted" in replicas.services[0].read_log() and "chunk submitted" in replicas.services[1].read_log()
    replicas.services[0].proc.send_signal(signal.SIGKILL)
    replicas.services[0].proc.wait()

    done = replicas.wait_all(ids, b, timeout=240)
    assert {job.status for job in done.values()} == {pb.COMPLETED}, [j.error for j in done.values() if j.status != pb.COMPLETED]
    survivor = replicas.services[1].read_log()
    assert "resuming job" in survivor, "the survivor took over the dead replica's jobs"
    counts = stats(mesh)
    chunks = sum(len(job.chunks) for job in done.values())
    twice = [n for n in counts["submissions"].values() if n > 1]
    # The one ambiguity: a chunk whose /run was answered but not yet committed when the replica
    # died is submitted again, and the survivor says so. Anything else is a double payment.
    assert len(twice) <= resubmitted_after_crash(replicas.services[1]) and max(counts["submissions"].values()) <= 2
    assert len(counts["submissions"]) == chunks
    assert counts["peak_in_flight"] <= cap, counts
    assert counts["peak_in_flight"] == cap, "the cap was reached (the test would not show it otherwise)"


def test_a_paused_replica_is_fenced_out_when_its_lease_is_taken(cluster):
    replicas = cluster(emulator_args=["--workers", "8", "--speed", "0.3"])
    mesh, (a, b) = replicas.mesh, replicas.stubs
    job = create(a, 320, chunk_target_sec=5, max_concurrent_chunks=2)
    deadline = time.time() + 60
    while time.time() < deadline and stats(mesh)["total"] < 2:
        time.sleep(0.05)
    paused = replicas.services[0].proc
    paused.send_signal(signal.SIGSTOP)
    try:
        # Past the lease (2 s) and the survivor's next claim (every lease/3): B holds the job.
        deadline = time.time() + 20
        while time.time() < deadline and "resuming job" not in replicas.services[1].read_log():
            time.sleep(0.1)
        assert "resuming job" in replicas.services[1].read_log()
    finally:
        paused.send_signal(signal.SIGCONT)
    finished = replicas.wait_all([job.id], b, timeout=120)[job.id]
    assert finished.status == pb.COMPLETED, str(finished.error) + replicas.services[1].read_log()[-6000:]
    # A woke up holding a stale epoch: it stopped instead of writing over B.
    deadline = time.time() + 10
    while time.time() < deadline and not re.search(r"lease lost|handed over", replicas.services[0].read_log()):
        time.sleep(0.1)
    assert re.search(r"lease lost|handed over", replicas.services[0].read_log())
    assert paused.poll() is None, "the fenced replica keeps serving"
    counts = stats(mesh)["submissions"]
    assert sum(1 for n in counts.values() if n > 1) <= resubmitted_after_crash(replicas.services[1])


def test_any_replica_reads_watches_and_cancels_another_replicas_job(cluster):
    replicas = cluster(emulator_args=["--workers", "2", "--speed", "0.5"])
    mesh, (a, b) = replicas.mesh, replicas.stubs
    watched = create(a, 320, chunk_target_sec=8)
    # WatchJob on B follows what A writes (LISTEN/NOTIFY), every change in order.
    seen = list(b.WatchJob(pb.WatchJobRequest(id=watched.id), timeout=120))
    versions = [j.version for j in seen]
    assert versions == sorted(set(versions)) and seen[-1].status == pb.COMPLETED
    assert len(seen) >= 4 and pb.RUNNING in [j.status for j in seen]
    assert b.GetJob(pb.GetJobRequest(id=watched.id), timeout=5).status == pb.COMPLETED
    assert [j.id for j in b.ListJobs(pb.ListJobsRequest(owner="acme"), timeout=5).jobs] == [watched.id]

    # CancelJob on B of a job A drives: CANCELLED, and A cancels its RunPod jobs.
    job = create(a, 336, chunk_target_sec=5, max_concurrent_chunks=3)
    deadline = time.time() + 60
    while time.time() < deadline and not any(c.runpod_job_id for c in b.GetJob(pb.GetJobRequest(id=job.id), timeout=5).chunks):
        time.sleep(0.05)
    # The jobs-by-state gauge is the deployment's (from the store); jobs driven, the replica's.
    deadline = time.time() + 10
    while time.time() < deadline and 'talkmesh_dispatcher_jobs{status="RUNNING"} 1' not in replicas.services[1].http_get("/metrics")[1]:
        time.sleep(0.2)
    metrics_a, metrics_b = (service.http_get("/metrics")[1] for service in replicas.services)
    assert 'talkmesh_dispatcher_jobs{status="RUNNING"} 1' in metrics_b
    assert "talkmesh_dispatcher_jobs_driven 1" in metrics_a and "talkmesh_dispatcher_jobs_driven 0" in metrics_b
    cancelled = b.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
    assert cancelled.status == pb.CANCELLED
    deadline = time.time() + 20
    while time.time() < deadline and not routes(mesh, "cancel"):
        time.sleep(0.1)
    assert routes(mesh, "cancel"), "the chunks in flight were cancelled on RunPod"
    assert "job ended by another replica" in replicas.services[0].read_log()
    assert a.GetJob(pb.GetJobRequest(id=job.id), timeout=5).status == pb.CANCELLED


def test_sigterm_hands_jobs_over_at_once_not_after_the_lease(cluster):
    # A lease far longer than the test waits: only a release on SIGTERM lets B continue in time.
    replicas = cluster(emulator_args=["--workers", "8", "--speed", "0.5"], LEASE_TTL="120s")
    mesh, (a, b) = replicas.mesh, replicas.stubs
    job = create(a, 320, chunk_target_sec=5, max_concurrent_chunks=2)
    deadline = time.time() + 60
    while time.time() < deadline and stats(mesh)["total"] < 2:
        time.sleep(0.05)
    assert replicas.services[0].stop() == 0
    log_a = replicas.services[0].read_log()
    assert "jobs handed over" in log_a
    assert "resuming job" not in log_a, "A claimed the job back after releasing it"
    finished = replicas.wait_all([job.id], b, timeout=60)[job.id]
    assert finished.status == pb.COMPLETED, finished.error
    assert "resuming job" in replicas.services[1].read_log()
    # Nothing was cancelled on RunPod, nothing submitted twice: B polled what A had submitted.
    assert not routes(mesh, "cancel")
    assert set(stats(mesh)["submissions"].values()) == {1}
