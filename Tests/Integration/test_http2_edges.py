"""HTTP/2 edge cases over raw sockets with the h2 library, where the test controls every frame."""
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import pytest

from tmecho import echo_pb2

ECHO = "/talkmesh.testing.v1.EchoService/Echo"
HOLD = "/talkmesh.testing.v1.EchoService/Hold"
STATS = "/talkmesh.testing.v1.EchoService/Stats"


def grpc_frame(message):
    data = message.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


def grpc_headers(path, extra=()):
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra]


class Client:
    """A minimal HTTP/2 client over one socket; collects events per stream."""

    def __init__(self, service, window=None):
        self.sock = socket.create_connection((service.host, service.port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if window:
            self.conn.increment_flow_control_window(window)
        self.flush()
        self.headers, self.data, self.trailers, self.ended, self.resets = {}, {}, {}, set(), {}
        self.terminated = None

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, until, timeout=10):
        deadline = time.time() + timeout
        while not until() and time.time() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.time()))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                break
            if not chunk:
                self.terminated = self.terminated or "closed"
                break
            for event in self.conn.receive_data(chunk):
                self.on(event)
            self.flush()
        return until()

    def on(self, event):
        if isinstance(event, h2.events.ResponseReceived):
            self.headers[event.stream_id] = dict(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers[event.stream_id] = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.resets[event.stream_id] = event.error_code
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def start_call(self, path, message, extra=()):
        """Opens a stream with a whole gRPC request (headers, one message, end of stream), not yet sent."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, grpc_headers(path, extra))
        self.conn.send_data(sid, grpc_frame(message), end_stream=True)
        return sid

    def status(self, sid):
        """grpc-status from trailers, or from a Trailers-Only response's headers."""
        return (self.trailers.get(sid) or self.headers.get(sid) or {}).get("grpc-status")

    def close(self):
        self.sock.close()


def test_message_split_across_many_data_frames(testserver):
    client = Client(testserver)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers(ECHO))
    body = grpc_frame(echo_pb2.EchoRequest(payload=b"p" * 50000, text="split"))
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # ~7000 DATA frames, the prefix split too
    for index, piece in enumerate(pieces):
        client.conn.send_data(sid, piece, end_stream=index == len(pieces) - 1)
        if index % 500 == 0:
            client.flush()
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.status(sid) == "0"
    data = client.data[sid]
    (length,) = struct.unpack(">I", data[1:5])
    response = echo_pb2.EchoResponse.FromString(data[5:5 + length])
    assert response.text == "split" and len(response.payload) == 50000
    client.close()


def test_wrong_content_type_is_415(testserver):
    client = Client(testserver)
    sid = client.conn.get_next_available_stream_id()
    headers = [(k, v) if k != "content-type" else (k, "application/json") for k, v in grpc_headers(ECHO)]
    client.conn.send_headers(sid, headers, end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.headers[sid][":status"] == "415"
    client.close()


def test_unknown_method_trailers_only_unimplemented(testserver):
    client = Client(testserver)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers("/talkmesh.testing.v1.EchoService/Nope"))
    client.flush()
    # Answered at once (Trailers-Only), before the request body even arrives.
    assert client.pump(lambda: sid in client.ended)
    headers = client.headers[sid]
    assert headers[":status"] == "200" and headers["grpc-status"] == "12"
    assert sid not in client.data
    client.close()


def test_deadline_from_grpc_timeout(testserver):
    client = Client(testserver)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=10000, tag="h2-deadline"), [("grpc-timeout", "200m")])
    client.flush()
    started = time.time()
    assert client.pump(lambda: sid in client.ended)
    assert 0.15 < time.time() - started < 3
    assert client.status(sid) == "4"
    client.close()


def test_rst_stream_cancels_the_handler(testserver):
    client = Client(testserver)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=20000, tag="h2-rst"))
    client.flush()
    time.sleep(0.3)
    client.conn.reset_stream(sid, error_code=8)  # CANCEL
    client.flush()

    def stats():
        s = client.conn.get_next_available_stream_id()
        client.conn.send_headers(s, grpc_headers(STATS))
        client.conn.send_data(s, grpc_frame(echo_pb2.StatsRequest(tag="h2-rst")), end_stream=True)
        client.flush()
        assert client.pump(lambda: s in client.ended)
        return echo_pb2.StatsResponse.FromString(client.data[s][5:])

    deadline = time.time() + 5
    result = stats()
    while result.cancelled != 1 and time.time() < deadline:
        time.sleep(0.05)
        result = stats()
    assert result.started == 1 and result.cancelled == 1 and result.completed == 0
    client.close()


def test_thousand_concurrent_streams_on_one_connection(testserver):
    client = Client(testserver, window=1 << 24)
    ids = []
    for n in range(1000):
        sid = client.conn.get_next_available_stream_id()
        ids.append(sid)
        client.conn.send_headers(sid, grpc_headers(HOLD))
        client.conn.send_data(sid, grpc_frame(echo_pb2.HoldRequest(delay_ms=200, tag=f"c{n % 10}")), end_stream=True)
    client.flush()
    assert client.pump(lambda: all(s in client.ended for s in ids), timeout=30)
    assert all(client.status(s) == "0" for s in ids)
    client.close()


def test_garbage_after_preface_closes_only_that_connection(testserver):
    bad = Client(testserver)
    bad.sock.sendall(b"\x00\x00\x04\xff\x00\x00\x00\x00\x00garbage-that-is-not-a-frame" * 10)
    bad.pump(lambda: bad.terminated is not None, timeout=5)
    assert bad.terminated is not None
    good = Client(testserver)
    sid = good.start_call(ECHO, echo_pb2.EchoRequest(text="still fine"))
    good.flush()
    assert good.pump(lambda: sid in good.ended)
    assert good.status(sid) == "0"
    good.close()
    bad.close()


def test_half_sent_preface_is_closed_after_the_handshake_timeout(testserver):
    with socket.create_connection((testserver.host, testserver.port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n")
        started = time.time()
        assert s.recv(100) == b""  # closed by the server (HANDSHAKE_TIMEOUT=1s in this fixture)
        assert time.time() - started < 4
    client = Client(testserver)
    sid = client.start_call(ECHO, echo_pb2.EchoRequest(text="ok"))
    client.flush()
    assert client.pump(lambda: sid in client.ended) and client.status(sid) == "0"
    client.close()


def test_rest_routes_over_http2(testserver):
    client = Client(testserver)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/echo"), (":authority", "t")])
    client.conn.send_data(sid, b"over h2", end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.headers[sid][":status"] == "200" and client.data[sid] == b"over h2"
    client.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.memory_bound
def test_a_reader_that_stops_reading_does_not_make_the_server_buffer(testserver):
    # 4 streams each asking for 120 × 64 KiB (30 MiB in all); the client reads nothing for a while.
    client = Client(testserver)
    client.pump(lambda: client.conn.outbound_flow_control_window > 65535, timeout=2)  # the server's SETTINGS/WINDOW_UPDATE
    before = rss_kib(testserver.proc.pid)
    ids = []
    for _ in range(4):
        sid = client.conn.get_next_available_stream_id()
        ids.append(sid)
        client.conn.send_headers(sid, grpc_headers("/talkmesh.testing.v1.EchoService/Expand"))
        body = grpc_frame(echo_pb2.ExpandRequest(payload=b"r" * 65536, count=120))
        for offset in range(0, len(body), 16384):
            client.conn.send_data(sid, body[offset:offset + 16384], end_stream=offset + 16384 >= len(body))
    client.flush()
    time.sleep(1.5)  # the handlers run into the stream bounds and wait
    grown = rss_kib(testserver.proc.pid) - before
    # What the README states: a writer waits past 256 KiB unsent per stream (plus the message in hand),
    # the socket side stops at 128 KiB: about 1.5 MiB for these four streams, 6 MiB with the allocator's slack.
    assert grown < 6 * 1024, f"server RSS grew by {grown} KiB while the client was not reading"
    # Now read everything: all of it arrives, intact.
    assert client.pump(lambda: all(s in client.ended for s in ids), timeout=60)
    for sid in ids:
        assert client.status(sid) == "0"
        data, offset, sequences = client.data[sid], 0, []
        while offset < len(data):
            (length,) = struct.unpack(">I", data[offset + 1:offset + 5])
            response = echo_pb2.EchoResponse.FromString(data[offset + 5:offset + 5 + length])
            assert response.payload == b"r" * 65536
            sequences.append(response.sequence)
            offset += 5 + length
        assert sequences == list(range(120))
    client.close()


def test_a_header_block_over_max_header_bytes_resets_only_its_stream(start_service):
    service = start_service(env={"MAX_HEADER_BYTES": "2048"})
    client = Client(service)
    big = client.conn.get_next_available_stream_id()
    client.conn.send_headers(big, grpc_headers(ECHO, [("x-padding", "p" * 4096)]))
    client.conn.send_data(big, grpc_frame(echo_pb2.EchoRequest(text="big")), end_stream=True)
    small = client.conn.get_next_available_stream_id()
    client.conn.send_headers(small, grpc_headers(ECHO))
    client.conn.send_data(small, grpc_frame(echo_pb2.EchoRequest(text="small")), end_stream=True)
    client.flush()
    assert client.pump(lambda: {big, small} <= client.ended), (client.resets, client.terminated)
    assert big in client.resets and big not in client.headers
    assert client.status(small) == "0" and client.terminated is None


def test_streams_past_max_concurrent_streams_are_refused_and_the_rest_served(start_service):
    """Streams opened before the client heard SETTINGS (as a client that does not wait may): those
    past MAX_CONCURRENT_STREAMS get RST_STREAM(REFUSED_STREAM), which tells it they never ran."""
    service = start_service(env={"MAX_CONCURRENT_STREAMS": "2"})
    client = Client(service)  # nothing read yet: h2 still allows any number of streams
    sids = []
    for index in range(5):
        sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=500, tag=str(index)))
        sids.append(sid)
    client.flush()
    assert client.pump(lambda: set(sids) <= client.ended), (client.resets, client.terminated)
    refused = [sid for sid in sids if client.resets.get(sid) == 7]  # REFUSED_STREAM
    served = [sid for sid in sids if client.status(sid) == "0"]
    assert len(served) == 2 and len(refused) == 3, (client.resets, {sid: client.status(sid) for sid in sids})
