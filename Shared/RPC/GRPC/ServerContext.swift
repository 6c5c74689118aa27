import Glibc
import TalkMeshBase
import TalkMeshMessages

/// What a handler knows about its call.
public struct ServerContext: Sendable {
    /// The method's `:path`, e.g. `/grpc.health.v1.Health/Check`.
    public var path: String
    /// Custom metadata the client sent (`-bin` values decoded).
    public var metadata: Metadata
    /// When the call must be finished, in monotonic nanoseconds; nil without `grpc-timeout`.
    public var deadline: Int64?
    /// The peer's address, `ip:port`.
    public var peer: String
    /// The handler's span, a child of the caller's `traceparent`; nil when the caller sent none
    /// (a client call made from the handler then starts a new trace).
    public var trace: TraceContext?

    /// Creates a context.
    public init(path: String, metadata: Metadata = Metadata(), deadline: Int64? = nil, peer: String = "") {
        self.path = path
        self.metadata = metadata
        self.deadline = deadline
        self.peer = peer
    }

    /// The time left before the deadline, in nanoseconds; nil without a deadline.
    public var remainingNanoseconds: Int64? {
        deadline.map { $0.subtractingReportingOverflow(MonotonicClock.nanoseconds()).partialValue }
    }
}

/// Sends the responses of a server-streaming call, waiting while the client reads slower than
/// the handler writes (the stream's buffer is bounded).
public struct ResponseWriter<Response: ProtoMessage>: Sendable {
    let raw: RawResponseWriter

    /// Sends one message; throws when the call is over (cancelled, reset, deadline passed).
    public func write(_ response: Response) async throws {
        try await raw.write(GRPCFraming.frame(response))
    }
}

/// The untyped side of `ResponseWriter`: hands framed bytes to the stream on its loop and waits
/// while the stream's buffer is over its bound. A plain value: nothing is allocated per call
/// until a handler actually writes.
struct RawResponseWriter: Sendable {
    enum Target: Sendable {
        case stream(loop: EventLoop, connectionID: UInt64, streamID: Int32)
        case closure(@Sendable ([UInt8]) async throws -> Void)
    }

    let target: Target

    init(loop: EventLoop, connectionID: UInt64, streamID: Int32) {
        target = .stream(loop: loop, connectionID: connectionID, streamID: streamID)
    }

    /// A writer that calls `write` (tests).
    init(_ write: @escaping @Sendable ([UInt8]) async throws -> Void) {
        target = .closure(write)
    }

    func write(_ bytes: [UInt8]) async throws {
        switch target {
        case .closure(let write):
            try await write(bytes)
        case .stream(let loop, let connectionID, let streamID):
            try Task.checkCancellation()
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                loop.execute {
                    guard let session = loop.http2Session(connectionID) else {
                        continuation.resume(throwing: CancellationError())
                        return
                    }
                    session.write(streamID, bytes, continuation)
                }
            }
        }
    }
}
