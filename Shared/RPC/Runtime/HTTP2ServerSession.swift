import CTalkMesh
import Glibc
import TalkMeshBase

/// The server side of one HTTP/2 connection on nghttp2 (modelled on nghttp2's
/// `examples/libevent-server.c`): callbacks only move bytes and state; complete requests are
/// handed to Swift concurrency after each read; responses come back through the loop's queue.
/// Its parts: request heads and bodies (`+Requests`), gRPC calls (`+GRPC`), REST (`+REST`) and
/// the nghttp2 callbacks (`+Callbacks`). State is module-internal for those files and touched
/// only on the connection's loop thread.
final class HTTP2ServerSession {
    unowned let connection: Connection
    var session: OpaquePointer?
    var streams: [Int32: HTTP2Stream] = [:]
    var ready: [HTTP2Stream] = []
    var goingAway = false
    var goAwayTimer: LoopTimer?
    let core: ServerCore
    /// Request bytes held by streams not yet dispatched (MAX_CONNECTION_BUFFER_BYTES).
    var bufferedRequestBytes = 0
    /// Since when the connection has had no open stream; nil while one is open.
    var idleSince: Int64? = MonotonicClock.nanoseconds()

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

    /// A response sent `traceparent` indexed: its name is in HPACK's table (`HeaderBlock`).
    var traceparentIndexed = false

    /// Clients call the same few methods over and over: reuse the last path's String.
    var lastPathBytes: [UInt8] = []
    var lastPath = ""

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

    func endOfRequest(_ streamID: Int32) {
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

    func streamClosed(_ streamID: Int32, errorCode: UInt32) {
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
    func readResponse(_ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>, _ length: Int,
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

    func dispatchReady() {
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

    func resume(_ stream: HTTP2Stream) {
        if stream.deferred {
            stream.deferred = false
            nghttp2_session_resume_data(session, stream.id)
        }
    }

    /// After answering early, asks the client to stop sending the rest of the request: an
    /// RST_STREAM(NO_ERROR) once the response's last frame is out (sooner, nghttp2 would drop the
    /// response itself).
    func resetAfterResponse(_ stream: HTTP2Stream) {
        stream.resetAfterResponse = true
    }

    func frameSent(_ streamID: Int32, endStream: Bool) {
        guard endStream, let stream = streams[streamID], stream.resetAfterResponse, !stream.requestComplete else { return }
        stream.resetAfterResponse = false
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, NGHTTP2_NO_ERROR.rawValue)
    }

    func startDeadline(_ stream: HTTP2Stream, after nanoseconds: Int64) {
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

}
