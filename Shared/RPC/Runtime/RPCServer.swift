import CTalkMesh
import Glibc
import Logging
import TalkMeshBase
import TalkMeshMessages

/// One port serving gRPC over HTTP/2 (h2c prior knowledge, or TLS with ALPN), and HTTP/1.1 on
/// the same port, on `eventLoops` libevent loops that share the port with SO_REUSEPORT.
// @unchecked Sendable: the loops, listeners and bound ports are set by `bind()` before `run()` starts
// any thread and only read after; `signalEvents` belongs to the thread in `run()`; `shutdownStarted`
// is read and written under `stateLock`.
public final class RPCServer: @unchecked Sendable {
    /// Everything a server is configured with.
    public struct Configuration: Sendable {
        /// Address to bind (`0.0.0.0`, `::`, `127.0.0.1`…).
        public var host = "0.0.0.0"
        /// Port to bind; 0 picks a free one (read it back from `boundPort`).
        public var port = 0
        /// Event-loop threads; 0 means one per core.
        public var eventLoops = 0
        /// PEM certificate chain and key: TLS with ALPN when both are set.
        public var tlsCertificateFile: String?
        public var tlsKeyFile: String?
        /// Require client certificates signed by this CA (mutual TLS).
        public var tlsClientCAFile: String?
        /// Largest gRPC message accepted (RESOURCE_EXHAUSTED past it).
        public var maxReceiveMessageBytes = 64 << 20
        /// Largest request header block (431 over HTTP/1.1, stream reset over HTTP/2).
        public var maxHeaderBytes = 16 << 10
        /// Largest plain HTTP request body (413).
        public var maxBodyBytes = 64 << 20
        /// SETTINGS_MAX_CONCURRENT_STREAMS.
        public var maxConcurrentStreams = 4096
        /// Connections are closed gracefully after this age (±10 % jitter); 0 disables.
        public var maxConnectionAgeNanoseconds: Int64 = 300_000_000_000
        /// How long in-flight calls may run after SIGTERM or a connection's GOAWAY.
        public var drainTimeoutNanoseconds: Int64 = 30_000_000_000
        /// A connection that has not sent a complete preface or request line by then is closed.
        public var handshakeTimeoutNanoseconds: Int64 = 10_000_000_000
        /// A connection with no request in progress is closed (HTTP/2: GOAWAY) after this long;
        /// 0 disables. Keepalive PINGs do not count as activity.
        public var idleTimeoutNanoseconds: Int64 = 120_000_000_000
        /// The longest pause while a request's body arrives (408, or DEADLINE_EXCEEDED for gRPC).
        public var bodyTimeoutNanoseconds: Int64 = 30_000_000_000
        /// Request bytes one connection may hold buffered before their requests are dispatched;
        /// a stream that would go past it is refused (503 / RESOURCE_EXHAUSTED).
        public var maxConnectionBufferBytes = 128 << 20
        /// The service name used in metrics labels.
        public var serviceName = "talkmesh"
        /// A second, plaintext port serving only health (gRPC Health, /healthz, /readyz, /metrics),
        /// for Kubernetes probes when the main port requires mutual TLS.
        public var healthPort: Int?

        public init() {}
    }

    public let configuration: Configuration
    private let core: ServerCore
    /// The health-only view served on `healthPort`.
    private let healthCore: ServerCore
    private var loops: [EventLoop] = []
    /// The same loops for /metrics, whose route is made before `bind()` makes them.
    private let loopsForMetrics: LoopList
    fileprivate(set) var listenerContexts: [ListenerContext] = []
    /// The health port actually bound, when one is configured.
    public private(set) var boundHealthPort: Int?
    private var signalEvents: [OpaquePointer?] = []
    private let stateLock = PThreadMutex()
    private var shutdownStarted = false
    /// The port actually bound (differs from the configured one when that was 0).
    public private(set) var boundPort = 0

    /// The shared health service (also served as `grpc.health.v1.Health`).
    public var health: HealthService { core.health }
    /// The request metrics served at `/metrics`.
    public var metrics: RequestMetrics { core.metrics }

    /// Creates a server. `Health`, reflection (`grpc.reflection.v1`, `v1alpha`), `/healthz`, `/readyz`
    /// and `/metrics` are added to what is given.
    /// `metricsSources` add their Prometheus text to `/metrics` (a service's own metrics).
    public init(configuration: Configuration, services: RPCServiceRegistry = RPCServiceRegistry(),
                router: HTTPRouter = HTTPRouter(), health: HealthService = HealthService(),
                metricsSources: [@Sendable () -> String] = [], logger: Logger) throws {
        var configuration = configuration
        if configuration.eventLoops <= 0 { configuration.eventLoops = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }
        self.configuration = configuration
        var services = services
        health.register(into: &services)
        // Reflection lists what this server serves, itself included.
        ReflectionService(services: services.serviceNames).register(into: &services)
        for name in services.serviceNames where name != Health.name { health.setStatus(.serving, for: name) }
        let metrics = RequestMetrics(shards: configuration.eventLoops, service: configuration.serviceName,
                                     grpcMethods: services.metricNames)
        var router = router
        if router.logger == nil { router.logger = logger }
        router.add("GET", "/healthz") { _ in .text(200, "ok\n") }
        router.add("GET", "/readyz") { _ in
            health.status(of: "") == .serving ? .text(200, "ready\n") : .text(503, "not ready\n")
        }
        let loopsForMetrics = LoopList()
        self.loopsForMetrics = loopsForMetrics
        router.add("GET", "/metrics") { _ in
            HTTPResponse(status: 200, headers: [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                         body: Array((metrics.render() + ProcessMetrics.render(loops: loopsForMetrics.loops)
                                      + metricsSources.map { $0() }.joined()).utf8))
        }
        var tls: TLSContext?
        if let certificate = configuration.tlsCertificateFile, let key = configuration.tlsKeyFile {
            tls = try TLSContext(certificateFile: certificate, keyFile: key, clientCAFile: configuration.tlsClientCAFile)
        }
        core = ServerCore(configuration: configuration, registry: services, router: router, metrics: metrics,
                          health: health, logger: logger, tls: tls)
        var healthOnly = RPCServiceRegistry()
        health.register(into: &healthOnly)
        var healthRouter = HTTPRouter()
        let fullRouter = router
        for path in ["/healthz", "/readyz", "/metrics"] {
            healthRouter.add("GET", path) { request in await fullRouter.respond(to: request).0 }
        }
        healthCore = ServerCore(configuration: configuration, registry: healthOnly, router: healthRouter, metrics: metrics,
                                health: health, logger: logger, tls: nil)
    }

    /// The loops (a client in the same process can share one: `RPCClient(configuration:loop:)`).
    public var eventLoops: [EventLoop] { loops }

    /// Binds the port on every loop (SO_REUSEPORT); returns the port bound.
    @discardableResult
    public func bind() throws -> Int {
        signal(SIGPIPE, SIG_IGN)
        // A parent may hand us SIGTERM/SIGINT blocked (a supervisor, a test runner spawning from a
        // worker thread); unblocked here, before the loops' threads start, so shutdown always works.
        var shutdownSignals = sigset_t()
        sigemptyset(&shutdownSignals)
        sigaddset(&shutdownSignals, SIGTERM)
        sigaddset(&shutdownSignals, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &shutdownSignals, nil)
        loops = (0..<configuration.eventLoops).map { EventLoop(index: $0) }
        loopsForMetrics.set(loops)
        var port = configuration.port
        for loop in loops {
            let fd = try Self.listeningSocket(host: configuration.host, port: port)
            if port == 0 { port = Self.localPort(fd) }
            loop.server = self
            loop.listener = try listen(fd: fd, loop: loop, core: core)
            loop.startHousekeeping(every: housekeepingPeriod)
        }
        boundPort = port
        if let healthPort = configuration.healthPort {
            let fd = try Self.listeningSocket(host: configuration.host, port: healthPort)
            boundHealthPort = healthPort == 0 ? Self.localPort(fd) : healthPort
            loops[0].healthListener = try listen(fd: fd, loop: loops[0], core: healthCore)
        }
        return port
    }

    /// How often each loop sweeps for idle connections and stalled bodies: a quarter of the
    /// shortest timeout, between 50 ms and 1 s.
    private var housekeepingPeriod: Int64 {
        let idle = configuration.idleTimeoutNanoseconds > 0 ? configuration.idleTimeoutNanoseconds : Int64.max
        return min(1_000_000_000, max(50_000_000, min(idle, configuration.bodyTimeoutNanoseconds) / 4))
    }

    private func listen(fd: Int32, loop: EventLoop, core: ServerCore) throws -> OpaquePointer {
        let context = ListenerContext(loop: loop, core: core)
        listenerContexts.append(context)
        let listener = evconnlistener_new(loop.base, { _, fd, address, _, context in
            let context = Unmanaged<ListenerContext>.fromOpaque(context!).takeUnretainedValue()
            context.accepted()
            context.loop.server?.place(fd: fd, address: address, acceptedOn: context.loop, core: context.core)
        }, Unmanaged.passUnretained(context).toOpaque(), LEV_OPT_CLOSE_ON_FREE, 0, fd)
        guard let listener else { throw RPCError(code: .unavailable, message: "evconnlistener_new failed") }
        context.listener = listener
        evconnlistener_set_error_cb(listener) { _, context in
            Unmanaged<ListenerContext>.fromOpaque(context!).takeUnretainedValue().acceptFailed(errno)
        }
        return listener
    }

    /// Runs every loop (the calling thread runs the first) until a graceful shutdown completes.
    /// SIGTERM and SIGINT start that shutdown.
    public func run() {
        let first = loops[0]
        for signalNumber in [SIGTERM, SIGINT] {
            let event = event_new(first.base, signalNumber, Int16(EV_SIGNAL | EV_PERSIST), { signalNumber, _, context in
                let server = Unmanaged<RPCServer>.fromOpaque(context!).takeUnretainedValue()
                server.core.logger.info("received signal \(signalNumber): draining", metadata: ["signal": "\(signalNumber)"])
                server.shutdown()
            }, Unmanaged.passUnretained(self).toOpaque())
            event_add(event, nil)
            signalEvents.append(event)
        }
        var threads: [pthread_t] = []
        for loop in loops.dropFirst() {
            var thread = pthread_t()
            let context = Unmanaged.passRetained(loop).toOpaque()
            pthread_create(&thread, nil, runLoopThread, context)
            threads.append(thread)
        }
        first.run()
        for thread in threads { pthread_join(thread, nil) }
        for event in signalEvents { event_free(event) }
        signalEvents.removeAll()
    }

    /// Starts a graceful shutdown (any thread): health NOT_SERVING, listeners closed, GOAWAY on
    /// every connection, in-flight calls finish within the drain timeout, then `run()` returns.
    public func shutdown() {
        let first = stateLock.withLock { () -> Bool in
            defer { shutdownStarted = true }
            return !shutdownStarted
        }
        guard first else { return }
        core.health.enterShutdown()
        for loop in loops {
            loop.execute { loop.beginDrain(timeout: self.configuration.drainTimeoutNanoseconds) }
        }
    }

    // MARK: Accepting

    /// A new connection goes to the loop with the fewest connections, the accepting one on a tie.
    /// Every loop listens on the port (SO_REUSEPORT), and the kernel spreads connections by a hash
    /// of their addresses: a few long-lived HTTP/2 connections (a proxy's pool, a load generator)
    /// could all land on one loop, one core busy and the others idle. A connection is handed over
    /// once, before it has read a byte, so its loop owns it for life.
    private func place(fd: Int32, address: UnsafeMutablePointer<sockaddr>?, acceptedOn loop: EventLoop, core: ServerCore) {
        var target = loop
        var fewest = loop.openConnections.load(ordering: .relaxed)
        for other in loops where other !== loop {
            let count = other.openConnections.load(ordering: .relaxed)
            if count < fewest { (target, fewest) = (other, count) }
        }
        target.openConnections.add(1, ordering: .relaxed)
        let peer = Self.describe(address)
        if target === loop {
            accept(fd: fd, peer: peer, on: loop, core: core)
        } else {
            let handed = SendableDescriptor(fd: fd), chosen = target
            chosen.execute { [self] in accept(fd: handed.fd, peer: peer, on: chosen, core: core) }
        }
    }

    /// Opens the connection on its loop's thread (`place` counted it there).
    private func accept(fd: Int32, peer: String, on loop: EventLoop, core: ServerCore) {
        // Handed over while the loop began to drain: it no longer takes connections.
        guard !loop.draining else {
            Glibc.close(fd)
            loop.openConnections.subtract(1, ordering: .relaxed)
            return
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        let bev: OpaquePointer?
        if let tls = core.tls {
            guard let ssl = tls.newSSL() else {
                Glibc.close(fd)
                loop.openConnections.subtract(1, ordering: .relaxed)
                return
            }
            bev = bufferevent_openssl_socket_new(loop.base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                                 Int32(BEV_OPT_CLOSE_ON_FREE.rawValue | BEV_OPT_DEFER_CALLBACKS.rawValue))
        } else {
            bev = bufferevent_socket_new(loop.base, fd, Int32(BEV_OPT_CLOSE_ON_FREE.rawValue))
        }
        guard let bev else {
            Glibc.close(fd)
            loop.openConnections.subtract(1, ordering: .relaxed)
            return
        }
        let connection = Connection(id: loop.allocateConnectionID(), loop: loop, core: core, bev: bev, peer: peer)
        loop.connections[connection.id] = connection
        core.metrics.connectionOpened()
        connection.start()
    }

    private static func listeningSocket(host: String, port: Int) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var result: UnsafeMutablePointer<addrinfo>?
        let rv = getaddrinfo(host, String(port), &hints, &result)
        guard rv == 0, let info = result else {
            throw RPCError(code: .unavailable, message: "cannot resolve \(host): \(String(cString: gai_strerror(rv)))")
        }
        defer { freeaddrinfo(result) }
        let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
        guard fd >= 0 else { throw RPCError(code: .unavailable, message: "socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, socklen_t(MemoryLayout<Int32>.size))
        guard Glibc.bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 else {
            let message = String(cString: strerror(errno))
            Glibc.close(fd)
            throw RPCError(code: .unavailable, message: "cannot bind \(host):\(port): \(message)")
        }
        guard Glibc.listen(fd, 4096) == 0 else {
            Glibc.close(fd)
            throw RPCError(code: .unavailable, message: "listen: \(String(cString: strerror(errno)))")
        }
        evutil_make_socket_nonblocking(fd)
        return fd
    }

    private static func localPort(_ fd: Int32) -> Int {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
        }
        let family = storage.ss_family
        return withUnsafePointer(to: &storage) { pointer in
            if family == sa_family_t(AF_INET6) {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
    }

    static func describe(_ address: UnsafeMutablePointer<sockaddr>?) -> String {
        guard let address else { return "" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let length = address.pointee.sa_family == sa_family_t(AF_INET6) ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size
        guard getnameinfo(address, socklen_t(length), &host, socklen_t(host.count), &service, socklen_t(service.count),
                          NI_NUMERICHOST | NI_NUMERICSERV) == 0 else { return "" }
        return "\(cString(host)):\(cString(service))"
    }
}

/// A descriptor crossing to another loop's thread (a plain integer; only the receiver uses it).
private struct SendableDescriptor: Sendable { let fd: Int32 }

/// What a listener's callbacks need: the loop, which view of the server it serves, and the
/// accept backoff. Out of descriptors (EMFILE/ENFILE) the pending connection stays in the
/// backlog and the listener would fire again at once, spinning the loop: accepting pauses
/// instead, 10 ms doubling to 1 s, with one log line per 10 s.
final class ListenerContext {
    unowned let loop: EventLoop
    let core: ServerCore
    var listener: OpaquePointer?
    private var backoff: Int64 = 0
    private var resumeTimer: LoopTimer?
    private var lastLog: Int64 = 0
    private var failuresSinceLog = 0

    init(loop: EventLoop, core: ServerCore) {
        self.loop = loop
        self.core = core
    }

    func accepted() {
        backoff = 0
    }

    func acceptFailed(_ error: Int32) {
        failuresSinceLog += 1
        let now = MonotonicClock.nanoseconds()
        if lastLog == 0 || now - lastLog >= 10_000_000_000 {
            core.logger.error("accept failed: \(String(cString: strerror(error))); pausing accepts",
                              metadata: ["errno": "\(error)", "failures": "\(failuresSinceLog)"])
            lastLog = now
            failuresSinceLog = 0
        }
        guard let listener, !loop.draining else { return }
        evconnlistener_disable(listener)
        backoff = backoff == 0 ? 10_000_000 : min(backoff * 2, 1_000_000_000)
        resumeTimer = LoopTimer(loop: loop, after: backoff) { [weak self] in
            guard let self, let listener = self.listener, !self.loop.draining else { return }
            evconnlistener_enable(listener)
        }
    }
}

/// Thread entry point for the extra loops (a plain global function: a closure literal here
/// could be inferred main-actor isolated and trap on the new thread).
private func runLoopThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let loop = Unmanaged<EventLoop>.fromOpaque(context!).takeRetainedValue()
    ThreadName.set("event-loop")
    loop.run()
    return nil
}

extension EventLoop {
    /// Runs local completions, then flushes the connections they touched.
    func afterWork() {
        repeat {
            drainLocal()
            let pending = flushList
            flushList.removeAll(keepingCapacity: true)
            for connection in pending { connection.flush() }
        } while !flushList.isEmpty || hasLocalWork
    }

    func http2Session(_ id: UInt64) -> HTTP2ServerSession? {
        guard let connection = connections[id], case .http2(let session) = connection.mode else { return nil }
        return session
    }

    func http1Session(_ id: UInt64) -> HTTP1ServerSession? {
        guard let connection = connections[id], case .http1(let session) = connection.mode else { return nil }
        return session
    }

    func connectionClosed(_ connection: Connection) {
        connections.removeValue(forKey: connection.id)
        openConnections.subtract(1, ordering: .relaxed)
        if draining && connections.isEmpty { stop() }
    }

    /// Stops accepting, sends GOAWAY everywhere, and stops the loop when the last connection is
    /// gone or the drain timeout passes.
    func beginDrain(timeout: Int64) {
        guard !draining else { return }
        draining = true
        if let listener { evconnlistener_free(listener) }
        listener = nil
        for context in server?.listenerContexts ?? [] where context.loop === self { context.listener = nil }
        if let healthListener { evconnlistener_free(healthListener) }
        healthListener = nil
        for connection in Array(connections.values) { connection.goAway() }
        afterWork()
        if connections.isEmpty {
            stop()
            return
        }
        drainTimer = LoopTimer(loop: self, after: timeout) { [unowned self] in
            for connection in Array(self.connections.values) { connection.close() }
            self.stop()
        }
    }
}
