"""The attack suite: each finding of the hardening review, replayed against the real executables.
Every test asserts that the service is still up afterwards, and what it answered."""
import os
import socket
import struct
import time

import grpc
import pytest

from test_http2_edges import Client, grpc_headers, ECHO, HOLD, STATS
from tmecho import echo_pb2
from tmhealth import health_pb2, health_pb2_grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GRPC_SERVICES = ["talkmesh-testserver", "talkmesh-media", "talkmesh-audio", "talkmesh-dispatcher", "talkmesh-gateway"]


def assert_serving(service):
    """The process is alive and answers a health check on a new connection."""
    assert service.proc.poll() is None, f"{service.exe} died: {service.read_log()[-3000:]}"
    with grpc.insecure_channel(service.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def status_bytes(service, field):
    """A size from /proc/<pid>/status (`VmRSS`, `VmSize`), in bytes."""
    with open(f"/proc/{service.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def rss_bytes(service):
    return status_bytes(service, "VmRSS")


def send_body(client, sid, data, end_stream=False, timeout=10):
    """Sends `data` on a stream in frames that respect the peer's frame size and flow control."""
    deadline = time.time() + timeout
    client.pump(lambda: False, timeout=0.05)  # take the server's SETTINGS and window updates
    offset = 0
    while offset < len(data):
        window = min(client.conn.local_flow_control_window(sid), client.conn.max_outbound_frame_size)
        if window <= 0:
            assert time.time() < deadline, "flow control never opened"
            if sid in client.ended or not client.pump(lambda: client.conn.local_flow_control_window(sid) > 0, timeout=1):
                if sid in client.ended:
                    return offset
            continue
        piece = data[offset:offset + window]
        client.conn.send_data(sid, piece)
        offset += len(piece)
        client.flush()
    if end_stream:
        client.conn.end_stream(sid)
        client.flush()
    return offset


def hold_stats(client, tag):
    sid = client.start_call(STATS, echo_pb2.StatsRequest(tag=tag))
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    return echo_pb2.StatsResponse.FromString(client.data[sid][5:])


# 1. The largest grpc-timeout values the spec allows overflowed the deadline arithmetic (SIGILL).

@pytest.mark.parametrize("exe", GRPC_SERVICES)
@pytest.mark.parametrize("timeout", ["99999999H", "2562048H", "2562047H", "99999999M", "99999999S", "99999999n"])
def test_largest_grpc_timeouts_do_not_kill_the_service(start_service, exe, timeout):
    service = start_service(exe)
    client = Client(service)
    sid = client.start_call(HEALTH_CHECK, health_pb2.HealthCheckRequest(), [("grpc-timeout", timeout)])
    client.flush()
    assert client.pump(lambda: sid in client.ended), client.terminated
    # 99999999n is 100 ms: long enough for a health check.
    assert client.status(sid) == "0"
    client.close()
    assert_serving(service)


def test_a_huge_grpc_timeout_still_lets_the_handler_run_and_be_cancelled(testserver):
    client = Client(testserver)
    sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=30, tag="huge-timeout"), [("grpc-timeout", "99999999H")])
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.status(sid) == "0"
    assert hold_stats(client, "huge-timeout").completed == 1
    client.close()


# 2. HEADERS, DATA and RST_STREAM in one read: the handler must never start.

def test_streams_reset_in_the_same_read_never_start_their_handler(testserver):
    client = Client(testserver)
    count = 300
    for _ in range(count):
        sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=60000, tag="same-read-rst"))
        client.conn.reset_stream(sid, error_code=8)
    client.flush()  # one write: the server reads HEADERS, DATA and RST_STREAM together
    time.sleep(0.5)
    stats = hold_stats(client, "same-read-rst")
    assert stats.started == 0, stats
    client.close()
    assert_serving(testserver)


def test_a_closed_connection_cancels_every_handler_it_started(testserver):
    client = Client(testserver)
    count = 50
    for _ in range(count):
        sid = client.start_call(HOLD, echo_pb2.HoldRequest(delay_ms=60000, tag="conn-close"))
    client.flush()
    observer = Client(testserver)
    deadline = time.time() + 5
    while hold_stats(observer, "conn-close").started < count and time.time() < deadline:
        time.sleep(0.05)
    client.sock.close()
    deadline = time.time() + 5
    stats = hold_stats(observer, "conn-close")
    while stats.cancelled < count and time.time() < deadline:
        time.sleep(0.05)
        stats = hold_stats(observer, "conn-close")
    assert stats.started == count and stats.cancelled == count and stats.completed == 0, stats
    observer.close()


def test_reset_resize_calls_burn_no_cpu(start_service, tmp_path):
    """20 ResizeImage calls on a large image, each reset in the same read: no decoding starts, so
    the process's CPU time barely moves and an ordinary call right after is fast."""
    from tmmedia import media_pb2
    service = start_service("talkmesh-media")
    blobs = service_blob_dir(service)
    make_png(os.path.join(blobs, "big.png"), 3840, 2160)
    before = cpu_seconds(service)
    client = Client(service)
    request = media_pb2.ResizeImageRequest(image_key="big.png", output_key="out.png", width=512, height=512)
    for _ in range(20):
        sid = client.start_call("/talkmesh.v1.MediaService/ResizeImage", request)
        client.conn.reset_stream(sid, error_code=8)
    client.flush()
    time.sleep(1.0)
    spent = cpu_seconds(service) - before
    assert spent < 0.5, f"reset calls used {spent:.2f} s of CPU"
    assert not os.path.exists(os.path.join(blobs, "out.png"))
    client.close()
    assert_serving(service)


def service_blob_dir(service):
    with open(f"/proc/{service.proc.pid}/environ", "rb") as fh:
        env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    return env[b"BLOB_STORE"].decode()[len("file://"):]


def cpu_seconds(service):
    with open(f"/proc/{service.proc.pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_png(path, width, height):
    import subprocess
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}", "-frames:v", "1", path],
                   check=True)


# Numbers from JSON bodies are range-checked before any conversion (Int32(1e12) trapped the emulator).

@pytest.mark.parametrize("field,value", [("width", 10**12), ("height", -(10**15)), ("width", 2**63 - 1)])
def test_emulator_refuses_out_of_range_dimensions(start_service, field, value):
    import json
    import urllib.error
    import urllib.request
    service = start_service("talkmesh-runpod-emulator")
    payload = {"input": {"image_base64": "aGk=", "wav_base64": "aGk=", field: value}}
    request = urllib.request.Request(f"http://{service.address}/v2/test/run", data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert "64–4096" in info.value.read().decode()
    assert service.proc.poll() is None


@pytest.mark.parametrize("policy", [{"executionTimeout": 2**63 - 1}, {"ttl": -5}, {"executionTimeout": 0}, {"ttl": 10**30}])
def test_emulator_refuses_out_of_range_policies(start_service, policy):
    import json
    import urllib.error
    import urllib.request
    service = start_service("talkmesh-runpod-emulator")
    payload = {"input": {"image_base64": "aGk=", "wav_base64": "aGk="}, "policy": policy}
    request = urllib.request.Request(f"http://{service.address}/v2/test/run", data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert service.proc.poll() is None


# 3. The pixel limit is checked on the header, before any decoder allocates what it claims.

def tiny_png(width, height, bit_depth=16, color_type=6):
    import zlib
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(16000, 16000), (2**31 - 1, 2**31 - 1), (60000, 1000)])
def test_a_tiny_png_claiming_a_huge_size_is_refused_before_decoding(start_service, width, height):
    from tmmedia import media_pb2, media_pb2_grpc
    service = start_service("talkmesh-media")
    blobs = service_blob_dir(service)
    data = tiny_png(width, height)
    assert len(data) < 80
    with open(os.path.join(blobs, "tiny.png"), "wb") as fh:
        fh.write(data)
    before = rss_bytes(service)
    with grpc.insecure_channel(service.address) as channel:
        stub = media_pb2_grpc.MediaServiceStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as info:
                stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="tiny.png", width=512, height=512), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("IMAGE_TOO_LARGE:"), info.value.details()
    grown = rss_bytes(service) - before
    assert grown < 32 << 20, f"RSS grew by {grown >> 20} MiB"
    assert_serving(service)


def http1_exchange(service, raw, timeout=5):
    """Sends raw bytes, returns everything the server answers until it closes or goes quiet."""
    with socket.create_connection((service.host, service.port), timeout=timeout) as sock:
        sock.sendall(raw)
        out = b""
        sock.settimeout(timeout)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


# 4. Bodies are routed on the head: no body is buffered for a route that takes none, each
#    route has its limit, a connection has a budget, and a stalled body times out.

@pytest.mark.memory_bound
def test_a_declared_large_message_reserves_memory_as_it_arrives(testserver):
    """A 5-byte prefix announcing 3 MiB (under the test server's 4 MiB limit) reserves nothing up
    front: 400 streams that send only the prefix and three bytes leave the address space within
    256 MiB (1.2 GiB if each reserved its announced length)."""
    client = Client(testserver)
    client.pump(lambda: False, timeout=0.05)
    before = status_bytes(testserver, "VmSize")
    for _ in range(400):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, grpc_headers(ECHO))
        client.conn.send_data(sid, b"\x00" + struct.pack(">I", 3 << 20) + b"abc")
    client.flush()
    client.pump(lambda: False, timeout=0.5)
    assert not client.headers and not client.resets  # every call is waiting for the rest of its message
    grown = status_bytes(testserver, "VmSize") - before
    assert grown < 256 << 20, f"address space grew by {grown >> 20} MiB"
    client.close()
    assert_serving(testserver)


def wav_with_rate(rate, channels=1, bits=16, frames=16000):
    data = b"\0" * (frames * channels * bits // 8)
    fmt = struct.pack("<HHIIHH", 1, channels, rate & 0xFFFFFFFF, (rate * channels * bits // 8) & 0xFFFFFFFF, channels * bits // 8, bits)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data


@pytest.mark.parametrize("rate", [0xFFFFFFFF, 0x7FFFFFFF, 3_000_000, 0])
def test_an_absurd_wav_sample_rate_gets_a_real_message(start_service, rate):
    from tmaudio import audio_pb2, audio_pb2_grpc
    service = start_service("talkmesh-audio")
    blobs = service_blob_dir(service)
    with open(os.path.join(blobs, "absurd.wav"), "wb") as fh:
        fh.write(wav_with_rate(rate))
    with grpc.insecure_channel(service.address) as channel:
        stub = audio_pb2_grpc.AudioServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="absurd.wav"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("INVALID_AUDIO:"), info.value.details()
    assert "Success" not in info.value.details()
    if rate == 3_000_000:  # libav itself refuses the others while opening
        assert "sample rate" in info.value.details()
    assert_serving(service)


def test_grpc_encoding_gzip_is_unimplemented(testserver):
    client = Client(testserver)
    sid = client.start_call("/talkmesh.testing.v1.EchoService/Echo", echo_pb2.EchoRequest(text="hi"), [("grpc-encoding", "gzip")])
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    assert client.status(sid) == "12"
    assert (client.trailers.get(sid) or client.headers.get(sid))["grpc-accept-encoding"] == "identity"
    client.close()


@pytest.mark.parametrize("key,code", [("out/" + "a" * 300 + ".png", "INVALID_KEY"), ("out/x\0.png", "INVALID_ARGUMENT")])
def test_bad_output_keys_are_refused_with_a_stable_code(start_service, key, code):
    from tmmedia import media_pb2, media_pb2_grpc
    service = start_service("talkmesh-media")
    blobs = service_blob_dir(service)
    make_png(os.path.join(blobs, "in.png"), 128, 128)
    with grpc.insecure_channel(service.address) as channel:
        stub = media_pb2_grpc.MediaServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in.png", width=64, height=64, output_key=key), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(code + ":"), info.value.details()
    assert not os.path.exists(os.path.join(blobs, "out", "x"))


def test_a_key_naming_a_directory_is_invalid_key(start_service):
    from tmmedia import media_pb2, media_pb2_grpc
    service = start_service("talkmesh-media")
    blobs = service_blob_dir(service)
    make_png(os.path.join(blobs, "in.png"), 128, 128)
    os.makedirs(os.path.join(blobs, "out", "dir.png"))
    with grpc.insecure_channel(service.address) as channel:
        stub = media_pb2_grpc.MediaServiceStub(channel)
        for request in (media_pb2.ResizeImageRequest(image_key="in.png", width=64, height=64, output_key="out/dir.png"),
                        media_pb2.ResizeImageRequest(image_key="out", width=64, height=64)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ResizeImage(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith("INVALID_KEY:"), info.value.details()


@pytest.mark.parametrize("raw,reason", [
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"without CR"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", b"without CR"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n", b"folding"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tfolded\r\n\r\n", b"folding"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n", b"CRLF"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n\n0\r\n\r\n", b"CRLF"),
])
def test_http1_parsing_is_strict(testserver, raw, reason):
    answer = http1_exchange(testserver, raw)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert reason in answer


def test_strict_parsing_still_takes_well_formed_pipelined_and_chunked_requests(testserver):
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    plain = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((testserver.host, testserver.port), timeout=5) as sock:
        # Split at every awkward place: between CR and LF, inside the head, inside the chunk trailer.
        data = b"\r\n" + chunked + plain + chunked
        for cut in range(0, len(data), 7):
            sock.sendall(data[cut:cut + 7])
            time.sleep(0.001)
        out = b""
        while out.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, out
            out += chunk
    assert out.count(b"abcde") == 2
