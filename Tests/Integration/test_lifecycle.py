"""Graceful shutdown and connection ageing on the real process."""
import signal
import threading
import time

import grpc

from tmecho import echo_pb2, echo_pb2_grpc
from tmhealth import health_pb2, health_pb2_grpc
from test_http2_edges import Client, HOLD


def test_sigterm_lets_the_in_flight_call_finish_and_exits_zero(start_service):
    service = start_service()
    with grpc.insecure_channel(service.address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        future = stub.Hold.future(echo_pb2.HoldRequest(delay_ms=1500, tag="sigterm"), timeout=20)
        time.sleep(0.4)
        service.proc.send_signal(signal.SIGTERM)
        # The watch hears NOT_SERVING and ends; the in-flight call completes normally.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert future.result(timeout=10).text == "sigterm"
    assert service.proc.wait(15) == 0
    log = service.read_log()
    assert "draining" in log and "stopped" in log


def test_sigint_with_no_connections_exits_zero_promptly(start_service):
    service = start_service()
    started = time.time()
    service.proc.send_signal(signal.SIGINT)
    assert service.proc.wait(10) == 0
    assert time.time() - started < 5


def test_drain_timeout_bounds_the_shutdown(start_service):
    service = start_service(env={"DRAIN_TIMEOUT": "1s"})
    with grpc.insecure_channel(service.address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        future = stub.Hold.future(echo_pb2.HoldRequest(delay_ms=60000, tag="long"), timeout=30)
        time.sleep(0.3)
        started = time.time()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(10) == 0
        assert time.time() - started < 5
        assert future.exception(timeout=10) is not None


def test_max_connection_age_sends_goaway(start_service):
    service = start_service(env={"MAX_CONNECTION_AGE": "1s", "DRAIN_TIMEOUT": "5s"})
    client = Client(service)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=3000, tag="age"))
    client.flush()
    started = time.time()
    # A graceful GOAWAY (NO_ERROR) after ~1 s (±10 %); the h2 library stops reading after it.
    assert client.pump(lambda: client.terminated is not None, timeout=8)
    assert 0.8 < time.time() - started < 3
    assert client.terminated.error_code == 0
    client.close()


def test_calls_in_flight_survive_connection_ageing(start_service):
    service = start_service(env={"MAX_CONNECTION_AGE": "1s", "DRAIN_TIMEOUT": "5s"})
    with grpc.insecure_channel(service.address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        # Started before the connection's age passes, finishing after it: completes normally.
        assert stub.Hold(echo_pb2.HoldRequest(delay_ms=2000, tag="aged"), timeout=10).text == "aged"
        # Calls keep working over the replacement connections.
        for n in range(20):
            assert stub.Echo(echo_pb2.EchoRequest(text=str(n)), timeout=5).text == str(n)
            time.sleep(0.1)
    assert service.stop() == 0


def test_sigterm_sends_goaway_naming_the_open_stream(start_service):
    # On the wire: a graceful GOAWAY (NO_ERROR) soon after SIGTERM whose last stream id covers the
    # stream already open, so the client knows it will be finished (the grpcio test above sees it
    # finish; the h2 library reads nothing after a GOAWAY). The process then drains and exits 0.
    service = start_service(env={"DRAIN_TIMEOUT": "10s"})
    client = Client(service)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=1500, tag="goaway"))
    client.flush()
    time.sleep(0.3)
    started = time.time()
    service.proc.send_signal(signal.SIGTERM)
    assert client.pump(lambda: client.terminated is not None, timeout=5)
    assert time.time() - started < 2
    goaway = client.terminated
    assert goaway.error_code == 0 and goaway.last_stream_id >= sid, goaway
    client.close()
    assert service.proc.wait(15) == 0
