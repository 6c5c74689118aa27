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


def loop_connections(service):
    return {name: int(value) for name, value in service.metrics("talkmesh_event_loop_connections{").items()}


def test_connections_are_spread_evenly_over_the_loops(start_service):
    """The kernel spreads SO_REUSEPORT connections by a hash: twelve could land 6/3/2/1 on four
    loops. Each loop's listener hands a new connection to the loop with the fewest, so they
    land 3/3/3/3 (the scrape's own connection makes one loop 4), and a closed one frees its place."""
    import socket
    import time
    service = start_service(env={"EVENT_LOOPS": "4"})
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    held = []
    try:
        for _ in range(12):
            connection = socket.create_connection((service.host, service.port), timeout=5)
            connection.sendall(preface)
            assert connection.recv(9)[3] == 4  # the server's SETTINGS: the connection is up
            held.append(connection)
        counts = loop_connections(service)
        assert len(counts) == 4 and sum(counts.values()) == 13, counts
        assert sorted(counts.values()) == [3, 3, 3, 4], counts
        for connection in held[:6]:
            connection.close()
        deadline = time.time() + 5
        while sum(loop_connections(service).values()) != 7 and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(6):
            connection = socket.create_connection((service.host, service.port), timeout=5)
            connection.sendall(preface)
            assert connection.recv(9)[3] == 4
            held.append(connection)
        counts = loop_connections(service)
        assert sum(counts.values()) == 13 and max(counts.values()) - min(counts.values()) <= 1, counts
    finally:
        for connection in held:
            connection.close()
