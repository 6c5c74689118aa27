import Glibc

/// Reads the monotonic clock.
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary fixed point.
    @inline(__always)
    public static func nanoseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec)
    }

    /// The longest wait anything takes (about 100 years): a peer's timeout is clamped to it, and so
    /// is a loop timer, whose libevent arithmetic in C must not overflow.
    public static let longestWait: Int64 = 100 * 365 * 86_400 * 1_000_000_000

    /// The instant `nanoseconds` after `start`, saturating instead of trapping: a duration from a
    /// peer (a header, a setting) must never be able to overflow the clock arithmetic.
    @inline(__always)
    public static func deadline(after nanoseconds: Int64, from start: Int64 = nanoseconds()) -> Int64 {
        let (sum, overflow) = start.addingReportingOverflow(max(0, nanoseconds))
        return overflow ? Int64.max : sum
    }

    /// Seconds since the same fixed point.
    public static func seconds() -> Double {
        Double(nanoseconds()) / 1e9
    }
}

/// The monotonic clock as a value that can be replaced: what request budgets, the emulator's
/// board and leases read and wait on, so a test moves time by hand instead of sleeping.
public protocol TickSource: Sendable {
    /// Nanoseconds since an arbitrary fixed point; never goes back.
    func nanoseconds() -> Int64
    /// Returns once `nanoseconds` have passed on this clock (throws when the task is cancelled).
    func sleep(nanoseconds: Int64) async throws
}

extension TickSource {
    /// Seconds since the same fixed point.
    public func seconds() -> Double { Double(nanoseconds()) / 1e9 }
}

/// `CLOCK_MONOTONIC`, and `Task.sleep` to wait on it.
public struct SystemTicks: TickSource {
    public init() {}

    @inline(__always)
    public func nanoseconds() -> Int64 { MonotonicClock.nanoseconds() }

    public func sleep(nanoseconds: Int64) async throws {
        try await Task.sleep(nanoseconds: UInt64(max(0, min(nanoseconds, MonotonicClock.longestWait))))
    }
}
