"""HTTP/1.1 on the same port as gRPC: curl for /healthz, /readyz and /metrics; raw sockets for
keep-alive, chunked bodies, pipelining, and the error paths (400, 413, 431)."""
import re
import socket
import subprocess

import pytest


def curl(*args):
    result = subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def raw_exchange(service, data, read_until_close=True, timeout=5):
    with socket.create_connection((service.host, service.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        except socket.timeout:
            pass
        return b"".join(chunks)


def test_healthz_readyz_over_http1(testserver):
    out = curl("-i", "--http1.1", f"http://{testserver.address}/healthz")
    assert out.startswith("HTTP/1.1 200")
    assert out.endswith("ok\n")
    assert curl("--http1.1", f"http://{testserver.address}/readyz") == "ready\n"


def test_metrics_prometheus_format_counts_requests(testserver):
    for _ in range(3):
        curl("--http1.1", f"http://{testserver.address}/healthz")
    text = curl("--http1.1", f"http://{testserver.address}/metrics")
    assert "# TYPE talkmesh_http_server_requests_total counter" in text
    assert "# TYPE talkmesh_http_server_request_duration_seconds histogram" in text
    match = re.search(r'talkmesh_http_server_requests_total\{service="talkmesh-testserver",route="/healthz",status="200"\} (\d+)', text)
    assert match and int(match.group(1)) >= 3
    assert re.search(r'talkmesh_http_server_request_duration_seconds_bucket\{[^}]*route="/healthz"[^}]*le="\+Inf"\} \d+', text)
    # Every sample line is `name{labels} value` or `name value`.
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # Label values are quoted strings and may hold braces (a route such as /items/{id}).
            match = re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)', line)
            assert match, line
            float(match.group(2).replace("Inf", "inf"))  # a Go-parsable float, e.g. 7.9e-05


def test_keep_alive_serves_several_requests_on_one_connection(testserver):
    request = f"GET /healthz HTTP/1.1\r\nHost: {testserver.address}\r\n\r\n".encode()
    closing = f"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    reply = raw_exchange(testserver, request + request + closing)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.endswith(b"ready\n")


def test_chunked_request_body(testserver):
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [b"hello ", b"chunked ", b"world"]) + b"0\r\n\r\n"
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
    reply = raw_exchange(testserver, request)
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\nhello chunked world")


def test_content_length_body_and_path_parameters(testserver):
    assert curl("--http1.1", "--data-binary", "abc", f"http://{testserver.address}/echo") == "abc"
    assert curl("--http1.1", f"http://{testserver.address}/items/42?x=1") == '{"id":"42","query":"x=1"}'


def test_unknown_route_404_and_wrong_method_405(testserver):
    assert curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{testserver.address}/nope") == "404"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", f"http://{testserver.address}/healthz") == "405"


def test_malformed_request_is_400_and_closes(testserver):
    reply = raw_exchange(testserver, b"GET /healthz HTTP/1.1\r\nHost x-no-colon\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in reply


def test_garbage_bytes_get_400_and_other_connections_keep_working(testserver):
    reply = raw_exchange(testserver, bytes(range(1, 200)))
    assert reply.startswith(b"HTTP/1.1 400") or reply == b""
    assert curl("--http1.1", f"http://{testserver.address}/healthz") == "ok\n"


def test_oversized_header_is_431(testserver):
    big = "x" * (20 * 1024)
    reply = raw_exchange(testserver, f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 431")


def test_body_over_the_limit_is_413_without_reading_it(start_service):
    service = start_service(env={"MAX_BODY_BYTES": "1000"})
    reply = raw_exchange(service, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n" + b"a" * 1000)
    assert reply.startswith(b"HTTP/1.1 413")
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"400\r\n" + b"b" * 1024 + b"\r\n") * 3
    assert raw_exchange(service, chunked).startswith(b"HTTP/1.1 413")
    assert service.stop() == 0


def test_slow_request_head_gets_408(testserver):
    import time
    with socket.create_connection((testserver.host, testserver.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        started = time.time()
        reply = s.recv(1000)
        assert reply.startswith(b"HTTP/1.1 408")
        assert time.time() - started < 4  # HANDSHAKE_TIMEOUT is 1s in this fixture


def test_expect_100_continue_large_upload(testserver, tmp_path):
    body = tmp_path / "big.bin"
    body.write_bytes(b"u" * (3 << 20))
    out = subprocess.run(["curl", "-sS", "-v", "--http1.1", "-o", str(tmp_path / "out.bin"),
                          "--data-binary", f"@{body}", f"http://{testserver.address}/echo"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.bin").read_bytes() == body.read_bytes()
    assert "< HTTP/1.1 100 Continue" in out.stderr  # curl announced Expect: 100-continue and got it
