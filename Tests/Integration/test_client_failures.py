"""The client's failure handling against real processes: a server that dies mid-stream and a
peer that stops answering (SIGSTOP) end the call with UNAVAILABLE, never a hang."""
import json
import os
import signal
import subprocess
import time

from conftest import BIN, Service


def start_stream(target, *extra):
    return subprocess.Popen([os.path.join(BIN, "talkmesh-testclient"), "stream", "--target", target, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_started(proc):
    line = proc.stdout.readline()
    assert json.loads(line) == {"started": True}, line


def test_server_dying_mid_stream_gives_unavailable():
    service = Service("talkmesh-testserver")
    client = start_stream(service.address, "--count", "100000", "--interval-ms", "5")
    wait_started(client)
    time.sleep(0.3)
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    out, err = client.communicate(timeout=20)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["name"] == "UNAVAILABLE", result
    assert result["received"] > 0


def test_black_holed_peer_is_detected_by_keepalive():
    service = Service("talkmesh-testserver")
    try:
        client = start_stream(service.address, "--count", "100000", "--interval-ms", "5",
                              "--keepalive-interval", "300ms", "--keepalive-timeout", "700ms")
        wait_started(client)
        stopped_at = time.time()
        service.proc.send_signal(signal.SIGSTOP)  # the process and its sockets go silent, nothing is closed
        out, err = client.communicate(timeout=20)
        elapsed = time.time() - stopped_at
        result = json.loads(out.strip().splitlines()[-1])
        assert result["name"] == "UNAVAILABLE", result
        assert "keepalive" in result["message"]
        assert elapsed < 5, elapsed  # interval + timeout is 1 s; generous for a loaded machine
    finally:
        service.proc.send_signal(signal.SIGCONT)
        service.stop()
