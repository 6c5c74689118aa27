import TalkMeshBase
import TalkMeshMessages
import Testing
@testable import TalkMeshRPC

@Suite("Server reflection")
struct ReflectionTests {
    @Test("a oneof round-trips through protobuf-c: each member, a message member, and none set")
    func oneofRoundTrip() throws {
        var request = ServerReflectionRequest()
        request.host = "h"
        for member: ServerReflectionRequest.MessageRequest in [.fileByFilename("a.proto"), .fileContainingSymbol("pkg.Type"),
                                                                .allExtensionNumbersOfType("pkg.Msg"), .listServices("")] {
            request.messageRequest = member
            #expect(try ServerReflectionRequest(serializedBytes: request.serializedBytes()) == request)
        }
        var extensionRequest = ExtensionRequest()
        extensionRequest.containingType = "pkg.Msg"
        extensionRequest.extensionNumber = 100
        request.messageRequest = .fileContainingExtension(extensionRequest)
        #expect(try ServerReflectionRequest(serializedBytes: request.serializedBytes()) == request)
        request.messageRequest = nil
        let decoded = try ServerReflectionRequest(serializedBytes: request.serializedBytes())
        #expect(decoded.messageRequest == nil && decoded.host == "h")
        // The wire form is protobuf's: field 4 (file_containing_symbol), length-delimited.
        var symbol = ServerReflectionRequest()
        symbol.messageRequest = .fileContainingSymbol("x")
        #expect(symbol.serializedBytes() == [0x22, 0x01, UInt8(ascii: "x")])
    }

    func sampleFiles() -> [ProtoFiles.File] {
        func file(_ name: String, _ dependencies: [String], _ symbols: [String]) -> ProtoFiles.File {
            ProtoFiles.File(name: name, dependencies: dependencies, symbols: symbols, descriptorBase64: Base64.encode(Array(name.utf8)))
        }
        return [file("a.proto", ["b.proto", "c.proto"], ["p.A", "p.S", "p.S.Call"]), file("b.proto", ["c.proto"], ["p.B"]),
                file("c.proto", [], ["p.C", "p.C.Inner"])]
    }

    func ask(_ service: ReflectionService, _ request: ServerReflectionRequest.MessageRequest) -> ServerReflectionResponse.MessageResponse? {
        var message = ServerReflectionRequest()
        message.messageRequest = request
        return service.answer(message).messageResponse
    }

    @Test("a file comes with everything it imports, each once, the file first; symbols, methods and fields find their file")
    func files() throws {
        let service = ReflectionService(services: ["p.S"], files: sampleFiles())
        guard case .fileDescriptorResponse(let all) = ask(service, .fileByFilename("a.proto")) else {
            Issue.record("no files")
            return
        }
        #expect(all.fileDescriptorProto.map { String(decoding: $0, as: UTF8.self) } == ["a.proto", "b.proto", "c.proto"])
        for symbol in ["p.S.Call", "p.A.some_field", ".p.A"] {
            guard case .fileDescriptorResponse(let found) = ask(service, .fileContainingSymbol(symbol)) else {
                Issue.record("\(symbol) not found")
                continue
            }
            #expect(found.fileDescriptorProto.first == Array("a.proto".utf8))
        }
        guard case .fileDescriptorResponse(let inner) = ask(service, .fileContainingSymbol("p.C.Inner")) else {
            Issue.record("p.C.Inner not found")
            return
        }
        #expect(inner.fileDescriptorProto == [Array("c.proto".utf8)])
        for request: ServerReflectionRequest.MessageRequest in [.fileByFilename("z.proto"), .fileContainingSymbol("q.Nope"),
                                                                 .allExtensionNumbersOfType("q.Nope")] {
            guard case .errorResponse(let error) = ask(service, request) else {
                Issue.record("\(request) answered")
                continue
            }
            #expect(error.errorCode == Int32(RPCError.Code.notFound.rawValue))
        }
        guard case .listServicesResponse(let list) = ask(service, .listServices("")) else {
            Issue.record("no list")
            return
        }
        #expect(list.service.map(\.name) == ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", "p.S"])
    }

    @Test("every service of every server has its descriptor, and every .proto file's imports are there too")
    func everyServiceIsDescribed() throws {
        let names = Set(ProtoFiles.all.map(\.name))
        for file in ProtoFiles.all {
            #expect(Base64.decode(file.descriptorBase64)?.isEmpty == false)
            #expect(file.dependencies.allSatisfy(names.contains))
        }
        let symbols = Set(ProtoFiles.all.flatMap(\.symbols))
        for service in [Health.name, ServerReflection.name, "grpc.reflection.v1alpha.ServerReflection", MediaService.name, AudioService.name,
                        DispatcherService.name, EchoService.name] {
            #expect(symbols.contains(service), "\(service)")
        }
    }
}
