import CTalkMesh

/// The byte-moving glue every nghttp2 session here shares, server and client alike.
enum NGHTTP2IO {
    /// Feeds a bufferevent's whole input to the session, one contiguous chunk at a time (no copy).
    /// Returns nghttp2's error text when the peer broke the protocol (the input is then dropped).
    static func feed(_ session: OpaquePointer, from input: OpaquePointer?) -> String? {
        while true {
            let length = evbuffer_get_length(input)
            if length == 0 { return nil }
            var vector = iovec()
            guard evbuffer_peek(input, -1, nil, &vector, 1) >= 1 else { return nil }
            let count = min(vector.iov_len, length)
            let consumed = nghttp2_session_mem_recv(session, vector.iov_base.assumingMemoryBound(to: UInt8.self), count)
            if consumed < 0 {
                evbuffer_drain(input, length)
                return String(cString: nghttp2_strerror(Int32(consumed)))
            }
            evbuffer_drain(input, count)
        }
    }

    /// The send callback: queue the bytes on the bufferevent, or push back (WOULDBLOCK) while
    /// more than `Connection.outputHighWater` bytes wait unsent, so a slow peer bounds our memory.
    static func send(_ bev: OpaquePointer?, _ data: UnsafePointer<UInt8>?, _ length: Int) -> Int {
        guard let bev else { return Int(NGHTTP2_ERR_CALLBACK_FAILURE.rawValue) }
        if evbuffer_get_length(bufferevent_get_output(bev)) >= Connection.outputHighWater {
            return Int(NGHTTP2_ERR_WOULDBLOCK.rawValue)
        }
        bufferevent_write(bev, data, length)
        return length
    }
}
