"""What the Gateway's calls to the Dispatcher carry, seen from the Dispatcher's side: a raw HTTP/2
server stands in for it and records each request's headers. The Gateway's client interceptors send
a gRPC caller's deadline on as `grpc-timeout` and every request's id as `x-request-id`."""
import os
import shutil
import subprocess
import tempfile

import grpc

from conftest import Service
from raw_h2_server import RawH2Server
from test_gateway import new_key
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc

LIST = "/talkmesh.v1.DispatcherService/ListJobs"
UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def seconds(grpc_timeout):
    return int(grpc_timeout[:-1]) * UNITS[grpc_timeout[-1]]


def test_the_callers_deadline_and_request_id_reach_the_dispatcher():
    directory = tempfile.mkdtemp(prefix="talkmesh-forwarding-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000")
    os.makedirs(os.path.join(directory, "blobs"))
    with RawH2Server(lambda _: "ok") as dispatcher:
        gateway = Service("talkmesh-gateway", env={"BLOB_STORE": "file://" + os.path.join(directory, "blobs"),
                                                   "API_KEYS_FILE": keys_file, "DISPATCHER_ADDR": dispatcher.target})
        try:
            channel = grpc.insecure_channel(gateway.address)
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            bearer = ("authorization", f"Bearer {key}")
            # A gRPC caller with a 3 s deadline and a request id of its own.
            stub.ListJobs(pb.ListJobsRequest(), metadata=[bearer, ("x-request-id", "grpc-req-7")], timeout=3)
            # One without a request id gets one made for it; a long deadline is capped at the Gateway's own 30 s.
            stub.ListJobs(pb.ListJobsRequest(), metadata=[bearer], timeout=600)
            channel.close()
            # A REST request's id goes along too (GET /v1/jobs lists through ListJobs).
            listed = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {key}",
                                     "-H", "X-Request-Id: rest-req-9", f"http://{gateway.address}/v1/jobs"],
                                    capture_output=True, text=True, timeout=30)
            assert listed.stdout == "200", listed
        finally:
            gateway.stop()
            shutil.rmtree(directory, ignore_errors=True)
    calls = [headers for headers in dispatcher.requests if headers[":path"] == LIST]
    assert len(calls) == 3, dispatcher.requests
    first, second, rest = calls
    assert first["x-request-id"] == "grpc-req-7"
    # The caller's 3 s, not the Gateway's own 30 s. grpcio rounds the grpc-timeout it sends up (a
    # CI run saw 3.008 s arrive): what the Gateway can pass on is what it received, less its time.
    assert 0 < seconds(first["grpc-timeout"]) <= 3.5
    assert 0 < len(second["x-request-id"]) <= 128 and second["x-request-id"] != "grpc-req-7"
    assert 3 < seconds(second["grpc-timeout"]) <= 30
    assert rest["x-request-id"] == "rest-req-9"
    assert 0 < seconds(rest["grpc-timeout"]) <= 10
