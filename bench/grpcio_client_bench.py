#!/usr/bin/env python3
"""grpcio (asyncio) client calling grpc.health.v1.Health/Check as fast as it can, for bench/rpc.
Usage: grpcio_client_bench.py TARGET CALLS CONCURRENCY; prints JSON {rate, calls, failures}."""
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time

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


async def main(target, calls, concurrency):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest())
        failures = 0

        async def worker(n):
            nonlocal failures
            for _ in range(n):
                try:
                    await stub.Check(health_pb2.HealthCheckRequest())
                except grpc.RpcError:
                    failures += 1

        per = calls // concurrency
        started = time.perf_counter()
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        print(json.dumps({"calls": per * concurrency, "failures": failures, "seconds": seconds, "rate": per * concurrency / seconds}))


asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
