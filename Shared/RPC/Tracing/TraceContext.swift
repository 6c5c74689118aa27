import CTalkMesh
import Glibc

/// W3C Trace Context (`traceparent: 00-<trace-id>-<parent-id>-<flags>`), carried in metadata on
/// every hop. The server makes the incoming one the parent of the handler's span; the client sends
/// the current span's trace id with a new span id.
public struct TraceContext: Sendable, Hashable, CustomStringConvertible {
    /// The ids as numbers (the hex forms below are made when asked): a new span costs a random
    /// number, not a string.
    public var traceIDHigh: UInt64
    public var traceIDLow: UInt64
    public var spanIDValue: UInt64
    /// 0: no parent.
    public var parentSpanIDValue: UInt64
    /// `01` when sampled.
    public var flags: UInt8
    /// The W3C `tracestate` that came with the trace (vendors' entries), passed on unchanged.
    public var traceState: String? = nil

    init(high: UInt64, low: UInt64, span: UInt64, parent: UInt64, flags: UInt8, traceState: String? = nil) {
        traceIDHigh = high
        traceIDLow = low
        spanIDValue = span
        parentSpanIDValue = parent
        self.flags = flags
        self.traceState = traceState
    }

    /// From hex ids (32 and 16 lower-case hex digits); ids that do not parse become 0.
    public init(traceID: String, spanID: String, parentSpanID: String?, flags: UInt8, traceState: String? = nil) {
        let trace = Array(traceID.utf8)
        self.init(high: trace.count == 32 ? Self.hexValue(trace[0..<16]) ?? 0 : 0, low: trace.count == 32 ? Self.hexValue(trace[16..<32]) ?? 0 : 0,
                  span: Self.hexValue(Array(spanID.utf8)[...]) ?? 0, parent: parentSpanID.flatMap { Self.hexValue(Array($0.utf8)[...]) } ?? 0,
                  flags: flags, traceState: traceState)
    }

    /// 16 bytes, hex-encoded (32 characters).
    public var traceID: String {
        String(unsafeUninitializedCapacity: 32) { buffer in
            Self.putHex(traceIDHigh, buffer, at: 0)
            Self.putHex(traceIDLow, buffer, at: 16)
            return 32
        }
    }
    /// 8 bytes, hex-encoded (16 characters): this span.
    public var spanID: String { Self.hex(spanIDValue) }
    /// The span that caused this one, if any.
    public var parentSpanID: String? { parentSpanIDValue == 0 ? nil : Self.hex(parentSpanIDValue) }

    /// Whether the trace is sampled (W3C flag 01): its spans are recorded and exported.
    public var sampled: Bool { flags & 1 == 1 }

    /// A new root trace.
    public static func root(sampled: Bool = true) -> TraceContext {
        var generator = IDGenerator()
        return TraceContext(high: generator.nonZero(), low: generator.nonZero(), span: generator.nonZero(), parent: 0, flags: sampled ? 1 : 0)
    }

    /// A child span of this one: same trace, new span id.
    public func child() -> TraceContext {
        var generator = IDGenerator()
        return TraceContext(high: traceIDHigh, low: traceIDLow, span: generator.nonZero(), parent: spanIDValue, flags: flags, traceState: traceState)
    }

    /// A `tracestate` header worth passing on: at most 512 visible ASCII characters (W3C's limit);
    /// nil for anything else.
    public static func validTraceState(_ header: String?) -> String? {
        guard let header, (1...512).contains(header.utf8.count), header.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) else { return nil }
        return header
    }

    /// Parses a `traceparent` header (version 00; unknown future versions are read the same way);
    /// nil when malformed or all-zero. Byte by byte: it runs for every request that carries one.
    public static func parse(traceparent: String) -> TraceContext? {
        var text = traceparent
        return text.withUTF8 { bytes -> TraceContext? in
            // vv-<32>-<16>-ff, and for a future version possibly "-…" after it.
            guard bytes.count >= 55, bytes[2] == 0x2D, bytes[35] == 0x2D, bytes[52] == 0x2D else { return nil }
            guard let version = hexValue(bytes[0..<2]), version != 0xFF, let high = hexValue(bytes[3..<19]), let low = hexValue(bytes[19..<35]),
                  let span = hexValue(bytes[36..<52]), let flags = hexValue(bytes[53..<55]) else { return nil }
            if version == 0 && bytes.count != 55 { return nil }
            if bytes.count > 55 && bytes[55] != 0x2D { return nil }
            guard high | low != 0, span != 0 else { return nil }
            return TraceContext(high: high, low: low, span: span, parent: 0, flags: UInt8(flags))
        }
    }

    /// The value of up to 16 lower-case hex digits; nil for anything else (upper case included,
    /// as W3C requires).
    static func hexValue(_ digits: some Collection<UInt8>) -> UInt64? {
        guard !digits.isEmpty, digits.count <= 16 else { return nil }
        var value: UInt64 = 0
        for digit in digits {
            let nibble: UInt64
            switch digit {
            case 0x30...0x39: nibble = UInt64(digit - 0x30)
            case 0x61...0x66: nibble = UInt64(digit - 0x61 + 10)
            default: return nil
            }
            value = value << 4 | nibble
        }
        return value
    }

    /// 16 lower-case hex digits.
    static func hex(_ value: UInt64) -> String {
        String(unsafeUninitializedCapacity: 16) { buffer in
            putHex(value, buffer, at: 0)
            return 16
        }
    }

    /// `value` as 16 lower-case hex digits at `offset`.
    @inline(__always) static func putHex(_ value: UInt64, _ buffer: UnsafeMutableBufferPointer<UInt8>, at offset: Int) {
        for index in 0..<16 { buffer[offset + index] = hexDigit(UInt8(truncatingIfNeeded: value >> (60 - 4 * UInt64(index)))) }
    }

    /// The low nibble of `value` as a lower-case hex digit.
    @inline(__always) static func hexDigit(_ value: UInt8) -> UInt8 {
        let nibble = value & 0xF
        return nibble < 10 ? 0x30 + nibble : 0x57 + nibble
    }

    /// The `traceparent` header value for this span.
    public var traceparent: String {
        String(unsafeUninitializedCapacity: Self.traceparentLength) { buffer in
            writeTraceparent(buffer.baseAddress!)
            return Self.traceparentLength
        }
    }

    /// A `traceparent` value's length in bytes.
    static let traceparentLength = 55

    /// Writes the `traceparent` value (`traceparentLength` bytes) at `start`.
    func writeTraceparent(_ start: UnsafeMutablePointer<UInt8>) {
        let buffer = UnsafeMutableBufferPointer(start: start, count: Self.traceparentLength)
        buffer[0] = 0x30; buffer[1] = 0x30; buffer[2] = 0x2D
        Self.putHex(traceIDHigh, buffer, at: 3)
        Self.putHex(traceIDLow, buffer, at: 19)
        buffer[35] = 0x2D
        Self.putHex(spanIDValue, buffer, at: 36)
        buffer[52] = 0x2D
        buffer[53] = Self.hexDigit(flags >> 4)
        buffer[54] = Self.hexDigit(flags)
    }

    public var description: String { traceparent }


    /// Ids need to be unique, not secret: SplitMix64 over a per-thread state (`tm_next_id`),
    /// which costs neither a getrandom() system call nor an atomic shared by every thread.
    struct IDGenerator: RandomNumberGenerator {
        @inline(__always) mutating func next() -> UInt64 { tm_next_id() }

        /// Never 0 (W3C forbids all-zero ids; 0 also means "no parent" here).
        mutating func nonZero() -> UInt64 {
            while true {
                let value = next()
                if value != 0 { return value }
            }
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
                        buffer[index] = hexDigit(byte >> 4)
                        buffer[index + 1] = hexDigit(byte)
                        index += 2
                    }
                }
                return bytes * 2
            }
            if nonZero { return text }
        }
    }
}
