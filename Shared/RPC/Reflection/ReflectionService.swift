import TalkMeshBase
import TalkMeshMessages

/// gRPC server reflection, `grpc.reflection.v1` and the older `v1alpha` (the same messages under
/// another package; grpcurl, Postman, Evans and grpcio-reflection's client use one or the other):
/// on one bidirectional stream a client lists the server's services and asks for the descriptors
/// of the .proto files that define them, so it can call any method without the .proto files.
/// The descriptors are those of the committed .proto files (`ProtoFiles`, from proto/generate).
public struct ReflectionService: Sendable {
    /// `v1alpha`'s method: v1's messages, v1alpha's path.
    static let v1alpha = MethodDescriptor<ServerReflectionRequest, ServerReflectionResponse>(
        service: "grpc.reflection.v1alpha.ServerReflection", method: "ServerReflectionInfo", kind: .bidiStreaming)

    /// The two services, served by every server.
    public static let serviceNames: Set<String> = [ServerReflection.name, v1alpha.service]

    private let services: [String]
    private let descriptors: [String: (bytes: [UInt8], dependencies: [String])]
    /// Every symbol's file: messages, enums, services and methods.
    private let fileOfSymbol: [String: String]

    /// Reflection for a server that serves `services` (its own names are added).
    public init(services: Set<String>, files: [ProtoFiles.File] = ProtoFiles.all) {
        self.services = services.union(Self.serviceNames).sorted()
        var descriptors: [String: (bytes: [UInt8], dependencies: [String])] = [:]
        var fileOfSymbol: [String: String] = [:]
        for file in files {
            descriptors[file.name] = (Base64.decode(file.descriptorBase64) ?? [], file.dependencies)
            for symbol in file.symbols { fileOfSymbol[symbol] = file.name }
        }
        self.descriptors = descriptors
        self.fileOfSymbol = fileOfSymbol
    }

    /// Adds both versions' `ServerReflectionInfo`: one response per request, in order, for as
    /// long as the client keeps the stream open.
    public func register(into registry: inout RPCServiceRegistry) {
        for method in [ServerReflection.serverReflectionInfo, Self.v1alpha] {
            registry.register(method) { requests, _, responses in
                for try await request in requests { try await responses.write(answer(request)) }
            }
        }
    }

    /// The answer to one request. Anything unknown is an `error_response` on the stream, as the
    /// protocol has it (NOT_FOUND; INVALID_ARGUMENT for a request that asks nothing): the stream
    /// stays open for the next request.
    public func answer(_ request: ServerReflectionRequest) -> ServerReflectionResponse {
        var response = ServerReflectionResponse()
        response.validHost = request.host
        response.originalRequest = request
        switch request.messageRequest {
        case .listServices:
            var list = ListServiceResponse()
            list.service = services.map { name in
                var service = ServiceResponse()
                service.name = name
                return service
            }
            response.messageResponse = .listServicesResponse(list)
        case .fileByFilename(let name):
            response.messageResponse = files(from: name).map { .fileDescriptorResponse($0) } ?? Self.error(.notFound, "no file \(name)")
        case .fileContainingSymbol(let symbol):
            response.messageResponse = file(defining: symbol).flatMap(files(from:)).map { .fileDescriptorResponse($0) }
                ?? Self.error(.notFound, "no symbol \(symbol)")
        case .fileContainingExtension(let extensionRequest):
            // No .proto file here declares an extension.
            response.messageResponse = Self.error(.notFound, "no extension \(extensionRequest.extensionNumber) of \(extensionRequest.containingType)")
        case .allExtensionNumbersOfType(let type):
            if fileOfSymbol[type] != nil {
                var numbers = ExtensionNumberResponse()
                numbers.baseTypeName = type
                response.messageResponse = .allExtensionNumbersResponse(numbers)
            } else {
                response.messageResponse = Self.error(.notFound, "no type \(type)")
            }
        case nil:
            response.messageResponse = Self.error(.invalidArgument, "the request asks for nothing")
        }
        return response
    }

    /// The file that defines `symbol`, or whose message has it as a field (`pkg.Message.field`).
    private func file(defining symbol: String) -> String? {
        let name = symbol.hasPrefix(".") ? String(symbol.dropFirst()) : symbol
        if let file = fileOfSymbol[name] { return file }
        guard let dot = name.lastIndex(of: ".") else { return nil }
        return fileOfSymbol[String(name[..<dot])]
    }

    /// The file and every file it imports, directly or not, each once, the file first.
    private func files(from name: String) -> FileDescriptorResponse? {
        guard descriptors[name] != nil else { return nil }
        var response = FileDescriptorResponse()
        var seen: Set<String> = []
        var queue = [name]
        while let next = queue.first {
            queue.removeFirst()
            guard seen.insert(next).inserted, let file = descriptors[next] else { continue }
            response.fileDescriptorProto.append(file.bytes)
            queue += file.dependencies
        }
        return response
    }

    private static func error(_ code: RPCError.Code, _ message: String) -> ServerReflectionResponse.MessageResponse {
        var error = ErrorResponse()
        error.errorCode = Int32(code.rawValue)
        error.errorMessage = message
        return .errorResponse(error)
    }
}
