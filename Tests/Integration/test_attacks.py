"""The attack suite: each finding of the hardening review, replayed against the real executables.
Every test asserts that the service is still up afterwards, and what it answered."""
import os
import socket
import struct
import time

import grpc
import pytest

from test_http2_edges import Client, grpc_frame, grpc_headers, HOLD, STATS
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


def rss_bytes(service):
    with open(f"/proc/{service.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def hold_stats(client, tag):
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers(STATS))
    client.conn.send_data(sid, grpc_frame(echo_pb2.StatsRequest(tag=tag)), end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.ended)
    return echo_pb2.StatsResponse.FromString(client.data[sid][5:])


# 1. The largest grpc-timeout values the spec allows overflowed the deadline arithmetic (SIGILL).

@pytest.mark.parametrize("exe", GRPC_SERVICES)
@pytest.mark.parametrize("timeout", ["99999999H", "2562048H", "2562047H", "99999999M", "99999999S", "99999999n"])
def test_largest_grpc_timeouts_do_not_kill_the_service(start_service, exe, timeout):
    service = start_service(exe)
    client = Client(service)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers(HEALTH_CHECK, [("grpc-timeout", timeout)]))
    client.conn.send_data(sid, grpc_frame(health_pb2.HealthCheckRequest()), end_stream=True)
    client.flush()
    assert client.pump(lambda: sid in client.ended), client.terminated
    # 99999999n is 100 ms: long enough for a health check.
    assert client.status(sid) == "0"
    client.close()
    assert_serving(service)


def test_a_huge_grpc_timeout_still_lets_the_handler_run_and_be_cancelled(testserver):
    client = Client(testserver)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers(HOLD, [("grpc-timeout", "99999999H")]))
    client.conn.send_data(sid, grpc_frame(echo_pb2.HoldRequest(delay_ms=30, tag="huge-timeout")), end_stream=True)
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
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, grpc_headers(HOLD))
        client.conn.send_data(sid, grpc_frame(echo_pb2.HoldRequest(delay_ms=60000, tag="same-read-rst")), end_stream=True)
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
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, grpc_headers(HOLD))
        client.conn.send_data(sid, grpc_frame(echo_pb2.HoldRequest(delay_ms=60000, tag="conn-close")), end_stream=True)
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
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, grpc_headers("/talkmesh.v1.MediaService/ResizeImage"))
        client.conn.send_data(sid, grpc_frame(request), end_stream=True)
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
