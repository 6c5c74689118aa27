import Glibc

/// Wall-clock time in Unix milliseconds: what jobs record and what deadlines that outlive a
/// process are measured in. A port, so tests can move time by hand.
public protocol WallClock: Sendable {
    func nowUnixMs() -> Int64
}

/// `clock_gettime(CLOCK_REALTIME)`.
public struct SystemWallClock: WallClock {
    public init() {}

    public func nowUnixMs() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }
}
