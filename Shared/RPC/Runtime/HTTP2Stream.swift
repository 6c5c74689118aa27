/// One HTTP/2 request stream on the server: what was received, the handler running for it, and
/// the response being sent. Touched only on its connection's loop.
final class HTTP2Stream {
    enum Kind { case undecided, grpc, rest }

    let id: Int32
    var kind: Kind = .undecided
    var method = ""
    var path = ""
    var contentType = ""
    var authority = ""
    var timeoutNanoseconds: Int64?
    var traceparent: String?
    var metadata = Metadata()
    var restHeaders: [(name: String, value: String)] = []
    var headerBytes = 0
    var reader: GRPCMessageReader?
    /// A bidirectional call's requests, read by its handler as they arrive (over `bodyStream`).
    var requestStream: RawRequestStream?
    var body: [UInt8] = []
    var grpcMethod: RPCServiceRegistry.Method?
    /// A response was already decided (error or complete); later input is ignored.
    var answered = false
    var requestComplete = false
    /// nghttp2 closed the stream (reset, or both sides done): it must never start a handler.
    var closed = false
    /// Reset the stream (NO_ERROR) once the early response is sent.
    var resetAfterResponse = false
    var startedAt: Int64 = 0
    /// When request bytes last arrived (the body timeout).
    var lastInputAt: Int64 = 0
    /// The `content-length` the client declared (saturating), if any.
    var declaredLength: Int?
    /// A `grpc-encoding` other than identity (none is supported).
    var encoding: String?
    /// The route's body limit and the answer past it (REST).
    var bodyLimit = 0
    var bodyRefusal: (@Sendable () -> HTTPResponse)?
    /// The router's match for the request's head, handed to `respond`.
    var routeMatch: HTTPRouter.Match?
    /// Request bytes this stream holds toward the connection's buffer budget.
    var bufferedRequestBytes = 0
    /// A streaming route's body; open (taking DATA) until its end or until it is stopped;
    /// `streamedBytes` of it arrived so far.
    var bodyStream: HTTPBodyStream?
    var bodyOpen = false
    var streamedBytes = 0
    /// A streaming route's handler is running (it was started on the request's head).
    var streamsBody = false
    /// The response body is being produced while it is sent (REST).
    var streamingResponse = false

    var task: Task<Void, Never>?
    var deadlineTimer: LoopTimer?

    // Response state.
    var responseStarted = false
    var outbound: [UInt8] = []
    var outboundOffset = 0
    var outboundFinished = false
    /// Trailers to send after the data; nil for plain HTTP responses.
    var trailers: [(name: String, value: String)]?
    var trailersAreOK = false
    var deferred = false
    var writeWaiters: [CheckedContinuation<Void, any Error>] = []
    var metricLabel = ""
    /// The gRPC method's metrics index (0: unknown).
    var methodIndex = 0
    var isGRPCContentType = false

    init(id: Int32) {
        self.id = id
    }

    var bufferedBytes: Int { outbound.count - outboundOffset }

    func enqueue(_ bytes: [UInt8]) {
        if outboundOffset == outbound.count {
            outbound = bytes  // the common case: nothing pending, take the buffer as it is
            outboundOffset = 0
            return
        }
        outbound.append(contentsOf: bytes)
    }

    /// Releases writers waiting for room; with an error when the stream is over.
    func releaseWriters(_ error: (any Error)?) {
        let waiters = writeWaiters
        writeWaiters.removeAll()
        for waiter in waiters {
            if let error { waiter.resume(throwing: error) } else { waiter.resume() }
        }
    }
}
