import CTalkMesh
import Glibc
import TalkMeshBase
import TalkMeshMessages

/// One HTTP/2 connection to one backend address (modelled on nghttp2's
/// `examples/libevent-client.c`): h2c prior knowledge or TLS with ALPN h2, many calls multiplexed,
/// PING keepalive, graceful handling of GOAWAY. Lives on the client's loop.
final class ClientConnection: @unchecked Sendable {  // loop-confined: touched only on its loop
    enum State { case connecting, ready, draining, closed }

    let address: ResolvedAddress
    let authority: String
    unowned let loop: EventLoop
    let configuration: RPCClient.Configuration
    private(set) var state: State = .connecting
    var bev: OpaquePointer?
    var session: OpaquePointer?
    var calls: [Int32: ClientCall] = [:]
    var connectTimer: LoopTimer?
    var keepaliveTimer: LoopTimer?
    var keepaliveTimeout: LoopTimer?
    var inCallback = 0
    var closeRequested: RPCError?
    /// Told when the connection becomes ready, starts draining, or closes.
    var onStateChange: ((ClientConnection) -> Void)?

    init(address: ResolvedAddress, authority: String, loop: EventLoop, configuration: RPCClient.Configuration) {
        self.address = address
        self.authority = authority
        self.loop = loop
        self.configuration = configuration
    }

    deinit {
        if let session { nghttp2_session_del(session) }
        if let bev { bufferevent_free(bev) }
    }

    // MARK: Connecting

    func connect() {
        let options = Int32(BEV_OPT_CLOSE_ON_FREE.rawValue)
        if let tls = configuration.tls {
            guard let ssl = tls.newSSL(serverName: configuration.authorityOverride ?? hostPart(authority)) else {
                fail(RPCError(code: .unavailable, message: "cannot create a TLS session"))
                return
            }
            bev = bufferevent_openssl_socket_new(loop.base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                 options | Int32(BEV_OPT_DEFER_CALLBACKS.rawValue))
        } else {
            bev = bufferevent_socket_new(loop.base, -1, options)
        }
        guard let bev else {
            fail(RPCError(code: .unavailable, message: "cannot create a socket for \(address)"))
            return
        }
        let context = Unmanaged.passUnretained(self).toOpaque()
        bufferevent_setcb(bev, { _, arg in
            ClientConnection.from(arg).onReadable()
        }, { _, arg in
            ClientConnection.from(arg).flush()
        }, { _, events, arg in
            ClientConnection.from(arg).onEvent(events)
        }, context)
        bufferevent_enable(bev, Int16(EV_READ | EV_WRITE))
        connectTimer = LoopTimer(loop: loop, after: configuration.connectTimeoutNanoseconds) { [weak self] in
            self?.fail(RPCError(code: .unavailable, message: "connecting to \(self?.address.description ?? "") timed out"))
        }
        let rv = address.withSockaddr { bufferevent_socket_connect(bev, $0, Int32($1)) }
        if rv != 0 {
            fail(RPCError(code: .unavailable, message: "cannot connect to \(address): \(String(cString: strerror(errno)))"))
        }
    }

    func hostPart(_ authority: String) -> String {
        if authority.hasPrefix("[") { return String(authority.dropFirst().prefix { $0 != "]" }) }
        return String(authority.prefix { $0 != ":" })
    }

    func onEvent(_ events: Int16) {
        let flags = Int32(events)
        if flags & BEV_EVENT_CONNECTED != 0 {
            connected()
            return
        }
        if flags & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT) != 0 {
            var reason = flags & BEV_EVENT_EOF != 0 ? "the server closed the connection" : "connection error"
            if flags & BEV_EVENT_ERROR != 0 {
                let socketError = errno  // libevent leaves the socket's error in errno
                if socketError != 0 { reason = String(cString: strerror(socketError)) }
                if configuration.tls != nil, let bev, let tlsError = Self.tlsFailure(bev) { reason = "TLS: \(tlsError)" }
            }
            fail(RPCError(code: .unavailable, message: "\(address): \(reason)"))
        }
    }

    /// Why a TLS handshake failed: the certificate check's verdict when it is what failed (an
    /// untrusted CA, another name, expired), else OpenSSL's error (libevent keeps it per
    /// bufferevent), else nil.
    static func tlsFailure(_ bev: OpaquePointer) -> String? {
        if let ssl = bufferevent_openssl_get_ssl(bev) {
            let verdict = SSL_get_verify_result(ssl)
            if verdict != 0 { return "certificate verify failed: " + String(cString: X509_verify_cert_error_string(verdict)) }
        }
        let code = bufferevent_get_openssl_error(bev)
        guard code != 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        return cString(buffer)
    }

    func connected() {
        connectTimer = nil
        guard let bev else { return }
        var one: Int32 = 1
        setsockopt(bufferevent_getfd(bev), Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        if configuration.tls != nil, let ssl = bufferevent_openssl_get_ssl(bev) {
            var protocolName: UnsafePointer<UInt8>?
            var length: UInt32 = 0
            SSL_get0_alpn_selected(ssl, &protocolName, &length)
            guard length == 2, let protocolName, protocolName[0] == UInt8(ascii: "h"), protocolName[1] == UInt8(ascii: "2") else {
                fail(RPCError(code: .unavailable, message: "\(address) did not negotiate HTTP/2 (ALPN h2)"))
                return
            }
        }
        var session: OpaquePointer?
        nghttp2_session_client_new2(&session, ClientConnection.callbacks, Unmanaged.passUnretained(self).toOpaque(), ClientConnection.options)
        self.session = session
        var settings = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: 1 << 20),
        ]
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &settings, settings.count)
        nghttp2_session_set_local_window_size(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, 16 << 20)
        state = .ready
        scheduleKeepalive()
        flush()
        onStateChange?(self)
    }

    // MARK: Calls

    /// Opens a stream for the call; false when this connection can take no new stream.
    func start(_ call: ClientCall) -> Bool {
        guard state == .ready, let session else { return false }
        var headers: [(name: String, value: String)] = [
            (":method", "POST"), (":scheme", configuration.tls == nil ? "http" : "https"), (":path", call.path),
            (":authority", configuration.authorityOverride ?? authority), ("content-type", "application/grpc"), ("te", "trailers"),
            ("user-agent", configuration.userAgent),
        ]
        if let deadline = call.deadline {
            let remaining = deadline - MonotonicClock.nanoseconds()
            if remaining <= 0 {
                call.fail(AttemptFailure(error: RPCError(code: .deadlineExceeded, message: "deadline exceeded before sending"), transparent: false))
                return true
            }
            headers.append(("grpc-timeout", GRPCTimeout.encode(nanoseconds: remaining)))
        }
        if let traceparent = call.traceparent { headers.append(("traceparent", traceparent)) }
        for (key, value) in call.metadata {
            switch value {
            case .string(let text): headers.append((key, text))
            case .binary(let bytes): headers.append((key, Base64.encode(bytes)))
            }
        }
        let block = HeaderBlock(headers)
        var provider = nghttp2_data_provider(source: nghttp2_data_source(ptr: nil), read_callback: ClientConnection.readRequest)
        let streamID = block.fields.withUnsafeBufferPointer {
            nghttp2_submit_request(session, nil, $0.baseAddress, $0.count, &provider, nil)
        }
        guard streamID > 0 else {
            if streamID == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE.rawValue { startDraining() }
            return false
        }
        call.streamID = streamID
        call.connection = self
        calls[streamID] = call
        scheduleFlush()
        return true
    }

    /// Cancels a call: RST_STREAM(CANCEL).
    func cancel(_ call: ClientCall, _ error: RPCError) {
        guard let session, calls[call.streamID] === call else {
            call.fail(AttemptFailure(error: error, transparent: false))
            return
        }
        call.fail(AttemptFailure(error: error, transparent: false))
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), call.streamID, NGHTTP2_CANCEL.rawValue)
        scheduleFlush()
    }

    /// The consumer of a streaming call took `bytes`: reopen the window once it has caught up.
    func consumed(_ call: ClientCall, bytes: Int) {
        call.bufferedBytes -= bytes
        guard let session, calls[call.streamID] === call, call.heldBack > 0,
              call.bufferedBytes <= ClientConnection.streamingHighWater else { return }
        nghttp2_session_consume(session, call.streamID, call.heldBack)
        call.heldBack = 0
        scheduleFlush()
    }

    // MARK: I/O

    func onReadable() {
        guard let bev, let session else { return }
        let input = bufferevent_get_input(bev)
        inCallback += 1
        if let error = NGHTTP2IO.feed(session, from: input) {
            inCallback -= 1
            fail(RPCError(code: .unavailable, message: "HTTP/2 protocol error from \(address): \(error)"))
            return
        }
        inCallback -= 1
        flush()
    }

    var flushScheduled = false

    func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        loop.execute { [weak self] in
            self?.flushScheduled = false
            self?.flush()
        }
    }

    func flush() {
        guard let session, inCallback == 0 else { return }
        if let error = closeRequested {
            closeRequested = nil
            fail(error)
            return
        }
        if nghttp2_session_send(session) != 0 {
            fail(RPCError(code: .unavailable, message: "HTTP/2 send failed to \(address)"))
            return
        }
        if nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0 && pendingOutput == 0 {
            fail(RPCError(code: .unavailable, message: "connection to \(address) finished"))
        }
    }

    var pendingOutput: Int {
        guard let bev else { return 0 }
        return evbuffer_get_length(bufferevent_get_output(bev))
    }

    // MARK: Keepalive

    func scheduleKeepalive() {
        guard configuration.keepaliveIntervalNanoseconds > 0 else { return }
        keepaliveTimer = LoopTimer(loop: loop, after: configuration.keepaliveIntervalNanoseconds) { [weak self] in
            guard let self, let session = self.session, self.state == .ready || self.state == .draining else { return }
            if !self.calls.isEmpty || self.configuration.keepaliveWithoutCalls {
                nghttp2_submit_ping(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nil)
                self.flush()
                if self.keepaliveTimeout == nil {
                    self.keepaliveTimeout = LoopTimer(loop: self.loop, after: self.configuration.keepaliveTimeoutNanoseconds) { [weak self] in
                        self?.fail(RPCError(code: .unavailable, message: "keepalive: \(self?.address.description ?? "") did not answer a PING in time"))
                    }
                }
            }
            self.scheduleKeepalive()
        }
    }

    // MARK: Shutdown

    /// Stops taking calls; closes when the calls in flight are done.
    func startDraining() {
        guard state == .ready || state == .connecting else { return }
        state = .draining
        onStateChange?(self)
        // Through fail(): this runs inside nghttp2's GOAWAY handling, which still uses the session
        // after our callback returns, so the close must wait until the read is done.
        if calls.isEmpty { fail(RPCError(code: .unavailable, message: "drained")) }
    }

    /// Closes with every open call failed as UNAVAILABLE (transparent where nothing was sent).
    func fail(_ error: RPCError) {
        if inCallback > 0 {
            closeRequested = closeRequested ?? error
            return
        }
        close(error)
    }

    /// Why the connection closed (connect errors are reported to callers that find no address).
    private(set) var closeReason: RPCError?

    func close(_ error: RPCError) {
        guard state != .closed else { return }
        state = .closed
        closeReason = error
        connectTimer = nil
        keepaliveTimer = nil
        keepaliveTimeout = nil
        let open = calls
        calls.removeAll()
        for call in open.values {
            call.fail(AttemptFailure(error: error, transparent: !call.headersSent))
        }
        if let session { nghttp2_session_del(session) }
        session = nil
        if let bev { bufferevent_free(bev) }
        bev = nil
        onStateChange?(self)
        onStateChange = nil
    }
}
