"""talkmesh.v1.DispatcherService through the Gateway, from grpcio: the key from `authorization`
metadata, the owner forced to the key's id, only the key's own jobs and uploads."""
import json

import grpc
import pytest

from test_gateway import multipart, world  # noqa: F401  (world is a fixture)
from test_dispatcher import TERMINAL, inputs  # noqa: F401
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc


@pytest.fixture()
def stub(world):  # noqa: F811
    channel = grpc.insecure_channel(world["gateway"].service.address)
    yield dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    channel.close()


def bearer(key):
    return [("authorization", f"Bearer {key}")]


def rest_job(world, key, **fields):
    status, _, created = world["gateway"].json("POST", "/v1/jobs", key=key, form=multipart(world["files"], **fields))
    assert status == 202, created
    return created["id"]


def test_calls_without_a_valid_key_are_unauthenticated_but_health_answers(world, stub):
    for metadata in [None, bearer("tmk_wrong"), [("authorization", "Basic abc")]]:
        with pytest.raises(grpc.RpcError) as failure:
            stub.ListJobs(pb.ListJobsRequest(), metadata=metadata, timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED and "UNAUTHORIZED" in failure.value.details()
    from tmhealth import health_pb2, health_pb2_grpc
    channel = grpc.insecure_channel(world["gateway"].service.address)
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_a_key_sees_and_changes_only_its_own_jobs(world, stub):
    key, other = world["key"], world["other"]
    mine = rest_job(world, key, dry_run="true")
    theirs = rest_job(world, other, dry_run="true")
    job = stub.GetJob(pb.GetJobRequest(id=mine), metadata=[("x-api-key", key)], timeout=10)
    assert job.id == mine and job.image_key.startswith(f"uploads/{job.owner}/")
    for call, request in [(stub.GetJob, pb.GetJobRequest(id=theirs)), (stub.CancelJob, pb.CancelJobRequest(id=theirs))]:
        with pytest.raises(grpc.RpcError) as failure:
            call(request, metadata=bearer(key), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as failure:
        list(stub.WatchJob(pb.WatchJobRequest(id=theirs), metadata=bearer(key), timeout=10))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    # The owner in a ListJobs request is ignored: the key's own jobs come back.
    page = stub.ListJobs(pb.ListJobsRequest(owner="anyone", page_size=100), metadata=bearer(key), timeout=10)
    assert page.jobs and {j.owner for j in page.jobs} == {job.owner} and theirs not in {j.id for j in page.jobs}


def test_create_job_over_grpc_reuses_the_keys_own_uploads_and_forces_the_owner(world, stub):
    key, other = world["key"], world["other"]
    first = stub.GetJob(pb.GetJobRequest(id=rest_job(world, key, dry_run="true")), metadata=bearer(key), timeout=10)
    foreign = stub.GetJob(pb.GetJobRequest(id=rest_job(world, other, dry_run="true")), metadata=bearer(other), timeout=10)
    # Another key's uploads, a path outside the uploads, a missing file: refused.
    for image in [foreign.image_key, "jobs/x/image.png", f"uploads/{first.owner}/missing/image.png"]:
        with pytest.raises(grpc.RpcError) as failure:
            stub.CreateJob(pb.CreateJobRequest(image_key=image, audio_key=first.audio_key, width=256, height=256),
                           metadata=bearer(key), timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, image
    created = stub.CreateJob(pb.CreateJobRequest(image_key=first.image_key, audio_key=first.audio_key, width=256, height=384,
                                                 owner="someone-else"), metadata=bearer(key) + [("x-request-id", "grpc-create-1")],
                             timeout=30).job
    assert created.owner == first.owner and created.status == pb.IN_QUEUE
    # The caller's request id reached the Dispatcher with the call (the Gateway's client interceptor) and is in its log.
    created_lines = [json.loads(line) for line in world["mesh"].dispatcher.read_log().splitlines()
                     if '"job created"' in line and created.id in line]
    assert len(created_lines) == 1 and created_lines[0]["request_id"] == "grpc-create-1", created_lines
    # Watched to the end through the Gateway: a real video at the new size.
    last = None
    for update in stub.WatchJob(pb.WatchJobRequest(id=created.id), metadata=bearer(key), timeout=120):
        last = update
    assert last is not None and last.status in TERMINAL and last.status == pb.COMPLETED, last
    assert (last.width, last.height) == (256, 384) and last.video_key


def test_reflection_through_the_gateway_needs_a_key_and_lists_the_dispatcher(world):
    from grpc_reflection.v1alpha import reflection_pb2 as r
    channel = grpc.insecure_channel(world["gateway"].service.address)
    info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=r.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=r.ServerReflectionResponse.FromString)
    ask = [r.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as refused:
        list(info(iter(ask), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = list(info(iter(ask), metadata=bearer(world["key"]), timeout=10))
    assert "talkmesh.v1.DispatcherService" in {s.name for s in listed[0].list_services_response.service}
    channel.close()
