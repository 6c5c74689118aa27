"""gRPC server reflection on every service, from real clients: grpcio-reflection's descriptor
database lists the services and builds the messages of any method from the server's answers
alone (no .proto file, no generated stub), then calls it; a client that keeps one stream open
and asks one thing at a time (as grpcurl and Evans do) gets each answer before it asks the next;
v1 and v1alpha answer alike."""
import queue
import threading

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as r
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def reflection_stream(channel, path):
    return channel.stream_stream(path, request_serializer=r.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=r.ServerReflectionResponse.FromString)


@pytest.fixture(params=["talkmesh-testserver", "talkmesh-media", "talkmesh-audio"])
def served(request, start_service):
    service = start_service(request.param)
    channel = grpc.insecure_channel(service.address)
    yield request.param, channel
    channel.close()


def test_the_descriptor_database_lists_services_and_resolves_every_method(served):
    name, channel = served
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    own = {"talkmesh-testserver": "talkmesh.testing.v1.EchoService", "talkmesh-media": "talkmesh.v1.MediaService",
           "talkmesh-audio": "talkmesh.v1.AudioService"}[name]
    assert services == {own, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"}
    pool = descriptor_pool.DescriptorPool(database)
    for service_name in services:
        service = pool.FindServiceByName(service_name)
        assert service.methods
        for method in service.methods:
            # Every request and response type resolves to a usable message class.
            for message in (method.input_type, method.output_type):
                assert message_factory.GetMessageClass(message)().ByteSize() == 0
    bidi = pool.FindServiceByName("grpc.reflection.v1.ServerReflection").methods_by_name["ServerReflectionInfo"]
    assert bidi.client_streaming and bidi.server_streaming


def test_a_method_is_called_with_messages_built_from_reflection_alone(testserver):
    channel = grpc.insecure_channel(testserver.address)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindMethodByName("talkmesh.testing.v1.EchoService.Echo")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary("/talkmesh.testing.v1.EchoService/Echo", request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)
    response = call(request_class(text="built from reflection", payload=b"\x01\x02"), timeout=10)
    assert response.text == "built from reflection" and response.payload == b"\x01\x02"
    # A symbol inside a message (a field) and a method resolve to their file, with its imports.
    database = ProtoReflectionDescriptorDatabase(channel)
    assert database.FindFileContainingSymbol("talkmesh.testing.v1.EchoService.Echo").name == "talkmesh/testing/v1/echo.proto"
    assert database.FindFileByName("grpc/health/v1/health.proto").package == "grpc.health.v1"
    channel.close()


@pytest.mark.parametrize("path", [V1, V1ALPHA])
def test_one_open_stream_answers_each_request_before_the_next_is_sent(testserver, path):
    channel = grpc.insecure_channel(testserver.address)
    requests, answered = queue.Queue(), []
    asks = [r.ServerReflectionRequest(host="h", list_services=""),
            r.ServerReflectionRequest(file_containing_symbol="talkmesh.testing.v1.Nope"),
            r.ServerReflectionRequest(file_by_filename="talkmesh/testing/v1/echo.proto"),
            r.ServerReflectionRequest(all_extension_numbers_of_type="talkmesh.testing.v1.EchoRequest")]
    requests.put(asks[0])

    def generator():
        while True:
            item = requests.get(timeout=10)
            if item is None:
                return
            yield item

    for index, response in enumerate(reflection_stream(channel, path)(generator(), timeout=20)):
        answered.append(response)
        # The next request leaves only now: the server answered the last one on the open stream.
        requests.put(asks[index + 1] if index + 1 < len(asks) else None)
    channel.close()
    assert len(answered) == 4
    listed, missing, file, extensions = answered
    assert listed.valid_host == "h" and listed.original_request == asks[0]
    assert "talkmesh.testing.v1.EchoService" in {s.name for s in listed.list_services_response.service}
    # An unknown symbol is an answer on the stream, not the end of it.
    assert missing.error_response.error_code == NOT_FOUND and "talkmesh.testing.v1.Nope" in missing.error_response.error_message
    from google.protobuf import descriptor_pb2
    first = descriptor_pb2.FileDescriptorProto.FromString(file.file_descriptor_response.file_descriptor_proto[0])
    assert first.name == "talkmesh/testing/v1/echo.proto" and {s.name for s in first.service} == {"EchoService"}
    assert extensions.all_extension_numbers_response.base_type_name == "talkmesh.testing.v1.EchoRequest"
    assert list(extensions.all_extension_numbers_response.extension_number) == []


def test_many_requests_sent_before_reading_come_back_in_order(testserver):
    """The client writes 300 requests and reads nothing until it is done: the server answers as
    they come, flow control holding both directions, and every answer arrives, in order."""
    channel = grpc.insecure_channel(testserver.address)
    names = [f"talkmesh.testing.v1.Missing{index}" for index in range(300)]
    responses = list(reflection_stream(channel, V1)(iter(r.ServerReflectionRequest(file_containing_symbol=name) for name in names),
                                                    timeout=30))
    assert [response.original_request.file_containing_symbol for response in responses] == names
    assert all(response.error_response.error_code == NOT_FOUND for response in responses)
    channel.close()


def test_a_client_that_resets_its_stream_mid_way_leaves_the_server_serving(testserver):
    channel = grpc.insecure_channel(testserver.address)
    release = threading.Event()

    def slow():
        yield r.ServerReflectionRequest(list_services="")
        release.wait(10)

    call = reflection_stream(channel, V1)(slow(), timeout=20)
    assert next(call).list_services_response.service
    call.cancel()
    release.set()
    with pytest.raises(grpc.RpcError) as ended:
        next(call)
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    # The server goes on answering, on the same connection and on a new stream.
    again = list(reflection_stream(channel, V1)(iter([r.ServerReflectionRequest(list_services="")]), timeout=10))
    assert len(again) == 1 and again[0].list_services_response.service
    assert testserver.proc.poll() is None
    channel.close()
