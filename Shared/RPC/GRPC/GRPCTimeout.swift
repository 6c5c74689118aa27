import TalkMeshBase

/// The `grpc-timeout` header: at most 8 ASCII digits and a unit (H, M, S, m, u, n).
public enum GRPCTimeout {
    /// The longest timeout honoured (about 100 years). The spec allows 99999999H (over 11,000
    /// years), which no Int64 nanosecond clock can add to `now`: a longer one is clamped here, so
    /// every deadline computed from a peer's header stays far from overflow.
    public static let maximumNanoseconds = MonotonicClock.longestWait

    /// The timeout in nanoseconds (at most `maximumNanoseconds`), or nil when the value is malformed.
    public static func parse(_ bytes: UnsafeBufferPointer<UInt8>) -> Int64? {
        guard bytes.count >= 2, bytes.count <= 9 else { return nil }
        var value: Int64 = 0
        for index in 0..<(bytes.count - 1) {
            let byte = bytes[index]
            guard byte >= 0x30, byte <= 0x39 else { return nil }
            value = value * 10 + Int64(byte - 0x30)
        }
        let multiplier: Int64
        switch bytes[bytes.count - 1] {
        case UInt8(ascii: "H"): multiplier = 3_600_000_000_000
        case UInt8(ascii: "M"): multiplier = 60_000_000_000
        case UInt8(ascii: "S"): multiplier = 1_000_000_000
        case UInt8(ascii: "m"): multiplier = 1_000_000
        case UInt8(ascii: "u"): multiplier = 1_000
        case UInt8(ascii: "n"): multiplier = 1
        default: return nil
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? maximumNanoseconds : min(product, maximumNanoseconds)
    }

    /// Parses a `String` form (tests, clients).
    public static func parse(_ text: String) -> Int64? {
        var copy = Array(text.utf8)
        return copy.withUnsafeMutableBufferPointer { parse(UnsafeBufferPointer($0)) }
    }

    /// Encodes nanoseconds in the largest unit that keeps 8 digits, rounding up.
    public static func encode(nanoseconds: Int64) -> String {
        let units: [(Int64, Character)] = [(1, "n"), (1_000, "u"), (1_000_000, "m"), (1_000_000_000, "S"),
                                           (60_000_000_000, "M"), (3_600_000_000_000, "H")]
        let value = max(0, nanoseconds)
        for (size, unit) in units {
            let amount = value / size + (value % size == 0 ? 0 : 1)  // rounds up without overflowing
            if amount < 100_000_000 { return "\(amount)\(unit)" }
        }
        return "99999999H"
    }
}
