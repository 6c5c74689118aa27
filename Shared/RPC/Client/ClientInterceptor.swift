import Logging
import TalkMeshBase
import TalkMeshMessages

/// What a client interceptor sees of an outgoing call, and may change before it leaves.
public struct ClientCallContext: Sendable {
    /// The method's `:path`, e.g. `/talkmesh.v1.MediaService/ResizeImage`.
    public let path: String
    /// Unary or server streaming.
    public let kind: MethodKind
    /// The call's deadline, metadata and idempotency: what `next` is given is what is sent.
    public var options: CallOptions

    public init(path: String, kind: MethodKind, options: CallOptions) {
        self.path = path
        self.kind = kind
        self.options = options
    }
}

/// Wraps an outgoing call, the client's side of `RPCServiceRegistry.Interceptor`: it may change
/// the call (metadata, deadline) and pass it to `next`, or throw instead of calling `next` (the
/// call then never leaves). It runs once per call, around all of the call's attempts (retries
/// happen inside `next`), in the order of `RPCClient.Configuration.interceptors`, the first
/// outermost. `next` returns the server's initial metadata once the call has an answer: a unary
/// call's whole response, a server-streaming call's open stream (whose messages the caller reads
/// afterwards); it throws the call's `RPCError`. A unary call needs its response, so an
/// interceptor that returns without calling `next` fails the call (INTERNAL).
public typealias ClientInterceptor = @Sendable (_ call: ClientCallContext,
                                                _ next: @Sendable (ClientCallContext) async throws -> Metadata) async throws -> Metadata

/// Interceptors the services use.
public enum ClientInterceptors {
    /// Caps each call's deadline at the one `deadline` returns (monotonic nanoseconds), so a call
    /// made while serving another never outlives its caller's deadline: the incoming call's,
    /// typically, kept in a task-local by a server interceptor.
    public static func deadline(_ deadline: @escaping @Sendable () -> Int64?) -> ClientInterceptor {
        { call, next in
            guard let limit = deadline() else { return try await next(call) }
            var call = call
            let remaining = max(limit - MonotonicClock.nanoseconds(), 1)
            call.options.timeoutNanoseconds = min(call.options.timeoutNanoseconds ?? remaining, remaining)
            return try await next(call)
        }
    }

    /// Adds the metadata `entries` returns to each call (a request id from the task's scope, say);
    /// keys already set by the caller are left as they are.
    public static func metadata(_ entries: @escaping @Sendable () -> [(String, String)]) -> ClientInterceptor {
        { call, next in
            var call = call
            for (key, value) in entries() where call.options.metadata.first(key) == nil {
                call.options.metadata.add(key, .string(value))
            }
            return try await next(call)
        }
    }

    /// Logs each failed call once, with its method, status, duration and trace id, at the level
    /// the status calls for: a dependency down is a warning, the caller's own doing is info.
    public static func logFailures(_ logger: Logger) -> ClientInterceptor {
        { call, next in
            let started = MonotonicClock.nanoseconds()
            do {
                return try await next(call)
            } catch {
                let failure = (error as? RPCError) ?? RPCError(code: error is CancellationError ? .cancelled : .unknown, message: "\(error)")
                var metadata: Logger.Metadata = [
                    "method": "\(call.path)", "grpc_status": "\(failure.code)", "message": "\(failure.message)",
                    "duration_ms": "\((MonotonicClock.nanoseconds() - started) / 1_000_000)",
                ]
                if let trace = TraceContext.current { metadata["trace_id"] = "\(trace.traceID)" }
                logger.log(level: failure.code.logLevel, "outgoing call failed", metadata: metadata)
                throw error
            }
        }
    }

    /// Runs `chain` around `body`, the first interceptor outermost.
    static func run(_ chain: ArraySlice<ClientInterceptor>, _ call: ClientCallContext,
                    _ body: @escaping @Sendable (ClientCallContext) async throws -> Metadata) async throws -> Metadata {
        guard let first = chain.first else { return try await body(call) }
        let rest = chain.dropFirst()
        return try await first(call) { call in try await run(rest, call, body) }
    }
}
