import TalkMeshBase

/// The outcome of taking one token: allowed or not, and what the `RateLimit-*` headers say.
public struct RateDecision: Sendable, Equatable {
    public var allowed: Bool
    /// The bucket's size (RateLimit-Limit).
    public var limit: Int
    /// Whole tokens left after this request (RateLimit-Remaining).
    public var remaining: Int
    /// Seconds until the bucket is full again (RateLimit-Reset).
    public var resetSeconds: Int
    /// Seconds until one token is there (Retry-After), when refused.
    public var retryAfterSeconds: Int

    /// The `RateLimit-*` headers, with `Retry-After` when refused.
    public var headers: [(name: String, value: String)] {
        var headers = [("ratelimit-limit", String(limit)), ("ratelimit-remaining", String(remaining)),
                       ("ratelimit-reset", String(resetSeconds))]
        if !allowed { headers.append(("retry-after", String(retryAfterSeconds))) }
        return headers
    }
}

/// Where rate limits are kept: this process (`LocalRateLimiter`), or Redis for every replica.
public protocol RateLimiter: Sendable {
    /// Takes a token from the bucket `name` (refilled at `rate` per second up to `burst`).
    func take(_ name: String, rate: Double, burst: Double) async -> RateDecision
}

/// Token buckets in this process: exact for one Gateway replica.
public final class LocalRateLimiter: RateLimiter, @unchecked Sendable {
    private struct Bucket {
        var tokens: Double
        var updated: Int64
    }

    private let lock = PThreadMutex()
    private var buckets: [String: Bucket] = [:]
    private let now: @Sendable () -> Int64
    /// Buckets untouched for this long are full again and are forgotten (memory stays bounded
    /// by the keys active recently, not every key ever seen).
    private let forgetAfterNanoseconds: Int64 = 600_000_000_000
    private var lastSweep: Int64 = 0

    public init(now: @escaping @Sendable () -> Int64 = { MonotonicClock.nanoseconds() }) {
        self.now = now
    }

    public func take(_ name: String, rate: Double, burst: Double) async -> RateDecision {
        takeNow(name, rate: rate, burst: burst)
    }

    public func takeNow(_ name: String, rate: Double, burst: Double) -> RateDecision {
        let rate = max(rate, 1e-9), burst = max(burst, 1)
        let time = now()
        return lock.withLock {
            sweep(time)
            // One lookup: the bucket is updated in place.
            return Self.refill(&buckets[name, default: Bucket(tokens: burst, updated: time)], time: time, rate: rate, burst: burst)
        }
    }

    private static func refill(_ bucket: inout Bucket, time: Int64, rate: Double, burst: Double) -> RateDecision {
        bucket.tokens = min(burst, bucket.tokens + Double(time - bucket.updated) / 1e9 * rate)
        bucket.updated = time
        let allowed = bucket.tokens >= 1
        if allowed { bucket.tokens -= 1 }
        return decision(allowed: allowed, tokens: bucket.tokens, rate: rate, burst: burst)
    }

    static func decision(allowed: Bool, tokens: Double, rate: Double, burst: Double) -> RateDecision {
        RateDecision(allowed: allowed, limit: Int(burst), remaining: max(0, Int(tokens.rounded(.down))),
                     resetSeconds: Int(((burst - tokens) / rate).rounded(.up)),
                     retryAfterSeconds: max(1, Int(((1 - tokens) / rate).rounded(.up))))
    }

    private func sweep(_ time: Int64) {
        guard time - lastSweep > 60_000_000_000 else { return }
        lastSweep = time
        buckets = buckets.filter { time - $0.value.updated < forgetAfterNanoseconds }
    }
}
