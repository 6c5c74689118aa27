import CTalkMesh
import Glibc

/// The server side of one HTTP/1.1 connection on http-parser: keep-alive, Content-Length and
/// chunked bodies, header and body limits, pipelined requests answered in order.
final class HTTP1ServerSession {
    private struct PendingRequest {
        var request: HTTPRequest
        var keepAlive: Bool
        var receivedAt: Int64
    }

    private enum Failure {
        case headersTooLarge
        /// Over the route's body limit (413), or a 404/405 whose body is not read.
        case refused(HTTPResponse)
        case overBudget
        /// A streamed body stopped (over its limit): read no more; the handler answers.
        case bodyStopped
    }

    /// A response whose body is produced while it is sent.
    private struct StreamedResponse {
        var pending: PendingRequest
        var route: String
        var status: Int
        var chunked: Bool
        var keepAlive: Bool
        var task: Task<Void, Never>?
    }

    /// Pipelined requests parsed ahead of the one in flight; past this, reading pauses.
    static let maxQueued = 16
    /// A streamed request body waiting unread past this pauses reading; it resumes below the low mark.
    static let bodyHighWater = 256 * 1024
    static let bodyLowWater = 64 * 1024

    unowned let connection: Connection
    private let core: ServerCore
    private let parser: UnsafeMutablePointer<http_parser>
    private var url: [UInt8] = []
    private var field: [UInt8] = []
    private var value: [UInt8] = []
    private var headers: [(name: String, value: String)] = []
    private var body: [UInt8] = []
    private var headerBytes = 0
    private var failure: Failure?
    private var queue: [PendingRequest] = []
    private var inFlight = false
    private var closeAfterFlush = false
    private var goingAway = false
    private var messageStartedAt: Int64 = 0
    /// Bounds how long a request's head may take to arrive (slow-header clients).
    private var headerTimer: LoopTimer?
    /// The current request's body limit and the answer past it, decided from its head.
    private var bodyLimit = 0
    private var bodyRefusal: @Sendable () -> HTTPResponse = { HTTPResponse.text(413, "request body too large\n") }
    /// Between the end of a request's head and the end of its body.
    private var inBody = false
    /// Between a request's first byte and its end.
    private var inMessage = false
    /// Body bytes of the requests waiting in `queue`.
    private var queuedBytes = 0
    private var readPaused = false
    private var lastActivityAt = MonotonicClock.nanoseconds()
    /// Strictness the parser lacks: the head's line ends, and the CRLF after each chunk's data.
    private var headScanner = HTTP1HeadScanner()
    /// Where the parser was paused to check a position: after a chunk's data, or a message's end.
    private enum Boundary { case chunkEnd, messageEnd, streamStart }
    private var boundary: Boundary?
    /// The last byte of the previous read (a chunk's CR may end one read and its LF start the next).
    private var previousByte: UInt8 = 0
    private var lastChunkSize: UInt64 = 0
    /// The current message's body, when its route streams it, and how much of it arrived.
    private var bodyStream: HTTPBodyStream?
    private var streamedBytes = 0
    /// A streaming request parsed up to its head, to start once the handler in flight is done.
    private var awaitingTurn: PendingRequest?
    /// The streaming request in flight whose body is still arriving (it cannot be kept alive if
    /// answered before the body's end).
    private var bodyOpen = false
    private var streamed: StreamedResponse?
    private var writeWaiters: [CheckedContinuation<Void, any Error>] = []

    init(connection: Connection) {
        self.connection = connection
        self.core = connection.core
        parser = .allocate(capacity: 1)
        http_parser_init(parser, HTTP_REQUEST)
        parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit {
        parser.deallocate()
    }

    func receive(_ input: OpaquePointer?) {
        let length = evbuffer_get_length(input)
        guard length > 0 else { return }
        if closeAfterFlush {  // answering an error; the rest of the input is not read
            evbuffer_drain(input, length)
            return
        }
        guard let bytes = evbuffer_pullup(input, length) else { return }
        lastActivityAt = MonotonicClock.nanoseconds()
        connection.callbackDepth += 1
        var offset = 0
        let octets = UnsafePointer(bytes)
        while offset < length && !closeAfterFlush {
            if headScanner.inHead {
                do throws(HTTP1HeadScanner.Violation) {
                    try headScanner.scan(octets, from: offset, to: length)
                } catch {
                    fail(400, error == .bareLineFeed ? "malformed HTTP/1.1 request (a line ends without CR)\n"
                                                     : "malformed HTTP/1.1 request (obsolete line folding)\n")
                    break
                }
            }
            let parsed = bytes.withMemoryRebound(to: CChar.self, capacity: length) { chars in
                http_parser_execute(parser, &HTTP1ServerSession.settings, chars + offset, length - offset)
            }
            offset += parsed
            let errno = parser.pointee.http_errno
            if let boundary, failure == nil, errno == HPE_PAUSED.rawValue {
                self.boundary = nil
                http_parser_pause(parser, 0)
                switch boundary {
                case .messageEnd:
                    headScanner.reset()
                case .streamStart:
                    guard let pending = awaitingTurn, !inFlight, queue.isEmpty else {
                        // Its turn comes when the request in flight is answered: the rest of this
                        // input stays unread until then.
                        evbuffer_drain(input, offset)
                        if offset > 0 { previousByte = octets[offset - 1] }
                        connection.callbackDepth -= 1
                        if !readPaused {
                            readPaused = true
                            connection.pauseReading()
                        }
                        startNext()
                        return
                    }
                    awaitingTurn = nil
                    startStreaming(pending)
                case .chunkEnd:
                    // Paused at the byte after a chunk's data and the one after it: they must be CRLF.
                    let lf = octets[offset - 1]
                    let cr = offset >= 2 ? octets[offset - 2] : previousByte
                    if cr != 0x0D || lf != 0x0A {
                        fail(400, "malformed HTTP/1.1 request (chunk data not followed by CRLF)\n")
                    }
                }
                continue
            }
            if let failure {
                switch failure {
                case .headersTooLarge: fail(431, "request header fields too large\n")
                case .refused(let response): fail(response)
                case .overBudget: fail(503, "too many request bytes buffered on this connection\n")
                case .bodyStopped:
                    queue.removeAll()
                    closeAfterFlush = true
                }
            } else if errno != HPE_OK.rawValue {
                let name = String(cString: http_errno_name(http_errno(rawValue: errno)))
                fail(400, "malformed HTTP/1.1 request (\(name))\n")
            } else if parser.pointee.upgrade != 0 {
                // An upgrade request (h2c, websocket) is answered as a plain request.
                http_parser_init(parser, HTTP_REQUEST)
                parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            } else if parsed == 0 {
                break
            }
        }
        previousByte = octets[length - 1]
        evbuffer_drain(input, length)
        connection.callbackDepth -= 1
        if (queue.count >= Self.maxQueued || (bodyStream?.waiting ?? 0) > Self.bodyHighWater) && !readPaused {
            readPaused = true
            connection.pauseReading()
        }
        startNext()
    }

    private func fail(_ status: Int, _ message: String) {
        fail(HTTPResponse.text(status, message))
    }

    private func fail(_ response: HTTPResponse) {
        queue.removeAll()
        queuedBytes = 0
        awaitingTurn = nil
        if let bodyStream {
            bodyStream.fail(response.status == 408 ? .timedOut : .aborted)
            self.bodyStream = nil
        }
        guard !closeAfterFlush else { return }
        closeAfterFlush = true
        if !inFlight {
            writeResponse(response, keepAlive: false, method: "GET")
            core.metrics.record(shard: connection.loop.index, kind: .http, method: "other", status: String(response.status), seconds: 0)
        }
    }

    /// Starts the next queued request unless the peer is not reading its responses: past the
    /// output bound it waits for `outputDrained`, so unread responses cannot pile up.
    private func startNext() {
        if !inFlight, queue.isEmpty, awaitingTurn != nil, !closeAfterFlush {
            // The streaming request whose head waited: start it, then parse on (its body).
            let pending = awaitingTurn!
            awaitingTurn = nil
            startStreaming(pending)
            if readPaused {
                readPaused = false
                connection.resumeReading()
            }
            return
        }
        guard !inFlight, !queue.isEmpty, !closeAfterFlush || failure == nil else { return }
        guard connection.pendingOutput <= Connection.outputHighWater else { return }
        let pending = queue.removeFirst()
        queuedBytes -= pending.request.body.count
        inFlight = true
        let router = core.router
        let loop = connection.loop
        let connectionID = connection.id
        let request = pending.request
        _ = Task.immediate {
            let (response, route) = await router.respond(to: request)
            loop.execute {
                loop.http1Session(connectionID)?.complete(response, route: route, pending: pending)
            }
        }
    }

    /// Starts a streaming route's handler once its head arrived; the body follows through its
    /// `bodyStream` as the parser reads it.
    private func startStreaming(_ pending: PendingRequest) {
        inFlight = true
        bodyOpen = bodyStream != nil
        let router = core.router
        let loop = connection.loop
        let connectionID = connection.id
        let request = pending.request
        Task {
            let (response, route) = await router.respond(to: request)
            loop.execute {
                loop.http1Session(connectionID)?.complete(response, route: route, pending: pending)
            }
        }
    }

    /// The handler took a piece of the streamed body: read more once little waits.
    func bodyConsumed() {
        lastActivityAt = MonotonicClock.nanoseconds()
        resumeReadingIfRoom()
    }

    private func complete(_ response: HTTPResponse, route: String, pending: PendingRequest) {
        if bodyOpen {
            // Answered before its body ended (a refusal): nothing more of it is read.
            bodyOpen = false
            bodyStream?.fail(.aborted)
            bodyStream = nil
            closeAfterFlush = true
            if readPaused {
                readPaused = false
                connection.resumeReading()
            }
        }
        lastActivityAt = MonotonicClock.nanoseconds()
        let keepAlive = pending.keepAlive && !goingAway && !closeAfterFlush
        if let produce = response.streamBody, pending.request.method != "HEAD" {
            startStreamedResponse(response, produce, route: route, pending: pending, keepAlive: keepAlive)
            return
        }
        inFlight = false
        writeResponse(response, keepAlive: keepAlive, method: pending.request.method)
        finishExchange(status: response.status, route: route, pending: pending, keepAlive: keepAlive)
    }

    private func finishExchange(status: Int, route: String, pending: PendingRequest, keepAlive: Bool) {
        let seconds = Double(MonotonicClock.nanoseconds() - pending.receivedAt) / 1e9
        core.metrics.record(shard: connection.loop.index, kind: .http, method: route, status: String(status), seconds: seconds)
        if !keepAlive {
            closeAfterFlush = true
            queue.removeAll()
        }
        if connection.pendingOutput == 0 && closeAfterFlush { connection.lingeringClose(); return }
        startNext()
        resumeReadingIfRoom()
    }

    private func resumeReadingIfRoom() {
        guard readPaused, queue.count < Self.maxQueued, connection.pendingOutput <= Connection.outputHighWater, !closeAfterFlush,
              awaitingTurn == nil, (bodyStream?.waiting ?? 0) <= Self.bodyLowWater else { return }
        readPaused = false
        connection.resumeReading()
    }

    private func writeResponse(_ response: HTTPResponse, keepAlive: Bool, method: String) {
        var head = "HTTP/1.1 \(response.status) \(HTTPResponse.reason(response.status))\r\n"
        for (name, value) in response.headers { head += "\(name): \(value)\r\n" }
        // A streamed body's length is the producer's header, if it gave one (else it is chunked).
        if response.streamBody == nil { head += "content-length: \(response.body.count)\r\n" }
        head += keepAlive ? "connection: keep-alive\r\n\r\n" : "connection: close\r\n\r\n"
        var bytes = Array(head.utf8)
        if method != "HEAD" && response.streamBody == nil { bytes += response.body }
        bytes.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        if !keepAlive { closeAfterFlush = true }
    }

    // MARK: Streamed responses

    private func startStreamedResponse(_ response: HTTPResponse, _ produce: @escaping @Sendable (HTTPBodyWriter) async throws -> Void,
                                       route: String, pending: PendingRequest, keepAlive: Bool) {
        var response = response
        let chunked = !response.headers.contains { $0.name.lowercased() == "content-length" }
        if chunked { response.headers.append(("transfer-encoding", "chunked")) }
        writeResponse(response, keepAlive: keepAlive, method: pending.request.method)
        let loop = connection.loop
        let connectionID = connection.id
        streamed = StreamedResponse(pending: pending, route: route, status: response.status, chunked: chunked, keepAlive: keepAlive)
        streamed?.task = HTTPBodyWriter.run(on: loop, produce, write: { bytes, continuation in
            guard let session = loop.http1Session(connectionID) else {
                continuation.resume(throwing: CancellationError())
                return
            }
            session.streamWrite(bytes, continuation)
        }, ended: { failed in
            loop.http1Session(connectionID)?.streamEnded(failed: failed)
        })
    }

    private func streamWrite(_ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        guard let streamed, !connection.closed else {
            continuation.resume(throwing: CancellationError())
            return
        }
        if streamed.chunked {
            let size = Array((String(bytes.count, radix: 16) + "\r\n").utf8)
            size.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        }
        bytes.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        if streamed.chunked { connection.write("\r\n", 2) }
        lastActivityAt = MonotonicClock.nanoseconds()
        if connection.pendingOutput > Connection.outputHighWater {
            writeWaiters.append(continuation)
        } else {
            continuation.resume()
        }
    }

    private func streamEnded(failed: Bool) {
        guard let streamed else { return }
        self.streamed = nil
        inFlight = false
        var keepAlive = streamed.keepAlive
        if failed {
            // The body cannot be completed: closing tells the client it is cut short.
            keepAlive = false
            closeAfterFlush = true
        } else if streamed.chunked {
            connection.write("0\r\n\r\n", 5)
        }
        finishExchange(status: streamed.status, route: streamed.route, pending: streamed.pending, keepAlive: keepAlive)
    }

    private func releaseWriters(_ error: (any Error)?) {
        let waiters = writeWaiters
        writeWaiters.removeAll()
        for waiter in waiters {
            if let error { waiter.resume(throwing: error) } else { waiter.resume() }
        }
    }

    func outputDrained() {
        if !writeWaiters.isEmpty && connection.pendingOutput <= Connection.outputHighWater { releaseWriters(nil) }
        if closeAfterFlush && !inFlight && connection.pendingOutput == 0 { connection.lingeringClose(); return }
        startNext()
        resumeReadingIfRoom()
    }

    /// The body timeout (the longest pause while a body arrives) and the idle timeout (no request
    /// in progress). Called by the loop's housekeeping sweep.
    func sweep(now: Int64) {
        guard !closeAfterFlush else { return }
        let configuration = core.configuration
        if inBody && now - lastActivityAt > configuration.bodyTimeoutNanoseconds {
            fail(408, "request body timeout\n")
        } else if configuration.idleTimeoutNanoseconds > 0, !inMessage, !inFlight, queue.isEmpty,
                  now - lastActivityAt > configuration.idleTimeoutNanoseconds {
            connection.close()
        }
    }

    func goAway() {
        goingAway = true
        if !inFlight && queue.isEmpty { connection.close() }
    }

    func teardown() {
        queue.removeAll()
        headerTimer = nil
        awaitingTurn = nil
        bodyStream?.fail(.aborted)
        bodyStream = nil
        streamed?.task?.cancel()
        releaseWriters(CancellationError())
    }

    private func startHeaderTimer() {
        headerTimer = LoopTimer(loop: connection.loop, after: core.configuration.handshakeTimeoutNanoseconds) { [weak self] in
            guard let self else { return }
            self.headerTimer = nil
            self.fail(408, "request header timeout\n")
            self.connection.loop.afterWork()
        }
    }

    // MARK: http-parser callbacks

    private func countHeaderBytes(_ count: Int) -> Int32 {
        headerBytes += count
        if headerBytes > core.configuration.maxHeaderBytes {
            failure = .headersTooLarge
            http_parser_pause(parser, 1)
        }
        return 0
    }

    private func flushHeader() {
        guard !field.isEmpty else { return }
        headers.append((String(decoding: field, as: UTF8.self).lowercased(), String(decoding: value, as: UTF8.self)))
        field.removeAll(keepingCapacity: true)
        value.removeAll(keepingCapacity: true)
    }

    private static func from(_ parser: UnsafeMutablePointer<http_parser>?) -> HTTP1ServerSession {
        Unmanaged<HTTP1ServerSession>.fromOpaque(parser!.pointee.data).takeUnretainedValue()
    }

    nonisolated(unsafe) private static var settings: http_parser_settings = {
        var settings = http_parser_settings()
        settings.on_message_begin = { parser in
            let session = from(parser)
            session.url.removeAll(keepingCapacity: true)
            session.headers.removeAll(keepingCapacity: true)
            session.body = []
            session.headerBytes = 0
            session.inMessage = true
            session.messageStartedAt = MonotonicClock.nanoseconds()
            session.startHeaderTimer()
            return 0
        }
        settings.on_url = { parser, data, length in
            let session = from(parser)
            data!.withMemoryRebound(to: UInt8.self, capacity: length) { session.url.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
            return session.countHeaderBytes(length)
        }
        settings.on_header_field = { parser, data, length in
            let session = from(parser)
            if session.valueStarted {  // a new field begins: the previous one is complete
                session.flushHeader()
                session.valueStarted = false
            }
            data!.withMemoryRebound(to: UInt8.self, capacity: length) { session.field.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
            return session.countHeaderBytes(length)
        }
        settings.on_header_value = { parser, data, length in
            let session = from(parser)
            session.valueStarted = true
            data!.withMemoryRebound(to: UInt8.self, capacity: length) { session.value.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
            return session.countHeaderBytes(length)
        }
        settings.on_headers_complete = { parser in
            let session = from(parser)
            session.headerTimer = nil
            session.flushHeader()
            session.valueStarted = false
            // The route decides, from the head alone, how much body it takes.
            let configuration = session.core.configuration
            let methodName = String(cString: http_method_str(http_method(rawValue: parser!.pointee.method)))
            let target = String(decoding: session.url, as: UTF8.self)
            let policy = session.core.router.bodyPolicy(method: methodName, target: target, serverLimit: configuration.maxBodyBytes)
            (session.bodyLimit, session.bodyRefusal) = (policy.limit, policy.refusal)
            session.inBody = true
            let declared = parser!.pointee.content_length
            let chunked = parser!.pointee.flags & UInt32(F_CHUNKED.rawValue) != 0
            if declared != UInt64.max && declared > UInt64(session.bodyLimit) {
                session.failure = .refused(session.bodyRefusal())
                http_parser_pause(parser, 1)
            } else if !policy.streams && declared != UInt64.max && Int(declared) + session.queuedBytes > configuration.maxConnectionBufferBytes {
                session.failure = .overBudget
                http_parser_pause(parser, 1)
            } else if policy.streams {
                session.beginStreaming(method: methodName, target: target, keepAlive: http_should_keep_alive(parser) != 0)
                http_parser_pause(parser, 1)
            }
            if session.failure == nil, session.bodyLimit > 0 || chunked,
                      session.headers.contains(where: { $0.name == "expect" && $0.value.lowercased() == "100-continue" }) {
                // The client waits for this before sending a large body (curl does, past 1 MiB).
                let interim = Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)
                interim.withUnsafeBytes { session.connection.write($0.baseAddress!, $0.count) }
            }
            return 0
        }
        settings.on_body = { parser, data, length in
            let session = from(parser)
            if let stream = session.bodyStream {
                session.streamedBytes += length
                if session.streamedBytes > session.bodyLimit {
                    stream.fail(.tooLarge(limit: session.bodyLimit))
                    session.bodyStream = nil
                    session.failure = .bodyStopped
                    http_parser_pause(parser, 1)
                    return 0
                }
                stream.deliver(Array(UnsafeRawBufferPointer(start: data, count: length)))
                return 0
            }
            if session.body.count + length > session.bodyLimit {
                session.failure = .refused(session.bodyRefusal())
                http_parser_pause(parser, 1)
                return 0
            }
            if session.queuedBytes + session.body.count + length > session.core.configuration.maxConnectionBufferBytes {
                session.failure = .overBudget
                http_parser_pause(parser, 1)
                return 0
            }
            data!.withMemoryRebound(to: UInt8.self, capacity: length) { session.body.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
            return 0
        }
        settings.on_message_complete = { parser in
            let session = from(parser)
            if let stream = session.bodyStream {
                // A streamed body's end: its request is already with its handler.
                stream.finish()
                session.bodyStream = nil
                session.bodyOpen = false
                session.inBody = false
                session.inMessage = false
                session.boundary = .messageEnd
                http_parser_pause(parser, 1)
                return 0
            }
            let methodName = String(cString: http_method_str(http_method(rawValue: parser!.pointee.method)))
            let target = String(decoding: session.url, as: UTF8.self)
            var request = HTTPRequest(method: methodName, target: target, headers: session.headers, body: session.body)
            request.peer = session.connection.peer
            request.isSecure = session.connection.core.tls != nil
            session.body = []
            session.inBody = false
            session.inMessage = false
            session.queuedBytes += request.body.count
            session.queue.append(PendingRequest(request: request, keepAlive: http_should_keep_alive(parser) != 0,
                                                receivedAt: session.messageStartedAt))
            session.boundary = .messageEnd
            http_parser_pause(parser, 1)
            return 0
        }
        settings.on_chunk_header = { parser in
            from(parser).lastChunkSize = parser!.pointee.content_length
            return 0
        }
        settings.on_chunk_complete = { parser in
            let session = from(parser)
            // The last (empty) chunk completes at the end of its trailers, not after data.
            guard session.lastChunkSize > 0 else { return 0 }
            session.boundary = .chunkEnd
            http_parser_pause(parser, 1)
            return 0
        }
        return settings
    }()

    private var valueStarted = false

    /// A streaming route's head arrived: its request (body to follow) is started at the pause
    /// this sets up, now or once the request in flight is answered.
    private func beginStreaming(method: String, target: String, keepAlive: Bool) {
        var request = HTTPRequest(method: method, target: target, headers: headers)
        request.peer = connection.peer
        request.isSecure = connection.core.tls != nil
        let loop = connection.loop
        let connectionID = connection.id
        let stream = HTTPBodyStream { _ in
            loop.execute { loop.http1Session(connectionID)?.bodyConsumed() }
        }
        request.bodyStream = stream
        bodyStream = stream
        streamedBytes = 0
        awaitingTurn = PendingRequest(request: request, keepAlive: keepAlive, receivedAt: messageStartedAt)
        boundary = .streamStart
    }
}
