import CTalkMesh
import Glibc
import TalkMeshBase

// REST over HTTP/2: a request handed to the router, a buffered or streamed response.
extension HTTP2ServerSession {
    func dispatchREST(_ stream: HTTP2Stream) {
        var request = HTTPRequest(method: stream.method, target: stream.path, headers: stream.restHeaders, body: stream.body)
        if !stream.authority.isEmpty { request.headers.append(("host", stream.authority)) }
        request.peer = connection.peer
        request.isSecure = connection.core.tls != nil
        request.bodyStream = stream.bodyStream
        request.routeMatch = stream.routeMatch
        stream.routeMatch = nil
        stream.body = []
        // The core, not a copy of its router: one reference to retain, not every field of the router.
        let core = self.core
        let loop = connection.loop
        let connectionID = connection.id
        let streamID = stream.id
        loop.httpInFlight.add(1, ordering: .relaxed)
        stream.task = Task.immediate {
            let (response, route) = await core.router.respond(to: request)
            loop.httpInFlight.subtract(1, ordering: .relaxed)
            loop.execute {
                loop.http2Session(connectionID)?.completeREST(streamID, response, route: route)
            }
        }
    }

    func completeREST(_ streamID: Int32, _ response: HTTPResponse, route: String) {
        guard let stream = streams[streamID], !stream.answered else { return }
        stream.metricLabel = route
        stopUnfinishedBody(stream)  // answered before the body's end: a refusal
        if let produce = response.streamBody, stream.method != "HEAD" {
            respondStreamed(stream, response, produce)
        } else {
            respondPlain(stream, response)
        }
        connection.scheduleFlush()
    }

    /// Sends the head now and the body as the producer writes it (a download, server-sent events).
    func respondStreamed(_ stream: HTTP2Stream, _ response: HTTPResponse,
                         _ produce: @escaping @Sendable (HTTPBodyWriter) async throws -> Void) {
        stream.answered = true
        stream.responseStarted = true
        stream.streamingResponse = true
        stream.deadlineTimer = nil
        stream.trailers = nil
        var headers: [(name: String, value: String)] = [(":status", String(response.status))]
        headers += response.headers.map { (HTTPHeaderName.lowercased($0.name), $0.value) }
        let block = responseBlock(headers, trace: response.trace)
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
        block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, &provider) }
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

    func streamedWrite(_ streamID: Int32, _ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        guard let stream = streams[streamID], stream.streamingResponse, !stream.outboundFinished else {
            continuation.resume(throwing: CancellationError())
            return
        }
        enqueue(stream, bytes, continuation)
    }

    /// Queues response bytes; the writer waits while the stream holds more than its high water.
    func enqueue(_ stream: HTTP2Stream, _ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        stream.enqueue(bytes)
        if stream.bufferedBytes > HTTP2ServerSession.streamHighWater {
            stream.writeWaiters.append(continuation)
        } else {
            continuation.resume()
        }
        resume(stream)
        connection.scheduleFlush()
    }

    func streamedEnd(_ streamID: Int32, failed: Bool) {
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

    func respondPlain(_ stream: HTTP2Stream, _ response: HTTPResponse) {
        guard !stream.answered else { return }
        stream.answered = true
        stream.responseStarted = true
        stream.deadlineTimer = nil
        var headers: [(name: String, value: String)] = [(":status", String(response.status))]
        headers += response.headers.map { (HTTPHeaderName.lowercased($0.name), $0.value) }
        if response.streamBody == nil { headers.append(("content-length", String(response.body.count))) }
        let block = responseBlock(headers, trace: response.trace)
        if response.body.isEmpty || stream.method == "HEAD" || response.streamBody != nil {
            block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, nil) }
        } else {
            stream.outbound = response.body
            stream.outboundFinished = true
            var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
            block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_response(session, stream.id, $0.baseAddress, $0.count, &provider) }
        }
        if stream.kind == .grpc { stream.metricLabel = "grpc-method" }
        recordHTTP(stream, status: response.status)
        connection.scheduleFlush()
    }

    /// A response's header block; the connection's first `traceparent` goes out indexed (`HeaderBlock`).
    private func responseBlock(_ headers: [(name: String, value: String)], trace: TraceContext?) -> HeaderBlock {
        let block = HeaderBlock(headers, trace: trace, indexTraceparent: !traceparentIndexed)
        if block.indexedTraceparent { traceparentIndexed = true }
        return block
    }

    func recordHTTP(_ stream: HTTP2Stream, status: Int) {
        let seconds = Double(MonotonicClock.nanoseconds() - stream.startedAt) / 1e9
        core.metrics.record(shard: connection.loop.index, kind: .http, method: stream.metricLabel.isEmpty ? "other" : stream.metricLabel,
                            status: String(status), seconds: seconds)
    }
}
