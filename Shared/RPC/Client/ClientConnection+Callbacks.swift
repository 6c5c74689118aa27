import CTalkMesh
import Glibc
import TalkMeshBase
import TalkMeshMessages

// The nghttp2 glue of a client connection: its callbacks find the connection and move one
// response's headers, data and end to its call.
extension ClientConnection {
    static func from(_ pointer: UnsafeMutableRawPointer?) -> ClientConnection {
        Unmanaged<ClientConnection>.fromOpaque(pointer!).takeUnretainedValue()
    }

    func readRequestBytes(_ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>, _ length: Int,
                          _ flags: UnsafeMutablePointer<UInt32>) -> Int {
        guard let call = calls[streamID] else { return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue) }
        let count = min(length, call.request.count - call.requestOffset)
        if count > 0 {
            call.request.withUnsafeBufferPointer { buffer.update(from: $0.baseAddress! + call.requestOffset, count: count) }
            call.requestOffset += count
        }
        if call.requestOffset == call.request.count { flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue }
        return count
    }

    func header(_ streamID: Int32, _ name: UnsafePointer<UInt8>, _ nameLength: Int, _ value: UnsafePointer<UInt8>, _ valueLength: Int) {
        guard let call = calls[streamID] else { return }
        let text = String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self)
        if bytesEqual(name, nameLength, ":status") {
            call.httpStatus = Int(text) ?? 0
        } else if bytesEqual(name, nameLength, "content-type") {
            call.contentTypeOK = text.hasPrefix("application/grpc")
        } else if bytesEqual(name, nameLength, "grpc-status") {
            call.grpcStatus = Int(text) ?? RPCError.Code.unknown.rawValue
        } else if bytesEqual(name, nameLength, "grpc-message") {
            call.grpcMessage = PercentEncoding.decode(text)
        } else if nameLength > 0 && name[0] != UInt8(ascii: ":") {
            let key = String(decoding: UnsafeBufferPointer(start: name, count: nameLength), as: UTF8.self)
            guard !key.hasPrefix("grpc-") else { return }
            if call.inTrailers { call.trailingMetadata.addWire(key: key, value: text) } else { call.initialMetadata.addWire(key: key, value: text) }
        }
    }

    func data(_ streamID: Int32, _ bytes: UnsafePointer<UInt8>, _ count: Int) {
        guard let call = calls[streamID], let session else { return }
        do {
            try call.reader.append(UnsafeBufferPointer(start: bytes, count: count))
        } catch {
            let message: String
            if case .tooLarge(let announced, let limit) = error {
                message = "response message larger than max (\(announced) vs. \(limit))"
            } else {
                message = "compressed response without negotiated encoding"
            }
            cancel(call, RPCError(code: error == .compressed ? .internal : .resourceExhausted, message: message))
            return
        }
        let messages = call.reader.takeMessages()
        if call.isStreaming {
            // A consumer that falls behind stops the window from reopening: buffering stays bounded.
            if call.bufferedBytes > ClientConnection.streamingHighWater {
                call.heldBack += count
            } else {
                nghttp2_session_consume(session, streamID, count)
            }
            for message in messages {
                call.bufferedBytes += message.count
                call.deliver(message)
            }
        } else {
            nghttp2_session_consume(session, streamID, count)
            for message in messages { call.deliver(message) }
        }
    }

    /// Unread streaming responses past this many bytes hold back the flow-control window.
    static let streamingHighWater = 4 << 20

    func frameReceived(_ frame: nghttp2_frame) {
        let type = UInt32(frame.hd.type)
        if type == NGHTTP2_PING.rawValue && frame.hd.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) != 0 {
            keepaliveTimeout = nil
        } else if type == NGHTTP2_GOAWAY.rawValue {
            // Streams above last_stream_id are closed by nghttp2 with REFUSED_STREAM: retried.
            startDraining()
        } else if type == NGHTTP2_HEADERS.rawValue, let call = calls[frame.hd.stream_id] {
            if !call.receivedHeaders {
                call.receivedHeaders = true
                call.inTrailers = true
                if call.httpStatus == 200 && call.contentTypeOK && call.grpcStatus == nil { call.headersArrived() }
            }
        }
    }

    func streamClosed(_ streamID: Int32, errorCode: UInt32) {
        guard let call = calls.removeValue(forKey: streamID) else { return }
        call.closed(errorCode: errorCode)
        if state == .draining && calls.isEmpty { fail(RPCError(code: .unavailable, message: "drained")) }
    }

    static let readRequest: nghttp2_data_source_read_callback = { _, streamID, buffer, length, flags, _, userData in
        from(userData).readRequestBytes(streamID, buffer!, length, flags!)
    }

    nonisolated(unsafe) static let options: OpaquePointer = {
        var options: OpaquePointer?
        nghttp2_option_new(&options)
        // Streaming responses return their bytes to the window only when the consumer reads them.
        nghttp2_option_set_no_auto_window_update(options, 1)
        return options!
    }()

    nonisolated(unsafe) static let callbacks: OpaquePointer = {
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        nghttp2_session_callbacks_set_send_callback(callbacks) { _, data, length, _, userData in
            NGHTTP2IO.send(from(userData).bev, data, length)
        }
        nghttp2_session_callbacks_set_on_header_callback(callbacks) { _, frame, name, nameLength, value, valueLength, _, userData in
            from(userData).header(frame!.pointee.hd.stream_id, name!, nameLength, value!, valueLength)
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks) { _, frame, userData in
            from(userData).frameReceived(frame!.pointee)
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_send_callback(callbacks) { _, frame, userData in
            let header = frame!.pointee.hd
            if header.type == UInt8(NGHTTP2_HEADERS.rawValue), let call = from(userData).calls[header.stream_id] {
                call.headersSent = true
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
