"""h2load, nghttp2's own load generator, against the runtime: bounded in count and time, and
asserting correctness (no failures), never speed."""
import os
import re
import subprocess
import tempfile


def h2load(service, path, requests, clients, streams, body=b"\x00\x00\x00\x00\x00"):
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as fh:
        fh.write(body)
    result = subprocess.run(
        ["h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams), "-t", "1",
         "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", fh.name,
         f"http://{service.address}{path}"],
        capture_output=True, text=True, timeout=120)
    os.unlink(fh.name)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_ten_thousand_health_checks_without_a_failure(testserver):
    out = h2load(testserver, "/grpc.health.v1.Health/Check", 10000, 8, 32)
    match = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    assert match, out
    total, started, done, succeeded, failed, errored, timeout = map(int, match.groups())
    assert (total, done, succeeded, failed, errored, timeout) == (10000, 10000, 10000, 0, 0, 0)
    assert "10000 2xx" in out
    status, metrics = testserver.http_get("/metrics")
    count = re.search(r'talkmesh_grpc_server_requests_total\{[^}]*grpc_method="/grpc.health.v1.Health/Check",grpc_code="0"\} (\d+)', metrics)
    assert count and int(count.group(1)) >= 10000


def test_echo_under_load_with_payloads(testserver):
    from tmecho import echo_pb2
    message = echo_pb2.EchoRequest(payload=b"e" * 4000).SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    out = h2load(testserver, "/talkmesh.testing.v1.EchoService/Echo", 5000, 4, 16, body)
    assert "5000 succeeded, 0 failed, 0 errored, 0 timeout" in out
