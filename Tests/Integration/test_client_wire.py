"""Our client's wire behaviour, seen from the server's side: a raw HTTP/2 server records every
request's headers and every RST_STREAM the client sends (`talkmesh-testclient call` drives it)."""
import json
import os
import subprocess

import pytest

from conftest import BIN
from raw_h2_server import CANCEL, RawH2Server

UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def call(server, *args):
    result = subprocess.run([os.path.join(BIN, "talkmesh-testclient"), "call", "--target", server.target, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_deadline_goes_out_as_grpc_timeout_and_its_expiry_as_rst_stream_cancel():
    with RawH2Server(lambda _: "hang") as server:
        outcome = call(server, "--timeout", "1500ms")
        assert not outcome["ok"] and outcome["error"]["name"] == "DEADLINE_EXCEEDED", outcome
        assert len(server.requests) == 1
        timeout = server.requests[0]["grpc-timeout"]
        seconds = int(timeout[:-1]) * UNITS[timeout[-1]]
        assert 1.0 < seconds <= 1.5, timeout  # what is left of 1.5 s when the headers leave
        assert server.requests[0]["te"] == "trailers" and server.requests[0]["content-type"].startswith("application/grpc")
        stream = 1
        assert (stream, CANCEL) in server.resets, server.resets


def test_a_cancelled_task_sends_rst_stream_cancel():
    with RawH2Server(lambda _: "hang") as server:
        outcome = call(server, "--timeout", "30s", "--cancel-after", "300")
        assert not outcome["ok"] and outcome["error"]["name"] == "CANCELLED", outcome
        assert len(server.requests) == 1
        assert [code for _, code in server.resets] == [CANCEL], server.resets


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_refused_stream_is_retried_whatever_the_call(idempotent):
    # REFUSED_STREAM: the server says it never ran the request, so even a non-idempotent call is safe to retry.
    with RawH2Server(lambda index: "refuse" if index == 0 else "ok") as server:
        outcome = call(server, *(["--idempotent"] if idempotent else []))
        assert outcome["ok"], outcome
        assert len(server.requests) == 2


def test_a_call_the_server_saw_is_retried_only_when_idempotent():
    # The stream reset after the request arrived: the server may have acted on it.
    with RawH2Server(lambda index: "reset" if index == 0 else "ok") as server:
        outcome = call(server)
        assert not outcome["ok"] and outcome["error"]["name"] == "UNAVAILABLE", outcome
        assert len(server.requests) == 1
    with RawH2Server(lambda index: "reset" if index == 0 else "ok") as server:
        outcome = call(server, "--idempotent")
        assert outcome["ok"], outcome
        assert len(server.requests) == 2
