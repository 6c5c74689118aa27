import Dispatch
import Glibc
import TalkMeshBase

/// One backend address and its current connection, with reconnect backoff.
final class Subchannel: @unchecked Sendable {  // loop-confined
    let address: ResolvedAddress
    var connection: ClientConnection?
    var failures = 0
    var reconnectTimer: LoopTimer?
    var removed = false

    init(address: ResolvedAddress) {
        self.address = address
    }

    var isReady: Bool { connection?.state == .ready }
    var isConnecting: Bool { connection?.state == .connecting }
}

/// Client-side round robin across every address of a target: one connection per address, calls
/// (not connections) balanced, re-resolution on a timer and whenever a connection drops or is
/// told to go away. Lives on the client's loop.
final class LoadBalancer: @unchecked Sendable {  // loop-confined: touched only on its loop
    let target: ClientTarget
    let configuration: RPCClient.Configuration
    unowned let loop: EventLoop
    private(set) var subchannels: [Subchannel] = []
    private var next = 0
    private var waiting: [ClientCall] = []
    private var resolveTimer: LoopTimer?
    private var resolving = false
    /// Where lookups run: a serial queue of its own (an overcommitting dispatch thread, not one of
    /// the cooperative pool's), one lookup at a time per balancer.
    private let resolver = DispatchQueue(label: "talkmesh.resolver")
    private var lastResolve: Int64 = 0
    private var resolveError: RPCError?
    private var closed = false
    private var lastConnectionError: RPCError?
    /// Every connection not yet closed, draining ones included: libevent and nghttp2 hold only
    /// unretained pointers to them, so this table is what keeps them alive.
    private var live: [ObjectIdentifier: ClientConnection] = [:]

    init(target: ClientTarget, configuration: RPCClient.Configuration, loop: EventLoop) {
        self.target = target
        self.configuration = configuration
        self.loop = loop
    }

    func start() {
        resolve()
    }

    // MARK: Resolution

    private func resolve() {
        guard !resolving, !closed else { return }
        resolving = true
        lastResolve = MonotonicClock.nanoseconds()
        let target = self.target
        let loop = self.loop
        if case .addresses(let list) = target.kind {
            resolved(.success(list))
            return
        }
        // getaddrinfo and DNS queries block for up to seconds: off the loop, and off Swift's
        // cooperative pool too (as many threads as cores; a few stuck lookups would stall every task).
        resolver.async {
            let result: Result<[ResolvedAddress], RPCError> = Result { try target.resolve() }.mapError { RPCError(from: $0) }
            loop.execute { [weak self] in self?.resolved(result) }
        }
    }

    private func resolved(_ result: Result<[ResolvedAddress], RPCError>) {
        resolving = false
        guard !closed else { return }
        switch result {
        case .success(let addresses) where !addresses.isEmpty:
            resolveError = nil
            update(addresses)
        case .success:
            resolveError = RPCError(code: .unavailable, message: "\(target) resolved to no address")
        case .failure(let error):
            resolveError = error
        }
        if configuration.resolveIntervalNanoseconds > 0 {
            resolveTimer = LoopTimer(loop: loop, after: configuration.resolveIntervalNanoseconds) { [weak self] in self?.resolve() }
        }
        settleWaiting()
    }

    /// Re-resolves soon (at most once a second), after a drop or a GOAWAY.
    func requestResolve() {
        let now = MonotonicClock.nanoseconds()
        if now - lastResolve >= 1_000_000_000 {
            resolve()
        } else if resolveTimer == nil || !resolving {
            resolveTimer = LoopTimer(loop: loop, after: 1_000_000_000 - (now - lastResolve)) { [weak self] in self?.resolve() }
        }
    }

    private func update(_ addresses: [ResolvedAddress]) {
        let wanted = Set(addresses)
        for subchannel in subchannels where !wanted.contains(subchannel.address) {
            // Gone from the name: no new calls; its calls in flight finish.
            subchannel.removed = true
            subchannel.reconnectTimer = nil
            subchannel.connection?.startDraining()
        }
        subchannels.removeAll { $0.removed }
        let known = Set(subchannels.map(\.address))
        for address in addresses where !known.contains(address) {
            let subchannel = Subchannel(address: address)
            subchannels.append(subchannel)
            connect(subchannel)
        }
    }

    // MARK: Connections

    private func connect(_ subchannel: Subchannel) {
        guard !closed, !subchannel.removed else { return }
        subchannel.reconnectTimer = nil
        let connection = ClientConnection(address: subchannel.address, authority: target.authority, loop: loop, configuration: configuration)
        connection.onStateChange = { [weak self, weak subchannel] connection in
            guard let self, let subchannel else { return }
            self.stateChanged(subchannel, connection)
        }
        subchannel.connection = connection
        live[ObjectIdentifier(connection)] = connection
        connection.connect()
    }

    private func stateChanged(_ subchannel: Subchannel, _ connection: ClientConnection) {
        switch connection.state {
        case .connecting:
            break
        case .ready:
            subchannel.failures = 0
            settleWaiting()
        case .draining:
            // GOAWAY (maximum age, shutdown): a fresh connection takes the new calls.
            if subchannel.connection === connection {
                subchannel.connection = nil
                connect(subchannel)
            }
            requestResolve()
        case .closed:
            // Released on a later turn of the loop: this runs inside the connection's own callback.
            if let closedConnection = live.removeValue(forKey: ObjectIdentifier(connection)) {
                loop.execute { withExtendedLifetime(closedConnection) {} }
            }
            if let reason = connection.closeReason, reason.message != "drained" { lastConnectionError = reason }
            if subchannel.connection === connection {
                subchannel.connection = nil
                scheduleReconnect(subchannel)
            }
            requestResolve()
            settleWaiting()
        }
    }

    private func scheduleReconnect(_ subchannel: Subchannel) {
        guard !closed, !subchannel.removed else { return }
        let base = Double(configuration.reconnectBackoffInitialNanoseconds) * pow(configuration.reconnectBackoffMultiplier, Double(subchannel.failures))
        let capped = min(base, Double(configuration.reconnectBackoffMaxNanoseconds))
        let jittered = capped * Double.random(in: (1 - configuration.reconnectBackoffJitter)...(1 + configuration.reconnectBackoffJitter))
        subchannel.failures += 1
        subchannel.reconnectTimer = LoopTimer(loop: loop, after: Int64(jittered)) { [weak self, weak subchannel] in
            guard let self, let subchannel else { return }
            self.connect(subchannel)
        }
    }

    // MARK: Picking

    private func pick() -> ClientConnection? {
        guard !subchannels.isEmpty else { return nil }
        for offset in 0..<subchannels.count {
            let subchannel = subchannels[(next + offset) % subchannels.count]
            if subchannel.isReady, let connection = subchannel.connection {
                next = (next + offset + 1) % subchannels.count
                return connection
            }
        }
        return nil
    }

    /// Sends the call on the next ready connection; waits while addresses are still connecting;
    /// fails fast (UNAVAILABLE, never sent) when none can take it.
    func submit(_ call: ClientCall) {
        guard !call.finished else { return }
        if closed {
            call.fail(AttemptFailure(error: RPCError(code: .unavailable, message: "the client is closed"), transparent: false))
            return
        }
        for _ in 0..<max(1, subchannels.count) {
            guard let connection = pick() else { break }
            if connection.start(call) { return }
        }
        if resolving || subchannels.contains(where: \.isConnecting) || (subchannels.isEmpty && resolveError == nil) {
            waiting.append(call)
            return
        }
        let reason = resolveError?.message
            ?? "no address of \(target) is reachable" + (lastConnectionError.map { " (last error: \($0.message))" } ?? "")
        call.fail(AttemptFailure(error: RPCError(code: .unavailable, message: reason), transparent: true))
    }

    /// Sends waiting calls when something became ready; fails them when nothing can.
    private func settleWaiting() {
        guard !waiting.isEmpty else { return }
        let pending = waiting.filter { !$0.finished }
        waiting.removeAll()
        for call in pending { submit(call) }
    }

    /// Takes a call out of the waiting list (deadline, cancellation).
    func abandon(_ call: ClientCall, _ error: RPCError) {
        if let index = waiting.firstIndex(where: { $0 === call }) {
            waiting.remove(at: index)
            call.fail(AttemptFailure(error: error, transparent: false))
        } else if let connection = call.connection {
            connection.cancel(call, error)
        } else {
            call.fail(AttemptFailure(error: error, transparent: false))
        }
    }

    func close() {
        closed = true
        resolveTimer = nil
        for call in waiting { call.fail(AttemptFailure(error: RPCError(code: .unavailable, message: "the client is closed"), transparent: false)) }
        waiting.removeAll()
        for subchannel in subchannels {
            subchannel.reconnectTimer = nil
            subchannel.connection?.startDraining()
        }
    }

    /// Each address and its state (for tests and diagnostics).
    func snapshot() -> [(address: String, state: String)] {
        subchannels.map { subchannel in
            let state: String
            switch subchannel.connection?.state {
            case .ready: state = "READY"
            case .connecting: state = "CONNECTING"
            case .draining: state = "DRAINING"
            case .closed, nil: state = subchannel.reconnectTimer != nil ? "TRANSIENT_FAILURE" : "IDLE"
            }
            return (subchannel.address.description, state)
        }
    }
}
