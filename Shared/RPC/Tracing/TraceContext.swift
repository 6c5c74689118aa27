import Glibc
import Synchronization

/// W3C Trace Context (`traceparent: 00-<trace-id>-<parent-id>-<flags>`), carried in metadata on
/// every hop. The server makes the incoming one the parent of the handler's span; the client sends
/// the current span's trace id with a new span id.
public struct TraceContext: Sendable, Hashable, CustomStringConvertible {
    /// 16 bytes, hex-encoded (32 characters).
    public var traceID: String
    /// 8 bytes, hex-encoded (16 characters): this span.
    public var spanID: String
    /// The span that caused this one, if any.
    public var parentSpanID: String?
    /// `01` when sampled.
    public var flags: UInt8
    /// The W3C `tracestate` that came with the trace (vendors' entries), passed on unchanged.
    public var traceState: String? = nil

    /// Whether the trace is sampled (W3C flag 01): its spans are recorded and exported.
    public var sampled: Bool { flags & 1 == 1 }

    /// A new root trace.
    public static func root(sampled: Bool = true) -> TraceContext {
        TraceContext(traceID: randomHex(bytes: 16), spanID: randomHex(bytes: 8), parentSpanID: nil, flags: sampled ? 1 : 0)
    }

    /// A child span of this one: same trace, new span id.
    public func child() -> TraceContext {
        TraceContext(traceID: traceID, spanID: Self.randomHex(bytes: 8), parentSpanID: spanID, flags: flags, traceState: traceState)
    }

    /// A `tracestate` header worth passing on: at most 512 visible ASCII characters (W3C's limit);
    /// nil for anything else.
    public static func validTraceState(_ header: String?) -> String? {
        guard let header, (1...512).contains(header.utf8.count), header.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) else { return nil }
        return header
    }

    /// Parses a `traceparent` header (version 00; unknown future versions are read the same way);
    /// nil when malformed or all-zero.
    public static func parse(traceparent: String) -> TraceContext? {
        let parts = traceparent.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[0].count == 2, parts[1].count == 32, parts[2].count == 16, parts[3].count == 2,
              parts[0] != "ff", parts.allSatisfy({ $0.allSatisfy(\.isHexDigit) && $0 == $0.lowercased() }),
              parts[1] != Substring(String(repeating: "0", count: 32)), parts[2] != Substring(String(repeating: "0", count: 16)),
              let flags = UInt8(parts[3], radix: 16)
        else { return nil }
        if parts[0] == "00" && parts.count != 4 { return nil }
        return TraceContext(traceID: String(parts[1]), spanID: String(parts[2]), parentSpanID: nil, flags: flags)
    }

    /// The `traceparent` header value for this span.
    public var traceparent: String {
        let hex = String(flags, radix: 16)
        return "00-\(traceID)-\(spanID)-\(hex.count == 1 ? "0" + hex : hex)"
    }

    public var description: String { traceparent }

    private static let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

    /// Ids need to be unique, not secret: SplitMix64 over a random seed and a counter is enough,
    /// and avoids a getrandom() system call per id.
    private static let seed = UInt64.random(in: 1...UInt64.max)
    private static let counter = Atomic<UInt64>(0)

    struct IDGenerator: RandomNumberGenerator {
        mutating func next() -> UInt64 {
            var z = TraceContext.seed &+ TraceContext.counter.add(1, ordering: .relaxed).newValue &* 0x9E37_79B9_7F4A_7C15
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    /// `bytes` random bytes as lower-case hex, never all zero (W3C forbids it).
    public static func randomHex(bytes: Int) -> String {
        var generator = IDGenerator()
        while true {
            var nonZero = false
            let text = String(unsafeUninitializedCapacity: bytes * 2) { buffer in
                var index = 0
                while index < bytes * 2 {
                    var word = generator.next() as UInt64
                    for _ in 0..<8 where index < bytes * 2 {
                        let byte = UInt8(truncatingIfNeeded: word)
                        word >>= 8
                        nonZero = nonZero || byte != 0
                        buffer[index] = hexDigits[Int(byte >> 4)]
                        buffer[index + 1] = hexDigits[Int(byte & 0x0F)]
                        index += 2
                    }
                }
                return bytes * 2
            }
            if nonZero { return text }
        }
    }
}
