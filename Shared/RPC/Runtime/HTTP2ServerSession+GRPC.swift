import CTalkMesh
import Glibc
import Instrumentation
import TalkMeshBase
import Tracing

// gRPC stream semantics: a call handed to its handler, its response messages and its status
// (Trailers-Only or trailers after data), counted and, when failed, logged once.
extension HTTP2ServerSession {
    func dispatchGRPC(_ stream: HTTP2Stream) {
        guard let method = stream.grpcMethod else { return }
        let request: RPCServiceRegistry.RequestBody
        if let requests = stream.requestStream {
            request = .stream(requests)  // bidirectional: started on the headers, reads as requests arrive
        } else {
            guard let reader = stream.reader else { return }
            stream.reader = nil
            guard let message = reader.firstMessage, reader.messageCount == 1, !reader.hasPartialMessage else {
                respondStatus(stream, RPCError(code: .internal, message: reader.messageCount == 0 || reader.hasPartialMessage
                    ? "the request ended without a complete message" : "a \(method.kind) call takes one request message"))
                return
            }
            request = .message(message)
        }
        let deadline = stream.timeoutNanoseconds.map { MonotonicClock.deadline(after: $0, from: stream.startedAt) }
        var context = ServerContext(path: stream.path, metadata: stream.metadata, deadline: deadline, peer: connection.peer)
        // The server span: a child of the caller's (its traceparent), or the root of a new trace.
        let span = RPCSpans.server(path: stream.path, traceparent: stream.traceparent,
                                   tracestate: stream.traceparent == nil ? nil : stream.metadata.first("tracestate"))
        context.trace = span?.trace
        let loop = connection.loop
        let connectionID = connection.id
        let streamID = stream.id
        let writer = RawResponseWriter(loop: loop, connectionID: connectionID, streamID: streamID)
        let run = method.run
        // Read on the loop thread (the connection's), and only for a span that is recorded.
        let peerAttribute = (span?.start ?? 0) != 0 ? connection.peerSpanAttribute : []
        // Runs inline on the loop thread until the handler first suspends: a handler that does
        // not suspend (health, echo) completes without a thread hop.
        loop.grpcInFlight.add(1, ordering: .relaxed)
        stream.task = Task.immediate {
            defer { loop.grpcInFlight.subtract(1, ordering: .relaxed) }
            let result: Result<[UInt8]?, RPCError>
            do {
                if let span {
                    result = .success(try await TraceContext.withCurrent(span.trace) { try await run(request, context, writer) })
                } else {
                    result = .success(try await run(request, context, writer))
                }
            } catch {
                result = .failure(RPCError(from: error))
            }
            RPCSpans.end(span, name: method.spanName, attributes: method.spanAttributes, peer: peerAttribute, code: result.failureCode)
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
        stopUnfinishedBody(stream)  // a bidirectional call may end before the client half-closed
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

    // MARK: Responses

    /// Sends the response headers with a data provider; data follows as it is enqueued.
    func startResponse(_ stream: HTTP2Stream) {
        guard !stream.responseStarted else { return }
        stream.responseStarted = true
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: HTTP2ServerSession.readCallback)
        StaticHeaders.grpcResponse.withUnsafeBufferPointer { headers in
            _ = nghttp2_submit_response(session, stream.id, headers.baseAddress, headers.count, &provider)
        }
    }

    func finishResponse(_ stream: HTTP2Stream, trailers: [(name: String, value: String)]?) {
        stream.answered = true
        stream.deadlineTimer = nil
        stream.outboundFinished = true
        stream.trailers = trailers ?? []
        stream.trailersAreOK = trailers == nil
        if trailers == nil { record(stream, code: .ok) }
        resume(stream)
    }

    func submitTrailers(_ stream: HTTP2Stream, _ trailers: [(name: String, value: String)]) {
        if stream.trailersAreOK {
            StaticHeaders.grpcOK.withUnsafeBufferPointer { block in
                _ = nghttp2_submit_trailer(session, stream.id, block.baseAddress, block.count)
            }
            return
        }
        let block = HeaderBlock(trailers)
        block.fields.withUnsafeBufferPointer { _ = nghttp2_submit_trailer(session, stream.id, $0.baseAddress, $0.count) }
    }

    func statusHeaders(_ error: RPCError) -> [(name: String, value: String)] {
        var headers = [("grpc-status", error.code.statusText)]
        if !error.message.isEmpty { headers.append(("grpc-message", PercentEncoding.encode(error.message))) }
        return headers
    }

    /// A gRPC status with no response message: Trailers-Only (one HEADERS frame with END_STREAM),
    /// or trailers after the data already sent.
    func respondStatus(_ stream: HTTP2Stream, _ error: RPCError?, extra: [(name: String, value: String)] = []) {
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
        if let error {
            recordFailure(stream, error)
            stream.task?.cancel()
        } else {
            record(stream, code: .ok)
        }
        connection.scheduleFlush()
    }

    func record(_ stream: HTTP2Stream, code: RPCError.Code) {
        let seconds = Double(MonotonicClock.nanoseconds() - stream.startedAt) / 1e9
        core.metrics.recordGRPC(shard: connection.loop.index, method: stream.methodIndex, code: code.rawValue, seconds: seconds)
    }

    /// A failed call: counted, and logged once.
    func recordFailure(_ stream: HTTP2Stream, _ error: RPCError) {
        record(stream, code: error.code)
        core.logFailedCall(path: stream.path, error: error, traceparent: stream.traceparent, peer: connection.peer)
    }
}
