import CTalkMesh
import Glibc

// The nghttp2 glue: the session's callbacks and options; each callback only finds the session
// and calls one of its methods.
extension HTTP2ServerSession {
    // MARK: nghttp2 glue

    static func from(_ pointer: UnsafeMutableRawPointer?) -> HTTP2ServerSession {
        Unmanaged<HTTP2ServerSession>.fromOpaque(pointer!).takeUnretainedValue()
    }

    static let readCallback: nghttp2_data_source_read_callback = { _, streamID, buffer, length, flags, _, userData in
        from(userData).readResponse(streamID, buffer!, length, flags!)
    }

    nonisolated(unsafe) static let options: OpaquePointer = {
        var options: OpaquePointer?
        nghttp2_option_new(&options)
        // Clients may open many streams at once; nghttp2's default cap on the
        // concurrent-stream queue is generous but we also bound it by SETTINGS.
        nghttp2_option_set_max_outbound_ack(options, 10_000)
        // Flow control follows the application: `data` gives bytes back as handlers take them.
        nghttp2_option_set_no_auto_window_update(options, 1)
        return options!
    }()

    nonisolated(unsafe) static let callbacks: OpaquePointer = {
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        nghttp2_session_callbacks_set_send_callback(callbacks) { _, data, length, _, userData in
            let connection = from(userData).connection
            let sent = NGHTTP2IO.send(connection.bev, data, length)
            if sent > 0 { connection.loop.bytesSent.add(UInt64(sent), ordering: .relaxed) }
            return sent
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
