import TalkMeshBase

/// A request budget per route and endpoint (RunPod: `/run` 1000 and `/status` 2000 per 10 s):
/// a sliding window that makes callers wait rather than ever exceed it, however many jobs poll.
public actor RequestBudget: RequestGate {
    private let limit: Int
    private let window: Double
    private var times: [Double] = []
    private var head = 0
    private let clock: any TickSource

    /// `limit` requests per `window` seconds, on `clock` (the monotonic clock unless a test moves time).
    public init(limit: Int, window: Double, clock: any TickSource = SystemTicks()) {
        self.limit = max(1, limit)
        self.window = window
        self.clock = clock
    }

    /// Waits for room in the window, then takes it.
    public func acquire() async throws {
        _ = try await take()
    }

    /// `acquire()`, returning the monotonic instant the slot was granted — the time the window counts.
    public func take() async throws -> Double {
        while true {
            let now = clock.seconds()
            while head < times.count && now - times[head] >= window { head += 1 }
            if head > 4096 { times.removeFirst(head); head = 0 }
            if times.count - head < limit {
                times.append(now)
                return now
            }
            let wait = times[head] + window - now + 0.001
            try await clock.sleep(nanoseconds: Int64(max(wait, 0.001) * 1e9))
        }
    }
}
