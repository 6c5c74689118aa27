import Glibc
import TalkMeshBase
import TalkMeshMessages

/// Options of one call.
public struct CallOptions: Sendable {
    /// The call's deadline, from now; sent as `grpc-timeout` and enforced locally.
    public var timeoutNanoseconds: Int64?
    /// Custom metadata (`-bin` keys carry bytes).
    public var metadata = Metadata()
    /// Safe to send again after the server may have seen it: retried on UNAVAILABLE.
    public var idempotent = false

    public init(timeoutNanoseconds: Int64? = nil, metadata: Metadata = Metadata(), idempotent: Bool = false) {
        self.timeoutNanoseconds = timeoutNanoseconds
        self.metadata = metadata
        self.idempotent = idempotent
    }

    /// With a timeout in seconds.
    public static func timeout(seconds: Double, idempotent: Bool = false) -> CallOptions {
        CallOptions(timeoutNanoseconds: Int64(seconds * 1e9), idempotent: idempotent)
    }
}

/// The client services call each other with: one HTTP/2 connection per backend address, calls
/// multiplexed and balanced round robin across addresses, deadlines, cancellation, retries of
/// calls the server never saw and of idempotent calls, keepalive, TLS and mutual TLS.
public final class RPCClient: @unchecked Sendable {
    /// Everything a client is configured with.
    public struct Configuration: Sendable {
        /// `dns:///name:port`, `dns://server/name:port`, `ipv4:a:p,b:p`, `ipv6:[a]:p`, or `host:port`.
        public var target: String
        /// TLS (with ALPN h2 and server verification); nil for h2c prior knowledge.
        public var tls: ClientTLS?
        /// `:authority` and TLS server name, when they differ from the target's.
        public var authorityOverride: String?
        public var resolveIntervalNanoseconds: Int64 = 30_000_000_000
        public var connectTimeoutNanoseconds: Int64 = 5_000_000_000
        /// PING every interval while calls are open (0 disables); a PING unanswered within the
        /// timeout closes the connection and fails its calls with UNAVAILABLE.
        public var keepaliveIntervalNanoseconds: Int64 = 30_000_000_000
        public var keepaliveTimeoutNanoseconds: Int64 = 10_000_000_000
        public var keepaliveWithoutCalls = false
        public var reconnectBackoffInitialNanoseconds: Int64 = 200_000_000
        public var reconnectBackoffMaxNanoseconds: Int64 = 30_000_000_000
        public var reconnectBackoffMultiplier = 1.6
        public var reconnectBackoffJitter = 0.2
        /// Retries of idempotent calls that failed UNAVAILABLE after they were sent.
        public var maxRetries = 3
        /// Retries of calls the server never saw.
        public var maxTransparentRetries = 5
        public var retryBackoffInitialNanoseconds: Int64 = 20_000_000
        public var retryBackoffMaxNanoseconds: Int64 = 1_000_000_000
        public var maxReceiveMessageBytes = 64 << 20
        public var userAgent = "talkmesh-rpc/1"
        /// Wrap every call, the first outermost (see `ClientInterceptor`).
        public var interceptors: [ClientInterceptor] = []

        public init(target: String, tls: ClientTLS? = nil) {
            self.target = target
            self.tls = tls
        }
    }

    public let configuration: Configuration
    let loop: EventLoop
    private let balancer: LoadBalancer
    /// The target as a client span's `network.peer.address`, encoded once.
    private let targetSpanAttribute: [UInt8]

    /// Creates a client on `loop` (a server's loop in a service) or on a loop thread of its own.
    public init(configuration: Configuration, loop: EventLoop? = nil) throws {
        let target = try ClientTarget(configuration.target)
        self.configuration = configuration
        targetSpanAttribute = RPCSpans.peerAttribute(configuration.target)
        self.loop = loop ?? EventLoop.startThread()
        let balancer = LoadBalancer(target: target, configuration: configuration, loop: self.loop)
        self.balancer = balancer
        self.loop.execute { balancer.start() }
    }

    deinit {
        let balancer = self.balancer
        loop.execute { balancer.close() }
    }

    /// Stops: waiting calls fail, connections drain.
    public func close() {
        let balancer = self.balancer
        loop.execute { balancer.close() }
    }

    /// Each backend address and its connectivity state.
    public func addresses() async -> [(address: String, state: String)] {
        let balancer = self.balancer
        return await withCheckedContinuation { continuation in
            loop.execute { continuation.resume(returning: balancer.snapshot()) }
        }
    }

    // MARK: Unary

    /// Calls a unary method and returns its response.
    public func unary<Request, Response>(_ method: MethodDescriptor<Request, Response>, _ request: Request,
                                         options: CallOptions = CallOptions()) async throws -> Response {
        try await unaryCall(method, request, options: options).message
    }

    /// Calls a unary method and returns its response with the server's metadata.
    public func unaryCall<Request, Response>(_ method: MethodDescriptor<Request, Response>, _ request: Request,
                                             options: CallOptions = CallOptions()) async throws -> ClientResponse<Response> {
        let frame = GRPCFraming.frame(request)
        let raw = try await intercepted(method.path, .unary, options) { options in
            let response = try await self.sendUnary(path: method.path, frame: frame, options: options)
            return (response, response.initialMetadata)
        }
        do {
            return ClientResponse(message: try Response(serializedBytes: raw.message),
                                  initialMetadata: raw.initialMetadata, trailingMetadata: raw.trailingMetadata)
        } catch {
            throw RPCError(code: .internal, message: "could not decode the response: \(error)")
        }
    }

    /// One unary call with its retries, as it leaves (after the interceptors).
    private func sendUnary(path: String, frame: [UInt8], options: CallOptions) async throws -> ClientResponse<[UInt8]> {
        let options = Self.passingTraceState(options)
        let deadline = options.timeoutNanoseconds.map { MonotonicClock.deadline(after: $0) }
        return try await withClientSpan(path) { traceparent in
            try await withRetries(options: options, deadline: deadline) {
                try await self.attemptUnary(path: path, frame: frame, options: options, deadline: deadline, traceparent: traceparent)
            }
        }
    }

    private func attemptUnary(path: String, frame: [UInt8], options: CallOptions, deadline: Int64?,
                              traceparent: String) async throws -> ClientResponse<[UInt8]> {
        let box = CallBox()
        let loop = self.loop
        let balancer = self.balancer
        let maxBytes = configuration.maxReceiveMessageBytes
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<ClientResponse<[UInt8]>, any Error>) in
                loop.execute {
                    let call = ClientCall(path: path, request: frame, metadata: options.metadata, deadline: deadline,
                                          traceparent: traceparent, sink: .unary(continuation), maxMessageBytes: maxBytes)
                    RPCClient.begin(call, box: box, balancer: balancer, loop: loop)
                }
            }
        } onCancel: {
            loop.execute { box.cancel(balancer) }
        }
    }

    // MARK: Server streaming

    /// Calls a server-streaming method; returns once the server answered with headers (retrying
    /// as a unary call would until then). Iterate the stream for the responses.
    public func serverStreaming<Request, Response>(_ method: MethodDescriptor<Request, Response>, _ request: Request,
                                                   options: CallOptions = CallOptions()) async throws -> ResponseStream<Response> {
        let frame = GRPCFraming.frame(request)
        return try await intercepted(method.path, .serverStreaming, options) { options in
            let stream: ResponseStream<Response> = try await self.openStream(path: method.path, frame: frame, options: options)
            return (stream, stream.initialMetadata)
        }
    }

    /// Opens one server-streaming call with its retries, as it leaves (after the interceptors).
    private func openStream<Response>(path: String, frame: [UInt8], options: CallOptions) async throws -> ResponseStream<Response> {
        let options = Self.passingTraceState(options)
        let deadline = options.timeoutNanoseconds.map { MonotonicClock.deadline(after: $0) }
        // The client span covers opening the stream (until the server's headers), not its life.
        return try await withClientSpan(path) { traceparent in
            try await withRetries(options: options, deadline: deadline) {
                try await self.attemptStreaming(path: path, frame: frame, options: options, deadline: deadline, traceparent: traceparent)
            }
        }
    }

    private func attemptStreaming<Response>(path: String, frame: [UInt8], options: CallOptions, deadline: Int64?,
                                            traceparent: String) async throws -> ResponseStream<Response> {
        let box = CallBox()
        let loop = self.loop
        let balancer = self.balancer
        let maxBytes = configuration.maxReceiveMessageBytes
        let (messages, continuation) = AsyncThrowingStream.makeStream(of: [UInt8].self)
        continuation.onTermination = { reason in
            if case .cancelled = reason { loop.execute { box.cancel(balancer) } }
        }
        let metadata = try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (headers: CheckedContinuation<Metadata, any Error>) in
                loop.execute {
                    let call = ClientCall(path: path, request: frame, metadata: options.metadata, deadline: deadline, traceparent: traceparent,
                                          sink: .streaming(headers: headers, messages: continuation), maxMessageBytes: maxBytes)
                    RPCClient.begin(call, box: box, balancer: balancer, loop: loop)
                }
            }
        } onCancel: {
            loop.execute { box.cancel(balancer) }
        }
        return ResponseStream(messages: messages, initialMetadata: metadata, box: box, loop: loop)
    }

    // MARK: Shared

    /// The options with the current trace's `tracestate` in the metadata (unless already there).
    static func passingTraceState(_ options: CallOptions) -> CallOptions {
        guard let state = TraceContext.current?.traceState, options.metadata.first("tracestate") == nil else { return options }
        var options = options
        options.metadata.add("tracestate", .string(state))
        return options
    }

    /// Runs `body` in the call's client span (one per call, around its attempts), giving it the
    /// `traceparent` to send: the server's span is the client span's child.
    private func withClientSpan<T>(_ path: String, _ body: (String) async throws -> T) async throws -> T {
        let span = RPCSpans.client(path: path, target: targetSpanAttribute)
        do {
            let result = try await body((span?.trace ?? TraceContext.current?.child() ?? TraceContext.root()).traceparent)
            RPCSpans.end(span, code: nil)
            return result
        } catch {
            RPCSpans.end(span, code: (error as? RPCError)?.code ?? .unknown)
            throw error
        }
    }

    /// Runs the configured interceptors around `send`, which makes the call as it leaves with the
    /// options they settled on and returns its result with the server's initial metadata. With no
    /// interceptor, `send` runs directly.
    private func intercepted<T: Sendable>(_ path: String, _ kind: MethodKind, _ options: CallOptions,
                                          _ send: @escaping @Sendable (CallOptions) async throws -> (T, Metadata)) async throws -> T {
        guard !configuration.interceptors.isEmpty else { return try await send(options).0 }
        let result = Locked<T?>(nil)
        _ = try await ClientInterceptors.run(configuration.interceptors[...], ClientCallContext(path: path, kind: kind, options: options)) { call in
            let (value, metadata) = try await send(call.options)
            result.withLock { $0 = value }
            return metadata
        }
        guard let value = result.withLock({ $0 }) else {
            throw RPCError(code: .internal, message: "a client interceptor answered \(path) without calling the server")
        }
        return value
    }

    private static func begin(_ call: ClientCall, box: CallBox, balancer: LoadBalancer, loop: EventLoop) {
        box.call = call
        if box.cancelled {
            call.fail(AttemptFailure(error: RPCError(code: .cancelled, message: "the call was cancelled"), transparent: false))
            return
        }
        if let deadline = call.deadline {
            call.deadlineTimer = LoopTimer(loop: loop, after: max(0, deadline - MonotonicClock.nanoseconds())) { [weak call, weak balancer] in
                guard let call, let balancer else { return }
                balancer.abandon(call, RPCError(code: .deadlineExceeded, message: "deadline exceeded"))
            }
        }
        balancer.submit(call)
    }

    /// Retries transparent failures (never seen by a server) and, for idempotent calls,
    /// UNAVAILABLE after sending; jittered exponential backoff, never past the deadline.
    private func withRetries<T>(options: CallOptions, deadline: Int64?, _ attempt: () async throws -> T) async throws -> T {
        var transparentRetries = 0
        var retries = 0
        while true {
            do {
                return try await attempt()
            } catch let failure as AttemptFailure {
                guard failure.error.code == .unavailable else { throw failure.error }
                if failure.transparent && transparentRetries < configuration.maxTransparentRetries {
                    transparentRetries += 1
                } else if options.idempotent && retries < configuration.maxRetries {
                    retries += 1
                } else {
                    throw failure.error
                }
                let step = transparentRetries + retries - 1
                let base = min(Double(configuration.retryBackoffInitialNanoseconds) * pow(2, Double(step)),
                               Double(configuration.retryBackoffMaxNanoseconds))
                let delay = step == 0 ? 0 : Int64(base * Double.random(in: 0.5...1.0))
                if let deadline, MonotonicClock.nanoseconds() + delay >= deadline {
                    throw RPCError(code: .deadlineExceeded, message: "deadline exceeded while retrying: \(failure.error.message)")
                }
                if delay > 0 { try await Task.sleep(nanoseconds: UInt64(delay)) }
            }
        }
    }
}

/// Links a Swift task to its attempt on the loop (for cancellation). Loop-confined.
final class CallBox: @unchecked Sendable {
    var call: ClientCall?
    var cancelled = false

    func cancel(_ balancer: LoadBalancer) {
        cancelled = true
        if let call, !call.finished {
            balancer.abandon(call, RPCError(code: .cancelled, message: "the call was cancelled"))
        }
    }
}

/// The responses of a server-streaming call. Reading returns their bytes to the flow-control
/// window, so a slow reader slows the server instead of growing a buffer.
public struct ResponseStream<Response: ProtoMessage>: AsyncSequence, Sendable {
    public typealias Element = Response
    let messages: AsyncThrowingStream<[UInt8], any Error>
    /// The headers the server sent (custom metadata).
    public let initialMetadata: Metadata
    let box: CallBox
    let loop: EventLoop

    public struct AsyncIterator: AsyncIteratorProtocol {
        var inner: AsyncThrowingStream<[UInt8], any Error>.AsyncIterator
        let box: CallBox
        let loop: EventLoop

        public mutating func next() async throws -> Response? {
            guard let bytes = try await inner.next() else { return nil }
            let box = self.box
            let count = bytes.count
            loop.execute {
                if let call = box.call { call.connection?.consumed(call, bytes: count) }
            }
            do {
                return try Response(serializedBytes: bytes)
            } catch {
                throw RPCError(code: .internal, message: "could not decode a response: \(error)")
            }
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(inner: messages.makeAsyncIterator(), box: box, loop: loop)
    }
}

extension EventLoop {
    /// A loop on a thread of its own (clients outside a server).
    public static func startThread() -> EventLoop {
        let loop = EventLoop(index: 0)
        var thread = pthread_t()
        pthread_create(&thread, nil, runStandaloneLoop, Unmanaged.passRetained(loop).toOpaque())
        pthread_detach(thread)
        return loop
    }
}

private func runStandaloneLoop(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let loop = Unmanaged<EventLoop>.fromOpaque(context!).takeRetainedValue()
    ThreadName.set("rpc-client")
    loop.run()
    return nil
}
