"""One trace per job across every service, exported over OTLP/HTTP: a test receiver decodes what the
services send with the opentelemetry-proto package and checks that the spans connect Gateway →
Dispatcher → Media/Audio → each RunPod chunk → stitch, also across a Dispatcher killed mid-job; a
collector that is down costs requests nothing and is counted."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from conftest import Service, free_port
from test_dispatcher import Mesh, inputs  # noqa: F401
from test_gateway import Gateway, new_key
from tmdispatcher import dispatcher_pb2 as pb


class Collector:
    """An OTLP/HTTP trace receiver: every span it is sent, with its service's name."""

    def __init__(self):
        self.spans = []
        self.requests = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            collector.spans.append((resource["service.name"], span))
                collector.requests += 1
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def trace(self, trace_id):
        return [(service, span) for service, span in list(self.spans) if span.trace_id.hex() == trace_id]

    def wait_for(self, trace_id, predicate, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            spans = self.trace(trace_id)
            if predicate(spans):
                return spans
            time.sleep(0.1)
        names = sorted(f"{service}:{span.name}" for service, span in self.trace(trace_id))
        raise AssertionError(f"the trace is incomplete: {names}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def attributes(span):
    values = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


def tracing_env(collector):
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture
def world(inputs):  # noqa: F811
    directory = tempfile.mkdtemp(prefix="talkmesh-tracing-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000", "--job-rate", "100", "--job-burst", "100")
    collector = Collector()
    state = {"dir": directory, "keys": keys_file, "key": key, "collector": collector, "inputs": inputs, "cleanup": [collector.close]}
    yield state
    for close in reversed(state["cleanup"]):
        close()
    shutil.rmtree(directory, ignore_errors=True)


def start(world, emulator_args=()):
    env = tracing_env(world["collector"])
    mesh = Mesh(service_env=env, emulator_args=emulator_args)
    world["cleanup"].append(mesh.stop)
    gateway = Gateway(mesh, world["keys"], **env)
    world["cleanup"].append(gateway.stop)
    return mesh, gateway


def create(world, gateway, traceparent, tracestate=None, **fields):
    form = {"image": "@" + world["inputs"]["dir"] + "/face.png", "audio": "@" + world["inputs"]["dir"] + "/short.wav",
            "width": "128", "height": "128", "chunk_target_sec": "8"}
    form.update(fields)
    headers = [f"traceparent: {traceparent}"] + ([f"tracestate: {tracestate}"] if tracestate else [])
    return gateway.json("POST", "/v1/jobs", key=world["key"], form=form, headers=headers)


def check_connected(spans, root_parent):
    """Every span's parent is the caller's span or another span of the trace: one tree."""
    ids = {span.span_id for _, span in spans}
    for service, span in spans:
        assert span.parent_span_id in ids or span.parent_span_id == root_parent, (service, span.name)


def test_one_job_is_one_trace_from_the_gateway_to_every_chunk_and_the_stitch(world):
    mesh, gateway = start(world)
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, headers, created = create(world, gateway, f"00-{trace_id}-{caller}-01", tracestate="vendor=abc,other=1")
    assert status == 202, created
    assert headers["traceparent"].split("-")[1] == trace_id, "the Gateway answers the request's own span in the caller's trace"
    job = mesh.wait(created["id"])
    assert job.status == pb.COMPLETED
    chunks = len(job.chunks)
    assert chunks >= 3

    def complete(spans):
        names = [span.name for _, span in spans]
        return "job.workflow" in names and names.count("runpod.chunk") >= chunks and "libav.stitch_videos" in names
    spans = world["collector"].wait_for(trace_id, complete)
    check_connected(spans, bytes.fromhex(caller))
    by_name = {}
    for service, span in spans:
        by_name.setdefault(span.name, []).append((service, span))
    # Gateway: the REST request (its parent the caller's span), then its client call to the Dispatcher.
    [(service, request)] = by_name["POST /v1/jobs"]
    assert service == "talkmesh-gateway" and request.parent_span_id == bytes.fromhex(caller) and request.kind == request.SPAN_KIND_SERVER
    assert attributes(request)["http.response.status_code"] == 202 and attributes(request)["http.route"] == "/v1/jobs"
    create_spans = by_name["talkmesh.v1.DispatcherService/CreateJob"]
    assert {service for service, _ in create_spans} == {"talkmesh-gateway", "talkmesh-dispatcher"}
    client = next(span for service, span in create_spans if service == "talkmesh-gateway")
    server = next(span for service, span in create_spans if service == "talkmesh-dispatcher")
    assert client.kind == client.SPAN_KIND_CLIENT and server.kind == server.SPAN_KIND_SERVER and server.parent_span_id == client.span_id
    assert attributes(server)["rpc.system"] == "grpc" and attributes(server)["rpc.grpc.status_code"] == 0
    assert attributes(server)["rpc.method"] == "CreateJob" and attributes(server)["network.peer.address"].startswith("127.0.0.1")
    assert server.end_time_unix_nano >= server.start_time_unix_nano > 0
    # The Dispatcher's workflow, a child of the CreateJob call, and its stages.
    [(_, workflow)] = by_name["job.workflow"]
    assert workflow.parent_span_id == server.span_id and attributes(workflow)["talkmesh.job_id"] == job.id
    for stage in ("job.prepare", "job.render", "job.stitch"):
        [(service, span)] = by_name[stage]
        assert service == "talkmesh-dispatcher" and span.parent_span_id == workflow.span_id, stage
    # Media and Audio: server spans under the Dispatcher's client spans, and the libav work with its sizes.
    for rpc, work, service in (("talkmesh.v1.MediaService/ResizeImage", "libav.resize_image", "talkmesh-media"),
                               ("talkmesh.v1.AudioService/SplitAudio", "libav.split_audio", "talkmesh-audio"),
                               ("talkmesh.v1.MediaService/StitchVideos", "libav.stitch_videos", "talkmesh-media")):
        served = [span for name, span in by_name[rpc] if name == service]
        assert served, rpc
        [(worker_service, libav)] = by_name[work]
        assert worker_service == service and libav.parent_span_id == served[0].span_id
        sizes = attributes(libav)
        assert sizes["talkmesh.input_bytes"] > 0 and sizes["talkmesh.output_bytes"] > 0, (work, sizes)
    # Each chunk's RunPod attempt, with RunPod's timings, and its requests beneath it.
    attempts = [span for _, span in by_name["runpod.chunk"]]
    assert sorted(attributes(span)["talkmesh.chunk"] for span in attempts) == list(range(chunks))
    runpod_ids = {chunk.runpod_job_id for chunk in job.chunks}
    render = by_name["job.render"][0][1]
    for span in attempts:
        values = attributes(span)
        assert span.parent_span_id == render.span_id and values["runpod.job_id"] in runpod_ids
        assert "runpod.queue_delay_ms" in values and "runpod.execution_ms" in values and values.get("runpod.worker_id", "").startswith("emulated")
        assert span.status.code != span.status.STATUS_CODE_ERROR
    runs = [span for _, span in by_name["runpod POST /run"]]
    assert len(runs) == chunks and {span.parent_span_id for span in runs} == {span.span_id for span in attempts}
    assert all(attributes(span)["http.response.status_code"] == 200 for span in runs)
    assert by_name.get("jobstore.update"), "store writes are spans too"
    # The caller's tracestate travels with the trace, through every service and the job's workflow.
    assert {span.trace_state for _, span in spans} == {"vendor=abc,other=1"}
    for _, span in spans:
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0


def test_a_dispatcher_killed_mid_job_still_yields_one_trace(world):
    # Chunks of 4 s at 0.5 s of work per audio second, one at a time: the job takes several seconds.
    mesh, gateway = start(world, emulator_args=("--speed", "0.5"))
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    status, _, created = create(world, gateway, f"00-{trace_id}-{caller}-01", chunk_target_sec="5")
    assert status == 202, created
    mesh.stub.GetJob(pb.GetJobRequest(id=created["id"]), timeout=10)
    deadline = time.time() + 60
    while time.time() < deadline:
        job = mesh.stub.GetJob(pb.GetJobRequest(id=created["id"]), timeout=10)
        if sum(chunk.status == pb.CHUNK_COMPLETED for chunk in job.chunks) >= 1:
            break
        time.sleep(0.05)
    assert job.status == pb.RUNNING and len(job.chunks) >= 3
    time.sleep(0.3)  # the first chunk's spans are exported (every 100 ms)
    mesh.kill_dispatcher()
    mesh.start_dispatcher()
    job = mesh.wait(created["id"])
    assert job.status == pb.COMPLETED
    spans = world["collector"].wait_for(trace_id, lambda spans: any(span.name == "job.resume" for _, span in spans)
                                        and any(span.name == "libav.stitch_videos" for _, span in spans))
    create_server = next(span for service, span in spans
                         if span.name == "talkmesh.v1.DispatcherService/CreateJob" and service == "talkmesh-dispatcher")
    [resume] = [span for _, span in spans if span.name == "job.resume"]
    assert resume.parent_span_id == create_server.span_id, "the resumed work joins the job's trace"
    assert [link.span_id for link in resume.links] == [create_server.span_id] and resume.links[0].trace_id.hex() == trace_id
    # Chunks driven after the restart are in the same trace, under the resumed workflow.
    after = [span for _, span in spans if span.name == "runpod.chunk" and span.start_time_unix_nano > resume.start_time_unix_nano]
    assert after, "chunks after the restart are traced"
    # Everything the restarted Dispatcher did hangs off the job's trace. (Spans that were open when
    # the first one was killed — its workflow, the chunk in flight — died with it; their children
    # that had ended are still in the trace, by its id.)
    ids = {span.span_id for _, span in spans}
    for service, span in spans:
        if span.start_time_unix_nano >= resume.start_time_unix_nano:
            assert span.parent_span_id in ids, (service, span.name)
    assert {span.trace_id.hex() for _, span in spans} == {trace_id}


def test_a_collector_that_is_down_costs_requests_nothing_and_is_counted(world):
    down = free_port()
    emulator = Service("talkmesh-runpod-emulator", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{down}",
                                                       "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "500"})
    world["cleanup"].append(emulator.stop)
    for _ in range(20):
        with urllib.request.urlopen(f"http://{emulator.address}/v2/ep/health", timeout=5) as response:
            assert response.status == 200 and response.headers["traceparent"]
    deadline = time.time() + 15
    dropped = 0
    while time.time() < deadline and dropped < 20:
        dropped = emulator.metrics("talkmesh_otel_spans_dropped_total").get('talkmesh_otel_spans_dropped_total{reason="export_failed"}', 0)
        time.sleep(0.1)
    assert dropped >= 20, dropped
    assert emulator.proc.poll() is None


def test_an_always_off_sampler_exports_nothing_and_still_answers_a_traceparent(world):
    collector = world["collector"]
    emulator = Service("talkmesh-runpod-emulator", env={**tracing_env(collector), "OTEL_TRACES_SAMPLER": "always_off"})
    world["cleanup"].append(emulator.stop)
    trace_id = "11112222333344445555666677778888"
    request = urllib.request.Request(f"http://{emulator.address}/v2/ep/health", headers={"traceparent": f"00-{trace_id}-1111222233334444-01"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["traceparent"].split("-")[1] == trace_id
    with urllib.request.urlopen(f"http://{emulator.address}/v2/ep/health", timeout=5) as response:
        assert response.headers["traceparent"].endswith("-00"), "a root the sampler declined is marked unsampled"
    time.sleep(0.5)
    assert collector.trace(trace_id) == [] and collector.requests == 0


def test_sigterm_flushes_the_spans_still_queued(world):
    collector = world["collector"]
    # A schedule delay of ten minutes: only the flush at SIGTERM can send these spans.
    emulator = Service("talkmesh-runpod-emulator", env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    world["cleanup"].append(emulator.stop)
    for _ in range(5):
        with urllib.request.urlopen(f"http://{emulator.address}/v2/ep/health", timeout=5) as response:
            assert response.status == 200
    time.sleep(0.5)
    assert collector.requests == 0, "nothing is exported before the schedule delay"
    emulator.proc.send_signal(signal.SIGTERM)
    assert emulator.proc.wait(timeout=30) == 0
    deadline = time.time() + 5
    while time.time() < deadline and len(collector.spans) < 5:
        time.sleep(0.05)
    assert [span.name for _, span in collector.spans] == ["GET /v2/{endpoint}/health"] * 5


def hpack_representations(block):
    """The field representations of an HPACK header block, in order, as (kind, name index): kind is
    "indexed", "incremental", "without", "never" (RFC 7541 §6); a name index of 0 is a literal name."""
    def integer(at, prefix):
        value = block[at] & ((1 << prefix) - 1)
        at += 1
        if value == (1 << prefix) - 1:
            shift = 0
            while True:
                byte = block[at]
                at += 1
                value += (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
        return value, at

    def string(at):
        length, at = integer(at, 7)
        return at + length

    found, at = [], 0
    while at < len(block):
        first = block[at]
        if first & 0x80:
            index, at = integer(at, 7)
            found.append(("indexed", index))
            continue
        if first & 0xE0 == 0x20:  # a dynamic table size update
            _, at = integer(at, 5)
            continue
        kind, prefix = ("incremental", 6) if first & 0x40 else ("never", 4) if first & 0x10 else ("without", 4)
        index, at = integer(at, prefix)
        if index == 0:
            at = string(at)
        at = string(at)
        found.append((kind, index))
    return found


def test_a_traceparent_answer_names_its_field_by_index_after_the_first_on_a_connection(world):
    """The first `traceparent` answer on a connection is indexed, so its name enters HPACK's table;
    every later one is never indexed (its value is new each time) and names the field by index."""
    import h2.config
    import h2.connection
    import hpack

    emulator = Service("talkmesh-runpod-emulator")
    world["cleanup"].append(emulator.stop)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    sock = socket.create_connection((emulator.host, emulator.port), timeout=10)
    answers = 3
    for index in range(answers):
        stream = connection.get_next_available_stream_id()
        connection.send_headers(stream, [(":method", "GET"), (":scheme", "http"), (":path", "/v2/ep/health"), (":authority", "test"),
                                         ("traceparent", f"00-{index + 1:032x}-{index + 1:016x}-01")], end_stream=True)
        sock.sendall(connection.data_to_send())
    # The frames as they come: the header blocks of every response, in the order they were sent
    # (HPACK's state is the connection's), with their stream: answers may come in any order.
    pending, blocks, deadline = b"", [], time.time() + 10
    while len(blocks) < answers and time.time() < deadline:
        pending += sock.recv(65536)
        while len(pending) >= 9:
            length = int.from_bytes(pending[:3], "big")
            if len(pending) < 9 + length:
                break
            kind, flags, stream_id, payload = pending[3], pending[4], int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF, pending[9:9 + length]
            pending = pending[9 + length:]
            if kind == 1:  # HEADERS (CONTINUATION is not needed for blocks this small)
                padding = payload[0] if flags & 0x8 else 0
                payload = payload[1 if flags & 0x8 else 0:]
                payload = payload[5:] if flags & 0x20 else payload
                blocks.append((stream_id, payload[:len(payload) - padding]))
                assert flags & 0x4, "a response head in one frame"
    sock.close()
    assert len(blocks) == answers
    decoder = hpack.Decoder()
    shapes = []
    for stream_id, block in blocks:
        fields = decoder.decode(block, raw=False)
        representations = hpack_representations(block)
        assert len(representations) == len(fields)
        shapes.append({name: shape for (name, _), shape in zip(fields, representations)})
        # Stream 1, 3, 5 sent trace 1, 2, 3: each answer continues its own request's trace.
        assert [value for name, value in fields if name == "traceparent"][0].split("-")[1] == f"{(stream_id + 1) // 2:032x}"
    assert shapes[0]["traceparent"] == ("incremental", 0), "the first is indexed, its name spelled out"
    for later in shapes[1:]:
        kind, name_index = later["traceparent"]
        assert kind == "never" and name_index > 0, later["traceparent"]
