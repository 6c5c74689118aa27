"""Attacks on request bodies and idle connections: limits from the head or the first byte over, stalled bodies, per-connection buffer budgets, descriptor exhaustion, idle timeouts."""
import socket
import time
import pytest
from test_http2_edges import Client, grpc_frame, grpc_headers, HOLD
from tmecho import echo_pb2
from test_attacks import assert_serving, cpu_seconds, hold_stats, http1_exchange, rss_bytes, send_body


@pytest.mark.parametrize("exe", ["talkmesh-testserver", "talkmesh-media", "talkmesh-runpod-emulator"])
def test_http2_bodies_to_healthz_are_refused_at_their_first_byte(start_service, exe):
    service = start_service(exe)
    before = rss_bytes(service)
    client = Client(service)
    sids = []
    for _ in range(8):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/healthz"), (":authority", "x")])
        client.flush()
        send_body(client, sid, b"\0" * 60000)
        sids.append(sid)
    assert client.pump(lambda: all(s in client.ended for s in sids)), client.terminated
    for sid in sids:
        assert client.headers[sid][":status"] == "413", client.headers[sid]
    assert rss_bytes(service) - before < 16 << 20
    client.close()
    if exe != "talkmesh-runpod-emulator":
        assert_serving(service)


def test_http2_declared_length_over_the_route_limit_is_refused_before_any_data(start_service):
    service = start_service(env={"MAX_BODY_BYTES": str(1 << 20)})
    client = Client(service)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/echo"), (":authority", "x"),
                                   ("content-length", str(60 << 20))])
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.headers[sid][":status"] == "413"
    client.close()


@pytest.mark.parametrize("request_head,status", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n", b"413"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n", b"413"),
    (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n", b"404"),
    (b"DELETE /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n", b"405"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", b"413"),
])
def test_http1_bodies_are_refused_from_the_head(start_service, request_head, status):
    service = start_service(env={"MAX_BODY_BYTES": str(1 << 20)})
    before = rss_bytes(service)
    answer = http1_exchange(service, request_head)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert rss_bytes(service) - before < 8 << 20
    assert service.http_get("/healthz") == (200, "ok\n")


def test_http1_chunked_body_over_the_limit_is_refused_as_it_arrives(start_service):
    service = start_service(env={"MAX_BODY_BYTES": str(1 << 20)})
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n"
        sent = 0
        try:
            while sent < (4 << 20):
                sock.sendall(chunk)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_stalled_http1_body_times_out(start_service):
    service = start_service(env={"BODY_TIMEOUT": "1s"})
    started = time.time()
    answer = http1_exchange(service, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789", timeout=6)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.time() - started < 4


def test_stalled_http2_bodies_time_out(start_service):
    service = start_service(env={"BODY_TIMEOUT": "1s"})
    client = Client(service)
    grpc_sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(grpc_sid, grpc_headers(HOLD))
    client.conn.send_data(grpc_sid, grpc_frame(echo_pb2.HoldRequest(delay_ms=1, tag="stall"))[:4])
    rest_sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(rest_sid, [(":method", "POST"), (":scheme", "http"), (":path", "/echo"), (":authority", "x")])
    client.conn.send_data(rest_sid, b"partial")
    client.flush()
    started = time.time()
    assert client.pump(lambda: grpc_sid in client.ended and rest_sid in client.ended, timeout=6)
    assert time.time() - started < 4
    assert client.status(grpc_sid) == "4"  # DEADLINE_EXCEEDED
    assert client.headers[rest_sid][":status"] == "408"
    assert hold_stats(client, "stall").started == 0
    client.close()


def test_a_connection_over_its_buffer_budget_is_refused_per_stream(start_service):
    limit = 1 << 20
    service = start_service(env={"MAX_BODY_BYTES": str(limit), "MAX_RECEIVE_MESSAGE_BYTES": str(limit),
                                 "MAX_CONNECTION_BUFFER_BYTES": str(2 * limit)})
    client = Client(service)
    sids = []
    for _ in range(4):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/echo"), (":authority", "x")])
        client.flush()
        send_body(client, sid, b"x" * 700_000)  # never ended: held until the budget refuses
        sids.append(sid)
    assert client.pump(lambda: len(client.ended) >= 2, timeout=5)
    refused = [s for s in sids if client.headers.get(s, {}).get(":status") == "503"]
    assert len(refused) == 2, client.headers
    assert set(refused) == set(sids[2:])
    client.close()
    assert_serving(service)


# 5. Pipelined requests whose responses are never read stop being read.

@pytest.mark.memory_bound
def test_unread_pipelined_responses_do_not_grow_the_service(start_service):
    service = start_service()
    before = rss_bytes(service)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = socket.create_connection((service.host, service.port))
    sock.setblocking(False)
    sent, deadline = 0, time.time() + 3
    burst = request * 1000
    while sent < 60_000 and time.time() < deadline:
        try:
            sock.send(burst)
            sent += 1000
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(0.5)
    grown = rss_bytes(service) - before
    assert grown < 24 << 20, f"RSS grew by {grown >> 20} MiB"
    # The kernel's socket buffers absorb a few thousand responses; past them the server stops.
    _, metrics = service.http_get("/metrics")
    served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("talkmesh_http_server_requests_total") and 'route="/metrics"' in line)
    assert served < sent / 3, f"{served} of {sent} pipelined requests were answered while nothing was read"
    # Reading the responses lets the connection go on.
    sock.setblocking(True)
    sock.settimeout(5)
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()
    assert service.http_get("/healthz") == (200, "ok\n")


# 6. Out of descriptors, accepting backs off instead of spinning; idle connections are closed.

def test_descriptor_exhaustion_backs_off_and_recovers(start_service):
    service = start_service(nofile=64, env={"EVENT_LOOPS": "1", "WORKERS": "1"})
    conns = []
    for _ in range(80):
        try:
            conns.append(socket.create_connection((service.host, service.port), timeout=2))
        except OSError:
            break
    time.sleep(0.3)
    before = cpu_seconds(service)
    time.sleep(2)
    spent = cpu_seconds(service) - before
    assert spent < 0.3, f"the accept loop spun: {spent:.2f} s of CPU in 2 s"
    assert service.read_log().count("accept failed") <= 2
    for sock in conns:
        sock.close()
    deadline = time.time() + 5
    while True:
        try:
            assert service.http_get("/healthz", timeout=2) == (200, "ok\n")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert_serving(service)


def test_idle_http1_connection_is_closed(start_service):
    service = start_service(env={"IDLE_TIMEOUT": "1s"})
    with socket.create_connection((service.host, service.port), timeout=6) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.time()
        assert sock.recv(4096) == b""
        assert time.time() - started < 4


def test_idle_http2_connection_gets_goaway(start_service):
    import h2.events
    service = start_service(env={"IDLE_TIMEOUT": "1s"})
    client = Client(service)
    started = time.time()
    assert client.pump(lambda: client.terminated is not None, timeout=8)
    assert time.time() - started < 5
    assert isinstance(client.terminated, h2.events.ConnectionTerminated) or client.terminated == "closed"
    client.close()


def test_an_http2_connection_with_a_stream_in_flight_is_not_idle(start_service):
    service = start_service(env={"IDLE_TIMEOUT": "1s"})
    client = Client(service)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=2500, tag="busy"))
    client.flush()
    assert client.pump(lambda: sid in client.ended, timeout=8)
    assert client.status(sid) == "0"
    client.close()


# 7. Smaller findings.
