import CTalkMesh
import Glibc

/// The server side of one HTTP/2 connection on nghttp2 (modelled on nghttp2's
/// `examples/libevent-server.c`): callbacks only move bytes and state; complete requests are
/// handed to Swift concurrency after each read; responses come back through the loop's queue.
final class HTTP2ServerSession {
    unowned let connection: Connection
    private var session: OpaquePointer?
    private var streams: [Int32: HTTP2Stream] = [:]
    private var ready: [HTTP2Stream] = []
    private var goingAway = false
    private var goAwayTimer: LoopTimer?
    private let core: ServerCore
    /// Request bytes held by streams not yet dispatched (MAX_CONNECTION_BUFFER_BYTES).
    private var bufferedRequestBytes = 0
    /// Since when the connection has had no open stream; nil while one is open.
    private var idleSince: Int64? = MonotonicClock.nanoseconds()

    /// Streams waiting for a writer's data beyond this many buffered bytes make the writer wait.
    static let streamHighWater = 256 * 1024

    init(connection: Connection) {
        self.connection = connection
        self.core = connection.core
        var session: OpaquePointer?
        nghttp2_session_server_new2(&session, HTTP2ServerSession.callbacks, Unmanaged.passUnretained(self).toOpaque(),
                                    HTTP2ServerSession.options)
        self.session = session
        let configuration = core.configuration
        var settings = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                                   value: UInt32(configuration.maxConcurrentStreams)),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: 1 << 20),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                                   value: UInt32(configuration.maxHeaderBytes)),
        ]
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &settings, settings.count)
        nghttp2_session_set_local_window_size(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, 16 << 20)
        if core.health.isShuttingDown { goAway() }
    }

    // MARK: Input

    func receive(_ input: OpaquePointer?) {
        guard let session else { return }
        connection.callbackDepth += 1
        if let error = NGHTTP2IO.feed(session, from: input) {
            core.logger.debug("closing an HTTP/2 connection: \(error)", metadata: ["peer": "\(connection.peer)"])
            connection.callbackDepth -= 1
            connection.close()
            return
        }
        connection.callbackDepth -= 1
        dispatchReady()
        connection.scheduleFlush()
    }

    // MARK: Output

    func flush() {
        guard let session else { return }
        connection.callbackDepth += 1
        let rv = nghttp2_session_send(session)
        connection.callbackDepth -= 1
        if rv != 0 {
            connection.close()
            return
        }
        if nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0
            && connection.pendingOutput == 0 {
            connection.close()
        }
    }

    // MARK: Callbacks (thin: they move bytes and state)

    fileprivate func beginHeaders(_ streamID: Int32) {
        let stream = HTTP2Stream(id: streamID)
        stream.startedAt = MonotonicClock.nanoseconds()
        stream.lastInputAt = stream.startedAt
        streams[streamID] = stream
        idleSince = nil
    }

    fileprivate func header(_ streamID: Int32, _ name: UnsafePointer<UInt8>, _ nameLength: Int,
                            _ value: UnsafePointer<UInt8>, _ valueLength: Int) -> Int32 {
        guard let stream = streams[streamID] else { return 0 }
        stream.headerBytes += nameLength + valueLength + 32
        if stream.headerBytes > core.configuration.maxHeaderBytes {
            return Int32(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue)  // resets just this stream
        }
        let valueString = { String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self) }
        if nameLength > 0 && name[0] == UInt8(ascii: ":") {
            if bytesEqual(name, nameLength, ":path") {
                stream.path = cachedPath(value, valueLength)
            } else if bytesEqual(name, nameLength, ":method") {
                stream.method = bytesEqual(value, valueLength, "POST") ? "POST" : bytesEqual(value, valueLength, "GET") ? "GET" : valueString()
            } else if bytesEqual(name, nameLength, ":authority") {
                stream.authority = valueString()
            }
            return 0
        }
        if bytesEqual(name, nameLength, "content-type") {
            if bytesEqual(value, valueLength, "application/grpc") || bytesEqual(value, valueLength, "application/grpc+proto") {
                stream.isGRPCContentType = true
                stream.contentType = "application/grpc"
            } else {
                stream.contentType = valueString()
                stream.isGRPCContentType = stream.contentType.hasPrefix("application/grpc")
                stream.restHeaders.append(("content-type", stream.contentType))
            }
        } else if bytesEqual(name, nameLength, "content-length") {
            stream.declaredLength = Self.decimal(value, valueLength)
            stream.restHeaders.append(("content-length", valueString()))
        } else if bytesEqual(name, nameLength, "grpc-encoding") {
            if !bytesEqual(value, valueLength, "identity") { stream.encoding = valueString() }
        } else if bytesEqual(name, nameLength, "grpc-timeout") {
            stream.timeoutNanoseconds = GRPCTimeout.parse(UnsafeBufferPointer(start: value, count: valueLength)) ?? -1
        } else if bytesEqual(name, nameLength, "traceparent") {
            stream.traceparent = valueString()
            stream.restHeaders.append(("traceparent", stream.traceparent!))
        } else if bytesEqual(name, nameLength, "te") || bytesEqual(name, nameLength, "grpc-accept-encoding") {
            // Transport-level: not metadata, not needed by REST handlers.
        } else if stream.isGRPCContentType && (bytesEqual(name, nameLength, "user-agent") || bytesEqual(name, nameLength, "accept-encoding")) {
            // Kept out of gRPC metadata, as gRPC libraries do.
        } else {
            let key = String(decoding: UnsafeBufferPointer(start: name, count: nameLength), as: UTF8.self)
            let text = valueString()
            stream.restHeaders.append((key, text))
            if !key.hasPrefix("grpc-") && key != "user-agent" { stream.metadata.addWire(key: key, value: text) }
        }
        return 0
    }

    /// A non-negative decimal, saturating at Int.max (never trapping); nil when malformed.
    static func decimal(_ value: UnsafePointer<UInt8>, _ length: Int) -> Int? {
        guard length > 0 else { return nil }
        var result = 0
        for index in 0..<length {
            let byte = value[index]
            guard byte >= 0x30, byte <= 0x39 else { return nil }
            let (times, overflow1) = result.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times.addingReportingOverflow(Int(byte - 0x30))
            if overflow1 || overflow2 { return Int.max }
            result = sum
        }
        return result
    }

    /// Clients call the same few methods over and over: reuse the last path's String.
    private var lastPathBytes: [UInt8] = []
    private var lastPath = ""

    private func cachedPath(_ value: UnsafePointer<UInt8>, _ length: Int) -> String {
        if lastPathBytes.count == length && lastPathBytes.withUnsafeBufferPointer({ memcmp($0.baseAddress!, value, length) == 0 }) {
            return lastPath
        }
        lastPathBytes = Array(UnsafeBufferPointer(start: value, count: length))
        lastPath = String(decoding: lastPathBytes, as: UTF8.self)
        return lastPath
    }

    /// HEADERS complete: decide gRPC or REST and answer immediate errors (Trailers-Only).
    fileprivate func headersComplete(_ stream: HTTP2Stream) {
        if stream.isGRPCContentType {
            stream.kind = .grpc
            stream.metricLabel = stream.path
            guard stream.method == "POST" else {
                respondPlain(stream, HTTPResponse.text(405, "gRPC requires POST\n"))
                return
            }
            guard let method = core.registry.method(for: stream.path) else {
                stream.metricLabel = "unknown"
                stream.methodIndex = 0
                respondStatus(stream, RPCError(code: .unimplemented, message: "method \(stream.path) is not implemented"))
                return
            }
            stream.grpcMethod = method
            stream.methodIndex = method.index
            if let encoding = stream.encoding {
                // gRPC's compression spec: an unsupported algorithm is UNIMPLEMENTED, with what is accepted.
                respondStatus(stream, RPCError(code: .unimplemented, message: "grpc-encoding \(encoding) is not supported; use identity"),
                              extra: [("grpc-accept-encoding", "identity")])
                resetAfterResponse(stream)
                return
            }
            stream.reader = GRPCMessageReader(maxMessageBytes: core.configuration.maxReceiveMessageBytes)
            if let timeout = stream.timeoutNanoseconds {
                guard timeout >= 0 else {
                    respondStatus(stream, RPCError(code: .internal, message: "malformed grpc-timeout"))
                    return
                }
                startDeadline(stream, after: timeout)
            }
        } else if core.registry.method(for: stream.path) != nil {
            // A gRPC method called without the gRPC content type (gRPC's HTTP/2 protocol: 415).
            stream.metricLabel = "grpc-method"
            stream.kind = .rest
            respondPlain(stream, HTTPResponse.text(415, "content-type must be application/grpc\n"))
        } else {
            stream.kind = .rest
            // The route decides, from the head alone, how much body it takes.
            let policy = core.router.bodyPolicy(method: stream.method, target: stream.path, serverLimit: core.configuration.maxBodyBytes)
            stream.bodyLimit = policy.limit
            stream.bodyRefusal = policy.refusal
            if let declared = stream.declaredLength, declared > policy.limit {
                respondPlain(stream, policy.refusal())
                resetAfterResponse(stream)
            } else if policy.streams {
                // Its handler starts now (after this read) and reads the body as it arrives.
                let loop = connection.loop, connectionID = connection.id, streamID = stream.id
                stream.bodyStream = HTTPBodyStream { count in
                    loop.execute { loop.http2Session(connectionID)?.consumed(streamID, count) }
                }
                stream.streamsBody = true
                stream.bodyOpen = true
                ready.append(stream)
            }
        }
    }

    /// Every DATA byte is given back to flow control here (automatic window updates are off), at
    /// once unless a streaming handler still has to take it.
    fileprivate func data(_ streamID: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) {
        guard let stream = streams[streamID], stream.bodyOpen, let body = stream.bodyStream else {
            nghttp2_session_consume(session, streamID, count)
            receivedBuffered(streamID, bytes, count)
            return
        }
        stream.lastInputAt = MonotonicClock.nanoseconds()
        stream.streamedBytes += count
        if stream.streamedBytes > stream.bodyLimit {
            nghttp2_session_consume(session, streamID, count)
            stopBody(stream, .tooLarge(limit: stream.bodyLimit))
            return
        }
        body.deliver(Array(UnsafeBufferPointer(start: bytes, count: count)))
    }

    /// A streaming handler took `count` bytes: the client may send that much more.
    func consumed(_ streamID: Int32, _ count: Int) {
        guard let session, count > 0 else { return }
        nghttp2_session_consume(session, streamID, count)
        connection.scheduleFlush()
    }

    /// A streamed body stops (its stream closed, or the handler answered first): what waited
    /// unread goes back to the flow-control window.
    private func stopBody(_ stream: HTTP2Stream, _ error: HTTPBodyError) {
        guard stream.bodyOpen, let body = stream.bodyStream else { return }
        stream.bodyOpen = false
        let dropped = body.fail(error)
        if dropped > 0 { nghttp2_session_consume(session, stream.id, dropped) }
    }

    private func receivedBuffered(_ streamID: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) {
        guard let stream = streams[streamID], !stream.answered, !stream.streamsBody else { return }
        stream.lastInputAt = MonotonicClock.nanoseconds()
        if stream.kind != .undecided && bufferedRequestBytes + count > core.configuration.maxConnectionBufferBytes {
            refuseOverBudget(stream)
            return
        }
        switch stream.kind {
        case .grpc:
            do {
                try stream.reader?.append(UnsafeBufferPointer(start: bytes, count: count))
                hold(stream, count)
            } catch .tooLarge(let announced, let limit) {
                stream.reader = nil
                respondStatus(stream, RPCError(code: .resourceExhausted,
                    message: "received message larger than max (\(announced) vs. \(limit))"))
                resetAfterResponse(stream)
            } catch {
                stream.reader = nil
                respondStatus(stream, RPCError(code: .internal, message: "compressed messages are not supported (no grpc-encoding negotiated)"))
                resetAfterResponse(stream)
            }
        case .rest:
            if stream.body.count + count > stream.bodyLimit {
                respondPlain(stream, stream.bodyRefusal?() ?? HTTPResponse.text(413, "request body too large\n"))
                stream.body = []
                release(stream)
                resetAfterResponse(stream)
                return
            }
            stream.body.append(contentsOf: UnsafeBufferPointer(start: bytes, count: count))
            hold(stream, count)
        case .undecided:
            break
        }
    }

    private func hold(_ stream: HTTP2Stream, _ count: Int) {
        stream.bufferedRequestBytes += count
        bufferedRequestBytes += count
    }

    /// The stream's buffered request bytes leave the budget (dispatched, refused or closed).
    private func release(_ stream: HTTP2Stream) {
        bufferedRequestBytes -= stream.bufferedRequestBytes
        stream.bufferedRequestBytes = 0
    }

    private func refuseOverBudget(_ stream: HTTP2Stream) {
        abandonRequest(stream, RPCError(code: .resourceExhausted, message: "too many request bytes buffered on this connection"),
                       HTTPResponse.text(503, "too many request bytes buffered on this connection\n"))
    }

    /// Drops what a stream's request buffered, answers (gRPC status or HTTP response by the
    /// stream's kind) and resets the stream so the client stops sending.
    private func abandonRequest(_ stream: HTTP2Stream, _ error: RPCError, _ response: HTTPResponse) {
        stream.reader = nil
        stream.body = []
        release(stream)
        if stream.kind == .grpc { respondStatus(stream, error) } else { respondPlain(stream, response) }
        resetAfterResponse(stream)
    }

    /// The body timeout for streams whose request is still arriving, and the idle timeout for a
    /// connection with no stream. Called by the loop's housekeeping sweep.
    func sweep(now: Int64) {
        let configuration = core.configuration
        if let idleSince, configuration.idleTimeoutNanoseconds > 0, !goingAway, now - idleSince > configuration.idleTimeoutNanoseconds {
            core.logger.debug("closing an idle HTTP/2 connection", metadata: ["peer": "\(connection.peer)"])
            connection.goAway()
            return
        }
        for stream in streams.values where !stream.requestComplete && !stream.answered
            && now - stream.lastInputAt > configuration.bodyTimeoutNanoseconds {
            if stream.streamsBody {
                // Its handler hears it from the body stream and answers.
                if stream.bodyOpen && stream.bodyStream?.waiting == 0 { stopBody(stream, .timedOut) }
                continue
            }
            abandonRequest(stream, RPCError(code: .deadlineExceeded, message: "the request stalled for longer than the body timeout"),
                           HTTPResponse.text(408, "request body timeout\n"))
        }
        connection.scheduleFlush()
    }

    fileprivate func endOfRequest(_ streamID: Int32) {
        guard let stream = streams[streamID] else { return }
        if stream.streamsBody {
            stream.requestComplete = true
            if stream.bodyOpen { stream.bodyStream?.finish() }
            stream.bodyOpen = false
            return
        }
        guard !stream.answered else { return }
        stream.requestComplete = true
        ready.append(stream)
    }

    fileprivate func streamClosed(_ streamID: Int32, errorCode: UInt32) {
        guard let stream = streams.removeValue(forKey: streamID) else { return }
        stream.closed = true
        release(stream)
        stopBody(stream, .aborted)
        if streams.isEmpty { idleSince = MonotonicClock.nanoseconds() }
        stream.deadlineTimer = nil
        // A stream can close before its handler was dispatched (HEADERS and RST_STREAM in one
        // read): it stays in `ready`, and `closed` keeps dispatchReady from starting it.
        if !stream.answered || !stream.outboundFinished {
            stream.task?.cancel()
            if !stream.answered {
                stream.answered = true
                if stream.task != nil { recordFailure(stream, RPCError(code: .cancelled, message: "the client reset the stream")) }
            }
        }
        stream.releaseWriters(CancellationError())
    }

    /// Moves response bytes into nghttp2's frame buffer; defers when a stream has nothing yet.
    fileprivate func readResponse(_ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>, _ length: Int,
                                  _ flags: UnsafeMutablePointer<UInt32>) -> Int {
        guard let stream = streams[streamID] else { return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue) }
        let count = min(length, stream.bufferedBytes)
        if count > 0 {
            stream.outbound.withUnsafeBufferPointer { source in
                buffer.update(from: source.baseAddress! + stream.outboundOffset, count: count)
            }
            stream.outboundOffset += count
            if stream.outboundOffset == stream.outbound.count {
                stream.outbound.removeAll(keepingCapacity: stream.outbound.count <= 64 * 1024)
                stream.outboundOffset = 0
            }
            if !stream.writeWaiters.isEmpty && stream.bufferedBytes < HTTP2ServerSession.streamHighWater {
                stream.releaseWriters(nil)
            }
        }
        if stream.bufferedBytes == 0 {
            if stream.outboundFinished {
                flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
                if let trailers = stream.trailers {
                    flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
                    submitTrailers(stream, trailers)
                }
            } else if count == 0 {
                stream.deferred = true
                return Int(NGHTTP2_ERR_DEFERRED.rawValue)
            }
        }
        return count
    }

    // MARK: Dispatch to Swift concurrency

    private func dispatchReady() {
        guard !ready.isEmpty else { return }
        let batch = ready
        ready.removeAll(keepingCapacity: true)
        for stream in batch where !stream.answered && !stream.closed {
            release(stream)  // the handler owns the request now (a streaming one reads it as it comes)
            switch stream.kind {
            case .grpc: dispatchGRPC(stream)
            case .rest: dispatchREST(stream)
            case .undecided: break
            }
        }
    }

    private func dispatchGRPC(_ stream: HTTP2Stream) {
        guard let method = stream.grpcMethod, let reader = stream.reader else { return }
        stream.reader = nil
        guard let request = reader.firstMessage, reader.messageCount == 1, !reader.hasPartialMessage else {
            respondStatus(stream, RPCError(code: .internal, message: reader.messageCount == 0 || reader.hasPartialMessage
                ? "the request ended without a complete message" : "a \(method.kind) call takes one request message"))
            return
        }
        let deadline = stream.timeoutNanoseconds.map { MonotonicClock.deadline(after: $0, from: stream.startedAt) }
        var context = ServerContext(path: stream.path, metadata: stream.metadata, deadline: deadline, peer: connection.peer)
        if let traceparent = stream.traceparent, let parent = TraceContext.parse(traceparent: traceparent) {
            context.trace = parent.child()
        }
        let loop = connection.loop
        let connectionID = connection.id
        let streamID = stream.id
        let writer = RawResponseWriter(loop: loop, connectionID: connectionID, streamID: streamID)
        let run = method.run
        // Runs inline on the loop thread until the handler first suspends: a handler that does
        // not suspend (health, echo) completes without a thread hop.
        stream.task = Task.immediate {
            let result: Result<[UInt8]?, RPCError>
            do {
                if let trace = context.trace {
                    result = .success(try await TraceContext.$current.withValue(trace) { try await run(request, context, writer) })
                } else {
                    result = .success(try await run(request, context, writer))
                }
            } catch {
                result = .failure(RPCError(from: error))
            }
            if loop.inLoop {
                // Finished before suspending: still inside dispatchReady on the loop thread,
                // outside nghttp2's callbacks, so complete directly (no queue, no closure).
                loop.http2Session(connectionID)?.complete(streamID, result)
            } else {
                loop.execute {
                    loop.http2Session(connectionID)?.complete(streamID, result)
                }
            }
        }
    }

    private func dispatchREST(_ stream: HTTP2Stream) {
        var request = HTTPRequest(method: stream.method, target: stream.path, headers: stream.restHeaders, body: stream.body)
        if !stream.authority.isEmpty { request.headers.append(("host", stream.authority)) }
        request.peer = connection.peer
        request.isSecure = connection.core.tls != nil
        request.bodyStream = stream.bodyStream
        stream.body = []
        let router = core.router
        let loop = connection.loop
        let connectionID = connection.id
        let streamID = stream.id
        stream.task = Task.immediate {
            let (response, route) = await router.respond(to: request)
            loop.execute {
                loop.http2Session(connectionID)?.completeREST(streamID, response, route: route)
            }
        }
    }

    // MARK: Completions (on the loop)

    func write(_ streamID: Int32, _ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        guard let stream = streams[streamID], !stream.answered else {
            continuation.resume(throwing: CancellationError())
            return
        }
        startResponse(stream)
        enqueue(stream, bytes, continuation)
    }

    func complete(_ streamID: Int32, _ result: Result<[UInt8]?, RPCError>) {
        guard let stream = streams[streamID], !stream.answered else { return }
        switch result {
        case .success(let framed):
            if let framed {
                startResponse(stream)
                stream.enqueue(framed)
            }
            if stream.responseStarted {
                finishResponse(stream, trailers: nil)
            } else {
                respondStatus(stream, nil)
            }
        case .failure(let error):
            if stream.responseStarted {
                finishResponse(stream, trailers: statusHeaders(error))
                recordFailure(stream, error)
            } else {
                respondStatus(stream, error)
            }
        }
        connection.scheduleFlush()
    }

    func completeREST(_ streamID: Int32, _ response: HTTPResponse, route: String) {
        guard let stream = streams[streamID], !stream.answered else { return }
        stream.metricLabel = route
        if stream.streamsBody && !stream.requestComplete {
            // Answered before the body's end (a refusal): the client is asked to stop sending.
            stopBody(stream, .aborted)
            resetAfterResponse(stream)
        }
        if let produce = response.streamBody, stream.method != "HEAD" {
            respondStreamed(stream, response, produce)
        } else {
            respondPlain(stream, response)
        }
        connection.scheduleFlush()
    }

    /// Sends the head now and the body as the producer writes it (a download, server-sent events).
    private func respondStreamed(_ stream: HTTP2Stream, _ response: HTTPResponse,
                                 _ produce: @escaping @Sendable (HTTPBodyWriter) async throws -> Void) {
        stream.answered = true
        stream.responseStarted = true
        stream.streamingResponse = true
        stream.deadlineTimer = nil
        stream.trailers = nil
        var headers: [(name: String, value: String)] = [(":status", String(response.status))]
        headers += response.headers.map { ($0.name.lowercased(), $0.value) }
        let block = HeaderBlock(headers)
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
        block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, &provider) }
        block.free()
        recordHTTP(stream, status: response.status)
        let loop = connection.loop, connectionID = connection.id, streamID = stream.id
        stream.task = HTTPBodyWriter.run(on: loop, produce, write: { bytes, continuation in
            guard let session = loop.http2Session(connectionID) else {
                continuation.resume(throwing: CancellationError())
                return
            }
            session.streamedWrite(streamID, bytes, continuation)
        }, ended: { failed in
            loop.http2Session(connectionID)?.streamedEnd(streamID, failed: failed)
        })
    }

    private func streamedWrite(_ streamID: Int32, _ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        guard let stream = streams[streamID], stream.streamingResponse, !stream.outboundFinished else {
            continuation.resume(throwing: CancellationError())
            return
        }
        enqueue(stream, bytes, continuation)
    }

    /// Queues response bytes; the writer waits while the stream holds more than its high water.
    private func enqueue(_ stream: HTTP2Stream, _ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        stream.enqueue(bytes)
        if stream.bufferedBytes > HTTP2ServerSession.streamHighWater {
            stream.writeWaiters.append(continuation)
        } else {
            continuation.resume()
        }
        resume(stream)
        connection.scheduleFlush()
    }

    private func streamedEnd(_ streamID: Int32, failed: Bool) {
        guard let stream = streams[streamID], !stream.outboundFinished else { return }
        if failed {
            // The body cannot be completed: the reset tells the client it is cut short.
            nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, NGHTTP2_INTERNAL_ERROR.rawValue)
        } else {
            stream.outboundFinished = true
            resume(stream)
        }
        connection.scheduleFlush()
    }

    // MARK: Responses

    /// Sends the response headers with a data provider; data follows as it is enqueued.
    private func startResponse(_ stream: HTTP2Stream) {
        guard !stream.responseStarted else { return }
        stream.responseStarted = true
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
        StaticHeaders.grpcResponse.withUnsafeBufferPointer { headers in
            _ = nghttp2_submit_response(session, stream.id, headers.baseAddress, headers.count, &provider)
        }
    }

    private func finishResponse(_ stream: HTTP2Stream, trailers: [(name: String, value: String)]?) {
        stream.answered = true
        stream.deadlineTimer = nil
        stream.outboundFinished = true
        stream.trailers = trailers ?? []
        stream.trailersAreOK = trailers == nil
        if trailers == nil { record(stream, code: .ok) }
        resume(stream)
    }

    private func resume(_ stream: HTTP2Stream) {
        if stream.deferred {
            stream.deferred = false
            nghttp2_session_resume_data(session, stream.id)
        }
    }

    private func submitTrailers(_ stream: HTTP2Stream, _ trailers: [(name: String, value: String)]) {
        if stream.trailersAreOK {
            StaticHeaders.grpcOK.withUnsafeBufferPointer { block in
                _ = nghttp2_submit_trailer(session, stream.id, block.baseAddress, block.count)
            }
            return
        }
        let block = HeaderBlock(trailers)
        block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_trailer(session, stream.id, $0.baseAddress, $0.count) }
        block.free()
    }

    private func statusHeaders(_ error: RPCError) -> [(name: String, value: String)] {
        var headers = [("grpc-status", error.code.statusText)]
        if !error.message.isEmpty { headers.append(("grpc-message", PercentEncoding.encode(error.message))) }
        return headers
    }

    /// A gRPC status with no response message: Trailers-Only (one HEADERS frame with END_STREAM),
    /// or trailers after the data already sent.
    private func respondStatus(_ stream: HTTP2Stream, _ error: RPCError?, extra: [(name: String, value: String)] = []) {
        guard !stream.answered else { return }
        if stream.responseStarted {
            finishResponse(stream, trailers: error.map(statusHeaders))
            if let error { recordFailure(stream, error) }
            return
        }
        stream.answered = true
        stream.deadlineTimer = nil
        stream.responseStarted = true
        stream.outboundFinished = true
        var headers: [(name: String, value: String)] = [(":status", "200"), ("content-type", "application/grpc")]
        headers += error.map(statusHeaders) ?? [("grpc-status", "0")]
        headers += extra
        let block = HeaderBlock(headers)
        block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, nil) }
        block.free()
        if let error {
            recordFailure(stream, error)
            stream.task?.cancel()
        } else {
            record(stream, code: .ok)
        }
        connection.scheduleFlush()
    }

    private func respondPlain(_ stream: HTTP2Stream, _ response: HTTPResponse) {
        guard !stream.answered else { return }
        stream.answered = true
        stream.responseStarted = true
        stream.deadlineTimer = nil
        var headers: [(name: String, value: String)] = [(":status", String(response.status))]
        headers += response.headers.map { ($0.name.lowercased(), $0.value) }
        if response.streamBody == nil { headers.append(("content-length", String(response.body.count))) }
        let block = HeaderBlock(headers)
        if response.body.isEmpty || stream.method == "HEAD" || response.streamBody != nil {
            block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, nil) }
        } else {
            stream.outbound = response.body
            stream.outboundFinished = true
            var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
            block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, &provider) }
        }
        block.free()
        if stream.kind == .grpc { stream.metricLabel = "grpc-method" }
        recordHTTP(stream, status: response.status)
        connection.scheduleFlush()
    }

    /// After answering early, asks the client to stop sending the rest of the request: an
    /// RST_STREAM(NO_ERROR) once the response's last frame is out (sooner, nghttp2 would drop the
    /// response itself).
    private func resetAfterResponse(_ stream: HTTP2Stream) {
        stream.resetAfterResponse = true
    }

    fileprivate func frameSent(_ streamID: Int32, endStream: Bool) {
        guard endStream, let stream = streams[streamID], stream.resetAfterResponse, !stream.requestComplete else { return }
        stream.resetAfterResponse = false
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, NGHTTP2_NO_ERROR.rawValue)
    }

    private func startDeadline(_ stream: HTTP2Stream, after nanoseconds: Int64) {
        let streamID = stream.id
        stream.deadlineTimer = LoopTimer(loop: connection.loop, after: max(nanoseconds, 0)) { [weak self] in
            guard let self, let stream = self.streams[streamID], !stream.answered else { return }
            stream.task?.cancel()
            self.respondStatus(stream, RPCError(code: .deadlineExceeded, message: "deadline exceeded"))
            if !stream.requestComplete { self.resetAfterResponse(stream) }
            stream.releaseWriters(CancellationError())
            self.connection.scheduleFlush()
            self.connection.loop.afterWork()
        }
    }

    private func record(_ stream: HTTP2Stream, code: RPCError.Code) {
        let seconds = Double(MonotonicClock.nanoseconds() - stream.startedAt) / 1e9
        core.metrics.recordGRPC(shard: connection.loop.index, method: stream.methodIndex, code: code.rawValue, seconds: seconds)
    }

    /// A failed call: counted, and logged once.
    private func recordFailure(_ stream: HTTP2Stream, _ error: RPCError) {
        record(stream, code: error.code)
        core.logFailedCall(path: stream.path, error: error, traceparent: stream.traceparent, peer: connection.peer)
    }

    private func recordHTTP(_ stream: HTTP2Stream, status: Int) {
        let seconds = Double(MonotonicClock.nanoseconds() - stream.startedAt) / 1e9
        core.metrics.record(shard: connection.loop.index, kind: .http, method: stream.metricLabel.isEmpty ? "other" : stream.metricLabel,
                            status: String(status), seconds: seconds)
    }

    // MARK: Lifecycle

    /// Graceful shutdown: a shutdown notice now, the final GOAWAY (last processed stream) after
    /// about one round trip, then close once the streams in flight are done.
    func goAway() {
        guard !goingAway, let session else { return }
        goingAway = true
        nghttp2_submit_shutdown_notice(session)
        connection.scheduleFlush()
        goAwayTimer = LoopTimer(loop: connection.loop, after: 500_000_000) { [weak self] in
            guard let self, let session = self.session else { return }
            nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nghttp2_session_get_last_proc_stream_id(session),
                                  NGHTTP2_NO_ERROR.rawValue, nil, 0)
            self.flush()
        }
    }

    func teardown() {
        goAwayTimer = nil
        for stream in streams.values {
            stream.task?.cancel()
            stream.deadlineTimer = nil
            stream.releaseWriters(CancellationError())
        }
        streams.removeAll()
        ready.removeAll()
        if let session { nghttp2_session_del(session) }
        session = nil
    }

    // MARK: nghttp2 glue

    private static func from(_ pointer: UnsafeMutableRawPointer?) -> HTTP2ServerSession {
        Unmanaged<HTTP2ServerSession>.fromOpaque(pointer!).takeUnretainedValue()
    }

    private static let readCallback: nghttp2_data_source_read_callback = { _, streamID, buffer, length, flags, _, userData in
        from(userData).readResponse(streamID, buffer!, length, flags!)
    }

    nonisolated(unsafe) private static let options: OpaquePointer = {
        var options: OpaquePointer?
        nghttp2_option_new(&options)
        // Clients may open many streams at once; nghttp2's default cap on the
        // concurrent-stream queue is generous but we also bound it by SETTINGS.
        nghttp2_option_set_max_outbound_ack(options, 10_000)
        // Flow control follows the application: `data` gives bytes back as handlers take them.
        nghttp2_option_set_no_auto_window_update(options, 1)
        return options!
    }()

    nonisolated(unsafe) private static let callbacks: OpaquePointer = {
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        nghttp2_session_callbacks_set_send_callback(callbacks) { _, data, length, _, userData in
            NGHTTP2IO.send(from(userData).connection.bev, data, length)
        }
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks) { _, frame, userData in
            let frame = frame!.pointee
            if frame.hd.type == UInt8(NGHTTP2_HEADERS.rawValue) && frame.headers.cat == NGHTTP2_HCAT_REQUEST {
                from(userData).beginHeaders(frame.hd.stream_id)
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_header_callback(callbacks) { _, frame, name, nameLength, value, valueLength, _, userData in
            let frame = frame!.pointee
            guard frame.hd.type == UInt8(NGHTTP2_HEADERS.rawValue), frame.headers.cat == NGHTTP2_HCAT_REQUEST else { return 0 }
            return from(userData).header(frame.hd.stream_id, name!, nameLength, value!, valueLength)
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks) { _, frame, userData in
            let frame = frame!.pointee
            let session = from(userData)
            let endStream = frame.hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
            switch UInt32(frame.hd.type) {
            case NGHTTP2_HEADERS.rawValue:
                guard let stream = session.streams[frame.hd.stream_id] else { return 0 }
                if frame.headers.cat == NGHTTP2_HCAT_REQUEST { session.headersComplete(stream) }
                if endStream { session.endOfRequest(frame.hd.stream_id) }
            case NGHTTP2_DATA.rawValue:
                if endStream { session.endOfRequest(frame.hd.stream_id) }
            default:
                break
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_send_callback(callbacks) { _, frame, userData in
            let header = frame!.pointee.hd
            if header.stream_id != 0 {
                from(userData).frameSent(header.stream_id, endStream: header.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0)
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks) { _, _, streamID, data, length, userData in
            from(userData).data(streamID, data!, length)
            return 0
        }
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks) { _, streamID, errorCode, userData in
            from(userData).streamClosed(streamID, errorCode: errorCode)
            return 0
        }
        return callbacks!
    }()
}
