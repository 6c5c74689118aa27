/// How many messages each side of a method sends.
public enum MethodKind: Sendable, Hashable {
    /// One request, one response.
    case unary
    /// One request, a stream of responses.
    case serverStreaming
    /// A stream of requests and a stream of responses, both open at once.
    case bidiStreaming
}

/// A gRPC method with its request and response types, generated from the service in the .proto.
public struct MethodDescriptor<Request: ProtoMessage, Response: ProtoMessage>: Sendable, Hashable {
    /// The fully qualified service name, e.g. `talkmesh.v1.MediaService`.
    public var service: String
    /// The method name, e.g. `ResizeImage`.
    public var method: String
    /// Unary or server streaming.
    public var kind: MethodKind

    /// Creates a descriptor.
    public init(service: String, method: String, kind: MethodKind) {
        self.service = service
        self.method = method
        self.kind = kind
    }

    /// The HTTP/2 `:path` of the method: `/service/method`.
    public var path: String { "/\(service)/\(method)" }
}
