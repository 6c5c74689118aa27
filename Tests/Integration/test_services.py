"""The four service executables start on the runtime and serve health, /healthz, /readyz and
/metrics."""
import grpc
import pytest

from tmhealth import health_pb2, health_pb2_grpc

SERVICES = [
    ("talkmesh-gateway", None),
    ("talkmesh-media", None),  # implemented: see test_media.py
    ("talkmesh-audio", None),  # implemented: see test_audio.py
    ("talkmesh-dispatcher", None),  # implemented: see test_dispatcher.py
]


@pytest.mark.parametrize("exe,method", SERVICES)
def test_service_serves_health_and_http(start_service, exe, method):
    service = start_service(exe)
    assert service.http_get("/healthz") == (200, "ok\n")
    assert service.http_get("/readyz") == (200, "ready\n")
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        if method:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(method)(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status, metrics = service.http_get("/metrics")
    assert status == 200
    assert f'talkmesh_grpc_server_requests_total{{service="{exe}",grpc_method="/grpc.health.v1.Health/Check",grpc_code="0"}} 1' in metrics
    assert service.stop() == 0


def test_default_ports():
    import re
    import os
    from conftest import ROOT
    expected = {"Gateway": 8080, "Media": 50051, "Audio": 50052, "Dispatcher": 50053}
    for name, port in expected.items():
        candidates = [os.path.join(ROOT, "Services", name, f"{name}Command.swift"),
                      os.path.join(ROOT, "Services", name, "Main", f"{name}Command.swift")]
        path = next(p for p in candidates if os.path.exists(p))
        with open(path) as fh:
            assert re.search(rf"defaultPort: {port}\b", fh.read()), name
