import CTalkMesh
import Glibc
import TalkMeshBase

/// One accepted socket: a bufferevent (plain or TLS), then HTTP/2 or HTTP/1.1 once the first
/// bytes tell which (the HTTP/2 connection preface). Lives on one loop; the loop's table owns it.
final class Connection {
    enum Mode {
        case sniffing
        case http2(HTTP2ServerSession)
        case http1(HTTP1ServerSession)
    }

    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// The send side stops (nghttp2 WOULDBLOCK) past this much unsent output.
    static let outputHighWater = 128 * 1024

    let id: UInt64
    unowned let loop: EventLoop
    let core: ServerCore
    let peer: String
    /// `peer` as a span attribute, encoded at the connection's first traced call (loop thread only).
    lazy var peerSpanAttribute = RPCSpans.peerAttribute(peer)
    private(set) var bev: OpaquePointer?
    var mode: Mode = .sniffing
    private(set) var closed = false
    /// Nesting depth of nghttp2/http-parser callbacks; closing waits until it is zero.
    var callbackDepth = 0
    private var closeRequested = false
    var flushScheduled = false
    private var handshakeTimer: LoopTimer?
    private var ageTimer: LoopTimer?
    var graceTimer: LoopTimer?
    private var lingerTimer: LoopTimer?
    private var lingering = false
    let acceptedAt = MonotonicClock.nanoseconds()

    init(id: UInt64, loop: EventLoop, core: ServerCore, bev: OpaquePointer, peer: String) {
        self.id = id
        self.loop = loop
        self.core = core
        self.bev = bev
        self.peer = peer
    }

    func start() {
        let context = Unmanaged.passUnretained(self).toOpaque()
        bufferevent_setcb(bev, { _, arg in
            Connection.from(arg).onReadable()
        }, { _, arg in
            Connection.from(arg).onWritable()
        }, { _, events, arg in
            Connection.from(arg).onEvent(events)
        }, context)
        bufferevent_enable(bev, Int16(EV_READ | EV_WRITE))
        let configuration = core.configuration
        handshakeTimer = LoopTimer(loop: loop, after: configuration.handshakeTimeoutNanoseconds) { [weak self] in
            guard let self, case .sniffing = self.mode else { return }
            self.core.logger.debug("closing a connection that sent no complete preface", metadata: ["peer": "\(self.peer)"])
            self.close()
        }
        if configuration.maxConnectionAgeNanoseconds > 0 {
            // ±10 % jitter so replicas' connections do not all cycle at once.
            let jitter = Double.random(in: 0.9...1.1)
            let age = Int64(Double(configuration.maxConnectionAgeNanoseconds) * jitter)
            ageTimer = LoopTimer(loop: loop, after: age) { [weak self] in
                self?.core.logger.debug("connection reached its maximum age", metadata: ["peer": "\(self?.peer ?? "")"])
                self?.goAway()
            }
        }
    }

    static func from(_ pointer: UnsafeMutableRawPointer?) -> Connection {
        Unmanaged<Connection>.fromOpaque(pointer!).takeUnretainedValue()
    }

    // MARK: Events

    private func onReadable() {
        guard !closed, let bev else { return }
        let input = bufferevent_get_input(bev)
        if lingering {
            evbuffer_drain(input, evbuffer_get_length(input))
            return
        }
        if case .sniffing = mode {
            guard decideMode(input) else { return }
        }
        let available = evbuffer_get_length(input)
        switch mode {
        case .http2(let session): session.receive(input)
        case .http1(let session): session.receive(input)
        case .sniffing: break
        }
        let consumed = available - min(available, evbuffer_get_length(input))
        loop.bytesReceived.add(UInt64(consumed), ordering: .relaxed)
        loop.afterWork()
        finishIfRequested()
    }

    private func onWritable() {
        guard !closed else { return }
        switch mode {
        case .http2(let session): session.flush()
        case .http1(let session): session.outputDrained()
        case .sniffing: break
        }
        finishIfRequested()
    }

    private func onEvent(_ events: Int16) {
        if Int32(events) & BEV_EVENT_CONNECTED != 0 { return }  // TLS handshake done
        if Int32(events) & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT) != 0 {
            close()
        }
    }

    /// Chooses HTTP/2 when the input starts with the connection preface, HTTP/1.1 as soon as it
    /// cannot; waits while it is still a prefix of the preface.
    private func decideMode(_ input: OpaquePointer?) -> Bool {
        let available = evbuffer_get_length(input)
        let count = min(available, Connection.preface.count)
        guard count > 0, let bytes = evbuffer_pullup(input, count) else { return false }
        let matches = Connection.preface.withUnsafeBufferPointer { memcmp(bytes, $0.baseAddress!, count) == 0 }
        if matches && count < Connection.preface.count { return false }
        handshakeTimer = nil
        if matches {
            mode = .http2(HTTP2ServerSession(connection: self))
        } else {
            mode = .http1(HTTP1ServerSession(connection: self))
        }
        return true
    }

    // MARK: Output

    /// Bytes queued in the socket's output and not yet written.
    var pendingOutput: Int {
        guard let bev else { return 0 }
        return evbuffer_get_length(bufferevent_get_output(bev))
    }

    func write(_ pointer: UnsafeRawPointer, _ count: Int) {
        guard let bev, count > 0 else { return }
        bufferevent_write(bev, pointer, count)
        loop.bytesSent.add(UInt64(count), ordering: .relaxed)
    }

    /// Asks the loop to flush this connection's HTTP/2 output once the current batch is done.
    func scheduleFlush() {
        guard !flushScheduled, !closed else { return }
        flushScheduled = true
        loop.flushList.append(self)
    }

    func flush() {
        flushScheduled = false
        guard !closed else { return }
        switch mode {
        case .http2(let session): session.flush()
        case .http1, .sniffing: break
        }
        finishIfRequested()
    }

    /// Enforces the idle and body timeouts (the loop's housekeeping sweep).
    func sweep(now: Int64) {
        guard !closed, !lingering else { return }
        callbackDepth += 1
        switch mode {
        case .http2(let session): session.sweep(now: now)
        case .http1(let session): session.sweep(now: now)
        case .sniffing: break
        }
        callbackDepth -= 1
        finishIfRequested()
    }

    /// Stops reading requests (HTTP/1.1 pipelining past its bounds); TCP flow control then
    /// stops the peer.
    func pauseReading() {
        guard let bev else { return }
        bufferevent_disable(bev, Int16(EV_READ))
    }

    /// Reads again, first handling what was read before the pause.
    func resumeReading() {
        guard !closed, let bev else { return }
        bufferevent_enable(bev, Int16(EV_READ))
        if evbuffer_get_length(bufferevent_get_input(bev)) > 0 { onReadable() }
    }

    // MARK: Shutdown

    /// Graceful close: GOAWAY for HTTP/2 (in-flight streams finish), close-when-idle for HTTP/1.1.
    /// A grace timer closes whatever is left after the drain timeout.
    func goAway() {
        guard !closed else { return }
        if graceTimer == nil {
            graceTimer = LoopTimer(loop: loop, after: core.configuration.drainTimeoutNanoseconds) { [weak self] in
                self?.close()
            }
        }
        switch mode {
        case .http2(let session): session.goAway()
        case .http1(let session): session.goAway()
        case .sniffing: close()
        }
        finishIfRequested()
    }

    /// Closes after the response is out without losing it: closing a socket with unread input
    /// makes the kernel send RST, and the peer may drop the response. So: shut the write side,
    /// discard what still arrives, close on the peer's EOF or after a short linger.
    func lingeringClose() {
        guard !closed, !lingering, let bev else { return }
        guard core.tls == nil else { close(); return }
        lingering = true
        shutdown(bufferevent_getfd(bev), Int32(SHUT_WR))
        let input = bufferevent_get_input(bev)
        evbuffer_drain(input, evbuffer_get_length(input))
        lingerTimer = LoopTimer(loop: loop, after: 2_000_000_000) { [weak self] in self?.close() }
    }

    /// Closes now, or as soon as the current callback returns.
    func close() {
        if callbackDepth > 0 {
            closeRequested = true
            return
        }
        guard !closed else { return }
        closed = true
        handshakeTimer = nil
        ageTimer = nil
        graceTimer = nil
        lingerTimer = nil
        switch mode {
        case .http2(let session): session.teardown()
        case .http1(let session): session.teardown()
        case .sniffing: break
        }
        mode = .sniffing
        if let bev { bufferevent_free(bev) }
        bev = nil
        core.metrics.connectionClosed()
        loop.connectionClosed(self)
    }

    func finishIfRequested() {
        if closeRequested && callbackDepth == 0 {
            closeRequested = false
            close()
        }
    }
}
