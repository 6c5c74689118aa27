import TalkMeshBase
import TalkMeshMessages

/// The gRPC methods a server answers, by `:path`. Anything not registered is UNIMPLEMENTED.
public struct RPCServiceRegistry: Sendable {
    /// One registered method, with request decoding and response encoding erased to bytes.
    struct Method: Sendable {
        let path: String
        let kind: MethodKind
        /// Index into the metrics tables (0 is reserved for unknown methods).
        var index = 0
        /// The server span's constant attributes (`rpc.system`, `rpc.service`, `rpc.method`),
        /// encoded once here rather than on every call.
        var spanAttributes = KeptBytes.empty
        /// The server span's name, `package.Service/Method`.
        var spanName = KeptBytes.empty
        /// Runs the handler; a unary call returns its framed response, a streaming one writes
        /// through the writer and returns nil.
        var run: @Sendable (RequestBody, ServerContext, RawResponseWriter) async throws -> [UInt8]?
    }

    /// What a handler is given of the request: its one message (unary, server streaming), or
    /// the stream its messages arrive on (bidirectional).
    enum RequestBody: Sendable {
        case message([UInt8])
        case stream(RawRequestStream)

        var message: [UInt8] {
            get throws {
                guard case .message(let bytes) = self else { throw RPCError(code: .internal, message: "a streamed request for a one-message method") }
                return bytes
            }
        }
    }

    /// Runs around every registered method's handler, outermost first: auth, limits, access
    /// logs (the gRPC side of `HTTPRouter.interceptors`). It may throw instead of calling `next`,
    /// or call it inside a task-local scope the handler then sees.
    public typealias Interceptor = @Sendable (_ context: ServerContext, _ next: @Sendable (ServerContext) async throws -> Void) async throws -> Void
    public var interceptors: [Interceptor] = []

    private(set) var methods: [String: Method] = [:]

    /// Method paths in metrics order; index 0 is "unknown".
    private(set) var metricNames: [String] = ["unknown"]

    private mutating func renumber() {
        let sorted = methods.keys.sorted()
        metricNames = ["unknown"] + sorted
        for (offset, path) in sorted.enumerated() where methods[path]!.index != offset + 1 {
            methods[path]!.index = offset + 1
        }
        for path in sorted where methods[path]!.spanAttributes.count == 0 {
            methods[path]!.spanAttributes = KeptBytes(RPCSpans.attributes(rpc: path))
            methods[path]!.spanName = KeptBytes(utf8: path.hasPrefix("/") ? String(path.dropFirst()) : path)
        }
    }

    public init() {}

    /// Registers a unary handler.
    public mutating func register<Request, Response>(
        _ descriptor: MethodDescriptor<Request, Response>,
        _ handler: @escaping @Sendable (Request, ServerContext) async throws -> Response
    ) {
        precondition(descriptor.kind == .unary, "\(descriptor.path) is not unary")
        methods[descriptor.path] = Method(path: descriptor.path, kind: .unary) { body, context, _ in
            let request = try Self.decode(Request.self, try body.message)
            return GRPCFraming.frame(try await handler(request, context))
        }
        renumber()
    }

    /// Registers a server-streaming handler.
    public mutating func register<Request, Response>(
        _ descriptor: MethodDescriptor<Request, Response>,
        _ handler: @escaping @Sendable (Request, ServerContext, ResponseWriter<Response>) async throws -> Void
    ) {
        precondition(descriptor.kind == .serverStreaming, "\(descriptor.path) is not server streaming")
        methods[descriptor.path] = Method(path: descriptor.path, kind: .serverStreaming) { body, context, writer in
            let request = try Self.decode(Request.self, try body.message)
            try await handler(request, context, ResponseWriter(raw: writer))
            return nil
        }
        renumber()
    }

    /// Registers a bidirectional-streaming handler: it starts when the call's headers arrive,
    /// reads requests as the client sends them and writes responses whenever it likes; the call
    /// ends (status OK) when it returns.
    public mutating func register<Request, Response>(
        _ descriptor: MethodDescriptor<Request, Response>,
        _ handler: @escaping @Sendable (RequestStream<Request>, ServerContext, ResponseWriter<Response>) async throws -> Void
    ) {
        precondition(descriptor.kind == .bidiStreaming, "\(descriptor.path) is not bidirectional streaming")
        methods[descriptor.path] = Method(path: descriptor.path, kind: .bidiStreaming) { body, context, writer in
            guard case .stream(let raw) = body else { throw RPCError(code: .internal, message: "a bidirectional call without its stream") }
            try await handler(RequestStream(raw: raw), context, ResponseWriter(raw: writer))
            return nil
        }
        renumber()
    }

    /// The service names registered (for health and reflection-like listings).
    public var serviceNames: Set<String> {
        Set(methods.keys.compactMap { path in path.split(separator: "/").first.map(String.init) })
    }

    func method(for path: String) -> Method? {
        guard var method = methods[path], !interceptors.isEmpty else { return methods[path] }
        let handler = method.run, chain = interceptors
        method.run = { body, context, writer in
            let result = HandlerResult()
            var next: @Sendable (ServerContext) async throws -> Void = { context in result.bytes = try await handler(body, context, writer) }
            for interceptor in chain.reversed() {
                let inner = next
                next = { context in try await interceptor(context, inner) }
            }
            try await next(context)
            return result.bytes
        }
        return method
    }

    static func decode<Request: ProtoMessage>(_ type: Request.Type, _ bytes: [UInt8]) throws -> Request {
        do {
            return try Request(serializedBytes: bytes)
        } catch {
            // A sound encoding with a bad string is the caller's argument; anything else is
            // gRPC's INTERNAL for an unparsable request.
            if error.invalidStringField != nil { throw RPCError(code: .invalidArgument, message: "INVALID_ARGUMENT: \(error)") }
            throw RPCError(code: .internal, message: "could not decode the request: \(error)")
        }
    }
}

/// A unary handler's framed response, carried out through the interceptors.
private final class HandlerResult: @unchecked Sendable {
    var bytes: [UInt8]?
}
