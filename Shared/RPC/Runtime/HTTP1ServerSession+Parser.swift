import CTalkMesh
import Glibc
import TalkMeshBase

// The http-parser glue: its callbacks gather a request's head and body and pause the parser at
// each boundary the session acts on.
extension HTTP1ServerSession {
    // MARK: http-parser callbacks

    func countHeaderBytes(_ count: Int) -> Int32 {
        headerBytes += count
        if headerBytes > core.configuration.maxHeaderBytes {
            failure = .headersTooLarge
            http_parser_pause(parser, 1)
        }
        return 0
    }

    func flushHeader() {
        guard !field.isEmpty else { return }
        headers.append((String(decoding: field, as: UTF8.self).lowercased(), String(decoding: value, as: UTF8.self)))
        field.removeAll(keepingCapacity: true)
        value.removeAll(keepingCapacity: true)
    }

    static func from(_ parser: UnsafeMutablePointer<http_parser>?) -> HTTP1ServerSession {
        Unmanaged<HTTP1ServerSession>.fromOpaque(parser!.pointee.data).takeUnretainedValue()
    }

    nonisolated(unsafe) static var settings: http_parser_settings = {
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
            (session.bodyLimit, session.bodyRefusal, session.routeMatch) = (policy.limit, policy.refusal, policy.match)
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
            request.routeMatch = session.routeMatch
            session.routeMatch = nil
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


    /// A streaming route's head arrived: its request (body to follow) is started at the pause
    /// this sets up, now or once the request in flight is answered.
    func beginStreaming(method: String, target: String, keepAlive: Bool) {
        var request = HTTPRequest(method: method, target: target, headers: headers)
        request.peer = connection.peer
        request.isSecure = connection.core.tls != nil
        request.routeMatch = routeMatch
        routeMatch = nil
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
