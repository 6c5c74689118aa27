"""A real gRPC client (Python grpcio) against the runtime: health, unary, server streaming,
errors with messages, deadlines, metadata, limits, cancellation."""
import threading
import time

import grpc
import pytest

from tmecho import echo_pb2, echo_pb2_grpc
from tmhealth import health_pb2, health_pb2_grpc


@pytest.fixture(scope="module")
def channel(testserver):
    with grpc.insecure_channel(testserver.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def test_health_check_whole_server_and_services(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    named = stub.Check(health_pb2.HealthCheckRequest(service="talkmesh.testing.v1.EchoService"))
    assert named.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_sends_current_status_and_service_unknown(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()


def test_unary_echo_with_metadata_round_trip(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    payload = bytes(range(256)) * 40
    response = stub.Echo(echo_pb2.EchoRequest(payload=payload, text="héllo"),
                         metadata=(("x-request-id", "abc-123"), ("trace-bin", b"\x00\x01\xfe\xff")))
    assert response.payload == payload
    assert response.text == "héllo"
    assert "x-request-id=abc-123" in response.metadata
    # -bin metadata arrives decoded: the handler re-encodes it as standard base64.
    assert "trace-bin=AAH+/w==" in response.metadata


def test_server_streaming(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    responses = list(stub.Expand(echo_pb2.ExpandRequest(payload=b"x" * 1000, count=50)))
    assert [r.sequence for r in responses] == list(range(50))
    assert all(r.payload == b"x" * 1000 for r in responses)


def test_server_streaming_large_volume_with_slow_reader(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    stream = stub.Expand(echo_pb2.ExpandRequest(payload=b"y" * 65536, count=200))
    count = 0
    for response in stream:
        if count < 5:
            time.sleep(0.1)  # a slow reader at first: the server must wait, not fail or buffer all
        assert len(response.payload) == 65536
        count += 1
    assert count == 200


def test_error_status_and_percent_encoded_message(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Hold(echo_pb2.HoldRequest(delay_ms=0, fail_code=9, fail_message="bad % input — ünïcode\nline"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "bad % input — ünïcode\nline"


def wait_for_cancellation(stub, tag, timeout=5):
    """Polls the server's counters until the handler tagged `tag` saw its cancellation."""
    deadline = time.time() + timeout
    while True:
        stats = stub.Stats(echo_pb2.StatsRequest(tag=tag))
        if stats.cancelled >= 1 or time.time() > deadline:
            return stats
        time.sleep(0.05)


def test_deadline_exceeded_cancels_the_handler(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    started = time.time()
    with pytest.raises(grpc.RpcError) as info:
        stub.Hold(echo_pb2.HoldRequest(delay_ms=5000, tag="deadline"), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.time() - started < 3
    stats = wait_for_cancellation(stub, "deadline")
    assert stats.started == 1 and stats.cancelled == 1 and stats.completed == 0


def test_client_cancel_mid_call_cancels_the_handler(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    future = stub.Hold.future(echo_pb2.HoldRequest(delay_ms=10000, tag="cancel"))
    deadline = time.time() + 5
    while stub.Stats(echo_pb2.StatsRequest(tag="cancel")).started < 1 and time.time() < deadline:
        time.sleep(0.02)
    future.cancel()
    stats = wait_for_cancellation(stub, "cancel")
    assert stats.started == 1 and stats.cancelled == 1 and stats.completed == 0


def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/talkmesh.testing.v1.EchoService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as info:
        call(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "NoSuchMethod" in info.value.details()


def test_message_over_the_limit_is_resource_exhausted(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Echo(echo_pb2.EchoRequest(payload=b"z" * (5 << 20)))  # the server's limit is 4 MiB here
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection is still good afterwards.
    assert stub.Echo(echo_pb2.EchoRequest(text="after")).text == "after"


def test_message_just_under_the_limit_is_accepted(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    # The echo adds a few fields to the payload (server id, the call's traceparent): the margin
    # keeps the answer under grpcio's own 4 MiB receive limit too.
    payload = b"q" * ((4 << 20) - 256)
    assert len(stub.Echo(echo_pb2.EchoRequest(payload=payload)).payload) == len(payload)


def test_invalid_protobuf_is_internal(channel):
    call = channel.unary_unary("/talkmesh.testing.v1.EchoService/Echo")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INTERNAL


def test_concurrent_calls_from_threads(channel):
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    errors = []

    def worker(n):
        try:
            for i in range(50):
                text = f"{n}-{i}"
                assert stub.Echo(echo_pb2.EchoRequest(text=text)).text == text
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
