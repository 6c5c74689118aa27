import CTalkMesh
import Dispatch
import Foundation
import Logging
import TalkMeshBase

/// Rate limits every Gateway replica shares: GCRA in a Lua script that Redis runs atomically
/// (`EVALSHA`, `EVAL` after `NOSCRIPT`), reading the server's clock so the replicas' clocks do not
/// matter. One hiredis connection on a queue of its own (never the cooperative pool); the takes
/// that arrive while it is busy go out together, pipelined. Every call is time-boxed; while Redis
/// is unreachable the limits fall back to this replica's own buckets — with a warning and a
/// metric, never to no limits and never to refusing everything — and the connection is retried
/// with backoff.
public final class RedisRateLimiter: RateLimiter, @unchecked Sendable {
    public struct Endpoint: Sendable, Equatable {
        public var host: String
        public var port: Int32
        public var password: String?
        public var database: Int

        /// `redis://[:password@]host[:port][/db]`.
        public init(url: String) throws {
            guard let components = URLComponents(string: url), components.scheme == "redis", let host = components.host, !host.isEmpty else {
                throw InvalidRedisURL(url: url)
            }
            self.host = host
            port = Int32(components.port ?? 6379)
            password = components.password.flatMap { $0.isEmpty ? nil : $0 }
            let path = components.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
            guard let database = path.isEmpty ? 0 : Int(path), database >= 0 else { throw InvalidRedisURL(url: url) }
            self.database = database
        }
    }

    /// GCRA: the key holds the theoretical arrival time (ms); a request is allowed when it is no
    /// more than `burst - 1` intervals ahead of now. Returns {allowed, tokens left}.
    static let script = """
        local rate = tonumber(ARGV[1])
        local burst = tonumber(ARGV[2])
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
        local interval = 1000 / rate
        local tat = tonumber(redis.call('GET', KEYS[1])) or now
        if tat < now then tat = now end
        local allowed = 0
        if tat - now <= (burst - 1) * interval then
          allowed = 1
          tat = tat + interval
          redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
        end
        return {allowed, string.format('%.6f', (burst * interval - (tat - now)) / interval)}
        """

    private struct Pending {
        let key: String
        let rate: Double
        let burst: Double
        let continuation: CheckedContinuation<RateDecision, Never>
    }

    private let endpoint: Endpoint
    private let timeoutMilliseconds: Int
    private let prefix: String
    private let fallback: LocalRateLimiter
    private let logger: Logger
    private let queue = DispatchQueue(label: "talkmesh.redis")
    private let lock = PThreadMutex()
    // Guarded by `lock`.
    private var pending: [Pending] = []
    private var draining = false
    private var fallbacks = 0
    private var connected = false
    // Confined to `queue`.
    private var context: UnsafeMutablePointer<redisContext>?
    private var scriptSHA = ""
    private var nextAttempt: Int64 = 0
    private var backoffNanoseconds: Int64 = 100_000_000
    private var lastWarning: Int64 = 0

    public init(endpoint: Endpoint, timeoutMilliseconds: Int = 50, prefix: String = "talkmesh:ratelimit:",
                fallback: LocalRateLimiter = LocalRateLimiter(), logger: Logger) {
        self.endpoint = endpoint
        self.timeoutMilliseconds = timeoutMilliseconds
        self.prefix = prefix
        self.fallback = fallback
        self.logger = logger
    }

    deinit {
        if let context { redisFree(context) }
    }

    public func take(_ name: String, rate: Double, burst: Double) async -> RateDecision {
        let rate = max(rate, 1e-9), burst = max(burst, 1)
        return await withCheckedContinuation { continuation in
            let start = lock.withLock {
                pending.append(Pending(key: name, rate: rate, burst: burst, continuation: continuation))
                defer { draining = true }
                return !draining
            }
            if start { queue.async { self.drain() } }
        }
    }

    /// `/metrics`: whether Redis answers, and how many takes fell back to local buckets.
    public func renderMetrics() -> String {
        let (up, fallbacks) = lock.withLock { (connected, self.fallbacks) }
        return """
            # HELP talkmesh_gateway_ratelimit_redis_up 1 while the rate limits are kept in Redis, 0 while each replica limits alone.
            # TYPE talkmesh_gateway_ratelimit_redis_up gauge
            talkmesh_gateway_ratelimit_redis_up \(up ? 1 : 0)
            # HELP talkmesh_gateway_ratelimit_fallback_total Limit decisions taken per replica because Redis was unreachable.
            # TYPE talkmesh_gateway_ratelimit_fallback_total counter
            talkmesh_gateway_ratelimit_fallback_total \(fallbacks)

            """
    }

    // MARK: On the queue

    private func drain() {
        while true {
            let batch: [Pending] = lock.withLock {
                let batch = pending
                pending.removeAll()
                if batch.isEmpty { draining = false }
                return batch
            }
            if batch.isEmpty { return }
            var answered = 0
            if connect() {
                answered = run(batch)
            }
            if answered < batch.count {
                let rest = batch[answered...]
                lock.withLock { fallbacks += rest.count }
                warnFallback(count: rest.count)
                for item in rest { item.continuation.resume(returning: fallback.takeNow(item.key, rate: item.rate, burst: item.burst)) }
            }
        }
    }

    /// Sends the batch pipelined and answers each take from Redis; returns how many were
    /// answered (the rest fall back). An I/O error or a timeout drops the connection.
    private func run(_ batch: [Pending]) -> Int {
        guard let context else { return 0 }
        for item in batch {
            _ = append(context, ["EVALSHA", scriptSHA, "1", prefix + item.key, Self.number(item.rate), Self.number(item.burst)])
        }
        for (index, item) in batch.enumerated() {
            guard var reply = receive(context) else {
                disconnect("no answer from Redis: " + Self.errorText(context))
                return index
            }
            if reply.isError && reply.text.hasPrefix("NOSCRIPT") {
                // Flushed scripts: the rest of the pipeline gets the same; each is sent again as EVAL.
                guard let evaluated = command(context, ["EVAL", Self.script, "1", prefix + item.key, Self.number(item.rate), Self.number(item.burst)]) else {
                    disconnect("no answer from Redis: " + Self.errorText(context))
                    return index
                }
                reply = evaluated
            }
            guard let decision = Self.decision(reply, rate: item.rate, burst: item.burst) else {
                logger.error("unexpected answer from the rate-limit script", metadata: ["answer": "\(reply.text)"])
                disconnect("unexpected answer")
                return index
            }
            item.continuation.resume(returning: decision)
        }
        return batch.count
    }

    /// Connects (time-boxed) when there is no connection and the backoff allows a new attempt.
    private func connect() -> Bool {
        if context != nil { return true }
        let now = MonotonicClock.nanoseconds()
        guard now >= nextAttempt else { return false }
        let timeout = timeval(tv_sec: timeoutMilliseconds / 1000, tv_usec: Int((timeoutMilliseconds % 1000) * 1000))
        guard let fresh = redisConnectWithTimeout(endpoint.host, endpoint.port, timeout) else { return failed("out of memory") }
        if fresh.pointee.err != 0 {
            let text = Self.errorText(fresh)
            redisFree(fresh)
            return failed(text)
        }
        _ = redisSetTimeout(fresh, timeout)
        _ = redisEnableKeepAlive(fresh)
        var setup: [[String]] = []
        if let password = endpoint.password { setup.append(["AUTH", password]) }
        if endpoint.database != 0 { setup.append(["SELECT", String(endpoint.database)]) }
        setup.append(["SCRIPT", "LOAD", Self.script])
        for arguments in setup {
            guard let reply = command(fresh, arguments), !reply.isError else {
                let text = fresh.pointee.err != 0 ? Self.errorText(fresh) : "\(arguments[0]) refused"
                redisFree(fresh)
                return failed(text)
            }
            if arguments[0] == "SCRIPT" { scriptSHA = reply.text }
        }
        context = fresh
        backoffNanoseconds = 100_000_000
        let wasDown = lock.withLock { defer { connected = true }; return !connected }
        if wasDown { logger.info("rate limits shared through Redis", metadata: ["redis": "\(endpoint.host):\(endpoint.port)"]) }
        return true
    }

    private func failed(_ reason: String) -> Bool {
        nextAttempt = MonotonicClock.nanoseconds() + backoffNanoseconds
        backoffNanoseconds = min(backoffNanoseconds * 2, 5_000_000_000)
        warn("Redis unreachable: rate limits are per replica until it is back", reason: reason)
        return false
    }

    private func disconnect(_ reason: String) {
        if let context { redisFree(context) }
        context = nil
        lock.withLock { connected = false }
        nextAttempt = 0
        warn("Redis connection lost: rate limits are per replica until it is back", reason: reason)
    }

    private func warnFallback(count: Int) {
        warn("rate limits taken from this replica's buckets (Redis unavailable)", reason: "\(count) request(s)")
    }

    /// One warning per 10 s at most: an outage must not flood the log.
    private func warn(_ message: String, reason: String) {
        let now = MonotonicClock.nanoseconds()
        guard now - lastWarning >= 10_000_000_000 || lastWarning == 0 else { return }
        lastWarning = now
        logger.warning("\(message)", metadata: ["reason": "\(reason)", "redis": "\(endpoint.host):\(endpoint.port)"])
    }

    // MARK: hiredis

    struct Reply {
        var type: Int32
        var integer: Int64
        var text: String
        var elements: [Reply]
        var isError: Bool { type == REDIS_REPLY_ERROR }
    }

    /// Puts one command (argv form: no quoting problems) in the output buffer; its reply is read
    /// by `receive`, after the rest of a pipeline's.
    private func append(_ context: UnsafeMutablePointer<redisContext>, _ arguments: [String]) -> Bool {
        let bytes = arguments.map { Array($0.utf8) }
        return bytes.withUnsafeBufferPointers { pointers, lengths in
            redisAppendCommandArgv(context, Int32(arguments.count), pointers, lengths)
        } == REDIS_OK
    }

    /// Sends one command and reads its reply.
    private func command(_ context: UnsafeMutablePointer<redisContext>, _ arguments: [String]) -> Reply? {
        append(context, arguments) ? receive(context) : nil
    }

    private func receive(_ context: UnsafeMutablePointer<redisContext>) -> Reply? {
        var raw: UnsafeMutableRawPointer?
        guard redisGetReply(context, &raw) == REDIS_OK, let raw else { return nil }
        defer { freeReplyObject(raw) }
        return Self.reply(raw.assumingMemoryBound(to: redisReply.self))
    }

    static func reply(_ pointer: UnsafeMutablePointer<redisReply>) -> Reply {
        let value = pointer.pointee
        var text = ""
        if let str = value.str { text = String(decoding: UnsafeRawBufferPointer(start: str, count: Int(value.len)), as: UTF8.self) }
        var elements: [Reply] = []
        if value.type == REDIS_REPLY_ARRAY, let element = value.element {
            elements = (0..<Int(value.elements)).compactMap { element[$0].map(reply) }
        }
        return Reply(type: value.type, integer: Int64(value.integer), text: text, elements: elements)
    }

    static func decision(_ reply: Reply, rate: Double, burst: Double) -> RateDecision? {
        guard reply.type == REDIS_REPLY_ARRAY, reply.elements.count == 2, reply.elements[0].type == REDIS_REPLY_INTEGER,
              let tokens = Double(reply.elements[1].text) else { return nil }
        return LocalRateLimiter.decision(allowed: reply.elements[0].integer == 1, tokens: tokens, rate: rate, burst: burst)
    }

    static func errorText(_ context: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: context.pointee.errstr) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    static func number(_ value: Double) -> String { String(format: "%.9g", value) }
}

/// REDIS_URL that is not `redis://host[:port][/db]`.
public struct InvalidRedisURL: Error, CustomStringConvertible {
    let url: String
    public var description: String { "REDIS_URL must be redis://[:password@]host[:port][/db]" }
}

extension Array where Element == [UInt8] {
    /// The arrays as C strings and lengths for an argv call (valid only inside `body`).
    func withUnsafeBufferPointers<T>(_ body: (UnsafeMutablePointer<UnsafePointer<CChar>?>, UnsafePointer<Int>) -> T) -> T {
        let lengths = map(\.count)
        let storage = UnsafeMutablePointer<UnsafeMutablePointer<CChar>>.allocate(capacity: Swift.max(count, 1))
        defer { storage.deallocate() }
        for (index, bytes) in enumerated() {
            let copy = UnsafeMutablePointer<CChar>.allocate(capacity: Swift.max(bytes.count, 1))
            for (offset, byte) in bytes.enumerated() { copy[offset] = CChar(bitPattern: byte) }
            storage[index] = copy
        }
        defer { for index in indices { storage[index].deallocate() } }
        return storage.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: count) { argv in
            lengths.withUnsafeBufferPointer { body(argv, $0.baseAddress!) }
        }
    }
}
