"""Python grpcio servers for interop tests: EchoService (the same contract as talkmesh-testserver)
and the standard Health service, run in the test process."""
import threading
import time
from concurrent import futures

import grpc

from tmecho import echo_pb2, echo_pb2_grpc
from tmhealth import health_pb2, health_pb2_grpc


class Echo(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.stats = {}

    def Echo(self, request, context):
        metadata = [f"{k}={v if isinstance(v, str) else __import__('base64').b64encode(v).decode()}"
                    for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-", "user-agent", "te"))]
        context.send_initial_metadata((("x-initial", "from-grpcio"),))
        context.set_trailing_metadata((("x-trailing", "bye"), ("x-echo-bin", b"\x00\xff")))
        traceparent = dict(context.invocation_metadata()).get("traceparent", "")
        return echo_pb2.EchoResponse(payload=request.payload, text=request.text, metadata=metadata,
                                     server="grpcio", traceparent=traceparent)

    def Expand(self, request, context):
        for index in range(request.count):
            if request.interval_ms:
                time.sleep(request.interval_ms / 1000)
            yield echo_pb2.EchoResponse(payload=request.payload, sequence=index, server="grpcio")

    def Hold(self, request, context):
        deadline = time.time() + request.delay_ms / 1000
        while time.time() < deadline and context.is_active():
            time.sleep(0.01)
        if request.fail_code:
            context.abort(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == request.fail_code).value),
                          request.fail_message)
        return echo_pb2.EchoResponse(text=request.tag, server="grpcio")

    def Stats(self, request, context):
        return echo_pb2.StatsResponse()


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self):
        self.status = {"": health_pb2.HealthCheckResponse.SERVING,
                       "talkmesh.testing.v1.EchoService": health_pb2.HealthCheckResponse.SERVING,
                       "draining.Service": health_pb2.HealthCheckResponse.NOT_SERVING}

    def Check(self, request, context):
        if request.service == "broken.Service":
            context.abort(grpc.StatusCode.INTERNAL, "the health check itself failed")
        if request.service not in self.status:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=self.status[request.service])


def start(port, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    echo_pb2_grpc.add_EchoServiceServicer_to_server(Echo(), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    if credentials:
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server
