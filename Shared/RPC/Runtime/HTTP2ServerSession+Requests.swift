import CTalkMesh
import Glibc
import TalkMeshBase

// Request heads and bodies: the header callbacks, validation on END_HEADERS, and the body's
// flow control and per-connection budget.
extension HTTP2ServerSession {
    // MARK: Callbacks (thin: they move bytes and state)

    func beginHeaders(_ streamID: Int32) {
        let stream = HTTP2Stream(id: streamID)
        stream.startedAt = MonotonicClock.nanoseconds()
        stream.lastInputAt = stream.startedAt
        streams[streamID] = stream
        idleSince = nil
    }

    func header(_ streamID: Int32, _ name: UnsafePointer<UInt8>, _ nameLength: Int,
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

    func cachedPath(_ value: UnsafePointer<UInt8>, _ length: Int) -> String {
        if lastPathBytes.count == length && lastPathBytes.withUnsafeBufferPointer({ memcmp($0.baseAddress!, value, length) == 0 }) {
            return lastPath
        }
        lastPathBytes = Array(UnsafeBufferPointer(start: value, count: length))
        lastPath = String(decoding: lastPathBytes, as: UTF8.self)
        return lastPath
    }

    /// HEADERS complete: decide gRPC or REST and answer immediate errors (Trailers-Only).
    func headersComplete(_ stream: HTTP2Stream) {
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
            if method.kind == .bidiStreaming {
                // Each message is bounded by the reader, the stream by flow control.
                stream.reader = nil
                stream.bodyLimit = Int.max
                stream.requestStream = RawRequestStream(body: streamBody(stream), maxMessageBytes: core.configuration.maxReceiveMessageBytes)
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
            stream.routeMatch = policy.match
            if let declared = stream.declaredLength, declared > policy.limit {
                respondPlain(stream, policy.refusal())
                resetAfterResponse(stream)
            } else if policy.streams {
                streamBody(stream)
            }
        }
    }

    /// The stream's handler starts now (after this read) and reads the request body as it
    /// arrives; the client may send more as the handler takes it (flow control).
    @discardableResult
    func streamBody(_ stream: HTTP2Stream) -> HTTPBodyStream {
        let loop = connection.loop, connectionID = connection.id, streamID = stream.id
        let body = HTTPBodyStream { count in
            loop.execute { loop.http2Session(connectionID)?.consumed(streamID, count) }
        }
        stream.bodyStream = body
        stream.streamsBody = true
        stream.bodyOpen = true
        ready.append(stream)
        return body
    }

    /// Answered before the client finished sending (a refusal, or a bidirectional call that
    /// ended first): the body stops and the client is asked to stop sending.
    func stopUnfinishedBody(_ stream: HTTP2Stream) {
        guard stream.streamsBody && !stream.requestComplete else { return }
        stopBody(stream, .aborted)
        resetAfterResponse(stream)
    }

    /// Every DATA byte is given back to flow control here (automatic window updates are off), at
    /// once unless a streaming handler still has to take it.
    func data(_ streamID: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) {
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
    func stopBody(_ stream: HTTP2Stream, _ error: HTTPBodyError) {
        guard stream.bodyOpen, let body = stream.bodyStream else { return }
        stream.bodyOpen = false
        let dropped = body.fail(error)
        if dropped > 0 { nghttp2_session_consume(session, stream.id, dropped) }
    }

    func receivedBuffered(_ streamID: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) {
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

    func hold(_ stream: HTTP2Stream, _ count: Int) {
        stream.bufferedRequestBytes += count
        bufferedRequestBytes += count
    }

    /// The stream's buffered request bytes leave the budget (dispatched, refused or closed).
    func release(_ stream: HTTP2Stream) {
        bufferedRequestBytes -= stream.bufferedRequestBytes
        stream.bufferedRequestBytes = 0
    }

    func refuseOverBudget(_ stream: HTTP2Stream) {
        abandonRequest(stream, RPCError(code: .resourceExhausted, message: "too many request bytes buffered on this connection"),
                       HTTPResponse.text(503, "too many request bytes buffered on this connection\n"))
    }

    /// Drops what a stream's request buffered, answers (gRPC status or HTTP response by the
    /// stream's kind) and resets the stream so the client stops sending.
    func abandonRequest(_ stream: HTTP2Stream, _ error: RPCError, _ response: HTTPResponse) {
        stream.reader = nil
        stream.body = []
        release(stream)
        if stream.kind == .grpc { respondStatus(stream, error) } else { respondPlain(stream, response) }
        resetAfterResponse(stream)
    }
}
