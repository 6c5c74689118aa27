"""The Gateway's upload edges against the real mesh: multipart framing, uploads over their limits refused while streaming, concurrent large uploads within memory."""
import json
import os
import subprocess
import time
import urllib.request
import pytest
from test_dispatcher import inputs  # noqa: F401  (world needs the fixture)
from test_gateway import multipart, world  # noqa: F401  (world is a fixture)


def raw_multipart(boundary, parts):
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_raw(gateway, key, head_lines, body, piece=None):
    """Sends a request over a raw socket, optionally in tiny pieces; returns (status, body)."""
    import socket
    host, port = gateway.service.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n"
        sock.sendall((head + "".join(line + "\r\n" for line in head_lines) + "\r\n").encode())
        if piece:
            for offset in range(0, len(body), piece):
                sock.sendall(body[offset:offset + piece])
        else:
            sock.sendall(body)
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < int(
                [line for line in response.split(b"\r\n") if line.lower().startswith(b"content-length:")][0].split(b":")[1]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, content = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def test_multipart_edge_cases(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    image, audio = open(files["face"], "rb").read(), open(files["speech"], "rb").read()
    good = [("image", "face.png", image), ("audio", "a.wav", audio), ("width", None, b"320"), ("height", None, b"320"),
            ("dry_run", None, b"true")]
    boundary = "XyZ-boundary-123"
    content_type = f"Content-Type: multipart/form-data; boundary={boundary}"
    # A body split across hundreds of tiny writes (a boundary cut anywhere) still parses.
    status, created = post_raw(gateway, key, [content_type], raw_multipart(boundary, good), piece=7)
    assert status == 202, created
    status, error = post_raw(gateway, key, ["Content-Type: multipart/form-data"], raw_multipart(boundary, good))
    assert status == 400 and "boundary" in error["error"]["message"]
    status, error = post_raw(gateway, key, [content_type], raw_multipart(boundary, good[1:]))
    assert status == 400 and "image is required" in error["error"]["message"]
    status, error = post_raw(gateway, key, [content_type], raw_multipart(boundary, good + [("image", "b.png", image)]))
    assert status == 400 and "more than once" in error["error"]["message"]
    status, error = post_raw(gateway, key, [content_type], raw_multipart(boundary, good + [("width", None, b"330")]))
    assert status == 400 and "more than once" in error["error"]["message"]
    status, error = post_raw(gateway, key, [content_type], raw_multipart(boundary, good)[:-10])
    assert status == 400 and "closing boundary" in error["error"]["message"]


@pytest.mark.memory_bound
def test_oversized_uploads_are_refused_while_streaming_without_holding_memory(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    big = os.path.join(files["dir"], "big.wav")
    with open(big, "wb") as fh:
        fh.write(b"RIFF\0\0\0\0WAVEfmt ")
        fh.truncate(200 << 20)
    start = gateway.rss_kb()
    # Over the audio limit (50 MB) but under the request's: refused as the part goes past it.
    half = os.path.join(files["dir"], "60.wav")
    with open(half, "wb") as fh:
        fh.write(b"RIFF\0\0\0\0WAVEfmt ")
        fh.truncate(60 << 20)
    status, _, error = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files, audio="@" + half))
    assert status == 413 and error["error"]["code"] == "PAYLOAD_TOO_LARGE" and "audio" in error["error"]["message"]
    # 200 MB: refused from its declared length, and with chunked encoding (no length) as it streams.
    status, _, error = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files, audio="@" + big))
    assert status == 413 and error["error"]["code"] == "PAYLOAD_TOO_LARGE"
    status, _, error = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files, audio="@" + big), headers=["Transfer-Encoding: chunked"])
    assert status == 413 and error["error"]["code"] == "PAYLOAD_TOO_LARGE"
    # Over HTTP/2 the 413 arrives before the request ends, then RST_STREAM(NO_ERROR): nghttp shows both.
    body = os.path.join(files["dir"], "big.json")
    with open(body, "w") as fh:
        fh.write('{"width": 320, "height": 320, "audio_base64": "UklGRgAAAABXQVZF' + "A" * (70 << 20) + '"}')
    result = subprocess.run(["nghttp", "-v", "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json", "-d", body,
                             f"{gateway.url}/v1/jobs"], capture_output=True, text=True, timeout=120)
    assert ":status: 413" in result.stdout and "PAYLOAD_TOO_LARGE" in result.stdout, result.stdout[-2000:]
    assert gateway.rss_kb() - start < 20 * 1024


@pytest.mark.memory_bound
def test_eight_concurrent_40mb_uploads_stay_within_memory(world):
    gateway, key, files = world["gateway"], world["key"], world["files"]
    audio = os.path.join(files["dir"], "40.wav")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "anoisesrc=d=240:r=44100", "-ac", "2", audio], check=True)
    assert os.path.getsize(audio) > 40 << 20
    start = gateway.rss_kb()
    peak = start
    commands = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"X-API-Key: {key}",
                                  "-F", f"image=@{files['face']}", "-F", f"audio=@{audio}", "-F", "width=320", "-F", "height=320",
                                  "-F", "dry_run=true", f"{gateway.url}/v1/jobs"], stdout=subprocess.PIPE, text=True) for _ in range(8)]
    while any(command.poll() is None for command in commands):
        peak = max(peak, gateway.rss_kb())
        time.sleep(0.02)
    assert [command.stdout.read() for command in commands] == ["202"] * 8
    assert peak - start < 100 * 1024, f"RSS grew by {(peak - start) // 1024} MB"
