import CTalkMesh
import Glibc
import TalkMeshBase

/// The server side of one HTTP/1.1 connection on http-parser: keep-alive, Content-Length and
/// chunked bodies, header and body limits, pipelined requests answered in order. The http-parser
/// glue is in `+Parser`, streamed responses in `+Streaming`; state is module-internal for those
/// files and touched only on the connection's loop thread.
final class HTTP1ServerSession {
    struct PendingRequest {
        var request: HTTPRequest
        var keepAlive: Bool
        var receivedAt: Int64
    }

    enum Failure {
        case headersTooLarge
        /// Over the route's body limit (413), or a 404/405 whose body is not read.
        case refused(HTTPResponse)
        case overBudget
        /// A streamed body stopped (over its limit): read no more; the handler answers.
        case bodyStopped
    }

    /// A response whose body is produced while it is sent.
    struct StreamedResponse {
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
    let core: ServerCore
    let parser: UnsafeMutablePointer<http_parser>
    var url: [UInt8] = []
    var field: [UInt8] = []
    var value: [UInt8] = []
    var headers: [(name: String, value: String)] = []
    var body: [UInt8] = []
    var headerBytes = 0
    var failure: Failure?
    var queue: [PendingRequest] = []
    var inFlight = false
    var closeAfterFlush = false
    var goingAway = false
    var messageStartedAt: Int64 = 0
    /// Bounds how long a request's head may take to arrive (slow-header clients).
    var headerTimer: LoopTimer?
    /// The current request's body limit and the answer past it, decided from its head.
    var bodyLimit = 0
    var bodyRefusal: @Sendable () -> HTTPResponse = { HTTPResponse.text(413, "request body too large\n") }
    /// The router's match for the current request's head, handed to `respond`.
    var routeMatch: HTTPRouter.Match?
    /// Between the end of a request's head and the end of its body.
    var inBody = false
    /// Between a request's first byte and its end.
    var inMessage = false
    /// Body bytes of the requests waiting in `queue`.
    var queuedBytes = 0
    var readPaused = false
    var lastActivityAt = MonotonicClock.nanoseconds()
    /// Strictness the parser lacks: the head's line ends, and the CRLF after each chunk's data.
    var headScanner = HTTP1HeadScanner()
    /// Where the parser was paused to check a position: after a chunk's data, or a message's end.
    enum Boundary { case chunkEnd, messageEnd, streamStart }
    var boundary: Boundary?
    /// The last byte of the previous read (a chunk's CR may end one read and its LF start the next).
    var previousByte: UInt8 = 0
    var lastChunkSize: UInt64 = 0
    /// The current message's body, when its route streams it, and how much of it arrived.
    var bodyStream: HTTPBodyStream?
    var streamedBytes = 0
    /// A streaming request parsed up to its head, to start once the handler in flight is done.
    var awaitingTurn: PendingRequest?
    /// The streaming request in flight whose body is still arriving (it cannot be kept alive if
    /// answered before the body's end).
    var bodyOpen = false
    var streamed: StreamedResponse?
    var writeWaiters: [CheckedContinuation<Void, any Error>] = []

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

    func fail(_ status: Int, _ message: String) {
        fail(HTTPResponse.text(status, message))
    }

    func fail(_ response: HTTPResponse) {
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
    func startNext() {
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
        // The core, not a copy of its router: one reference to retain, not every field of the router.
        let core = self.core
        let loop = connection.loop
        let connectionID = connection.id
        let request = pending.request
        loop.httpInFlight.add(1, ordering: .relaxed)
        _ = Task.immediate {
            let (response, route) = await core.router.respond(to: request)
            loop.httpInFlight.subtract(1, ordering: .relaxed)
            loop.execute {
                loop.http1Session(connectionID)?.complete(response, route: route, pending: pending)
            }
        }
    }

    /// Starts a streaming route's handler once its head arrived; the body follows through its
    /// `bodyStream` as the parser reads it.
    func startStreaming(_ pending: PendingRequest) {
        inFlight = true
        bodyOpen = bodyStream != nil
        // The core, not a copy of its router: one reference to retain, not every field of the router.
        let core = self.core
        let loop = connection.loop
        let connectionID = connection.id
        let request = pending.request
        loop.httpInFlight.add(1, ordering: .relaxed)
        Task {
            let (response, route) = await core.router.respond(to: request)
            loop.httpInFlight.subtract(1, ordering: .relaxed)
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

    func complete(_ response: HTTPResponse, route: String, pending: PendingRequest) {
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

    func finishExchange(status: Int, route: String, pending: PendingRequest, keepAlive: Bool) {
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

    func resumeReadingIfRoom() {
        guard readPaused, queue.count < Self.maxQueued, connection.pendingOutput <= Connection.outputHighWater, !closeAfterFlush,
              awaitingTurn == nil, (bodyStream?.waiting ?? 0) <= Self.bodyLowWater else { return }
        readPaused = false
        connection.resumeReading()
    }

    func writeResponse(_ response: HTTPResponse, keepAlive: Bool, method: String) {
        var head = "HTTP/1.1 \(response.status) \(HTTPResponse.reason(response.status))\r\n"
        for (name, value) in response.headers { head += "\(name): \(value)\r\n" }
        if let trace = response.trace { head += "traceparent: \(trace.traceparent)\r\n" }
        // A streamed body's length is the producer's header, if it gave one (else it is chunked).
        if response.streamBody == nil { head += "content-length: \(response.body.count)\r\n" }
        head += keepAlive ? "connection: keep-alive\r\n\r\n" : "connection: close\r\n\r\n"
        var bytes = Array(head.utf8)
        if method != "HEAD" && response.streamBody == nil { bytes += response.body }
        bytes.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        if !keepAlive { closeAfterFlush = true }
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

    func startHeaderTimer() {
        headerTimer = LoopTimer(loop: connection.loop, after: core.configuration.handshakeTimeoutNanoseconds) { [weak self] in
            guard let self else { return }
            self.headerTimer = nil
            self.fail(408, "request header timeout\n")
            self.connection.loop.afterWork()
        }
    }

    var valueStarted = false
}
