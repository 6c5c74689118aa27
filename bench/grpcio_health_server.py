#!/usr/bin/env python3
"""A Python grpcio server answering grpc.health.v1.Health/Check: what people use today, as the
baseline in bench/rpc. Usage: grpcio_health_server.py PORT"""
import os
import shutil
import sys
import tempfile
from concurrent import futures

import grpc
from grpc_tools import protoc

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = tempfile.mkdtemp(prefix="bench-stubs-")
os.makedirs(os.path.join(out, "tmhealth"))
shutil.copy(os.path.join(root, "proto/grpc/health/v1/health.proto"), os.path.join(out, "tmhealth/health.proto"))
assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", f"{out}/tmhealth/health.proto"]) == 0
open(os.path.join(out, "tmhealth/__init__.py"), "w").close()
sys.path.insert(0, out)
from tmhealth import health_pb2, health_pb2_grpc  # noqa: E402
shutil.rmtree(out)  # imported: the generated files are no longer needed


class Health(health_pb2_grpc.HealthServicer):
    def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
