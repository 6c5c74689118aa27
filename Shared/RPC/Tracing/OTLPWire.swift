import Synchronization
import TalkMeshBase
import Tracing

/// Protocol-buffer wire format, just what OTLP needs: varints, fixed64, length-delimited fields.
/// Spans keep their attributes already in this form (OTLP `KeyValue`s, field 9 of `Span`), so a
/// set attribute costs an append, and export copies bytes instead of walking a dictionary.
public struct ProtoWriter: Sendable {
    public var bytes: [UInt8] = []

    public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    public mutating func tag(_ field: Int, _ wireType: UInt8) { rawVarint(UInt64(field) << 3 | UInt64(wireType)) }

    public mutating func rawVarint(_ value: UInt64) {
        var value = value
        while value >= 0x80 {
            bytes.append(UInt8(value & 0x7F) | 0x80)
            value >>= 7
        }
        bytes.append(UInt8(value))
    }

    public mutating func varint(_ field: Int, _ value: UInt64) {
        tag(field, 0)
        rawVarint(value)
    }

    public mutating func fixed64(_ field: Int, _ value: UInt64) {
        tag(field, 1)
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func bytes(_ field: Int, _ value: some Collection<UInt8>) {
        tag(field, 2)
        rawVarint(UInt64(value.count))
        bytes.append(contentsOf: value)
    }

    public mutating func string(_ field: Int, _ value: String) {
        var value = value
        value.withUTF8 { bytes(field, $0) }
    }

    /// An id as OTLP's bytes field: big-endian, 8 bytes (a span id) or 16 (`high` then `low`, a trace id).
    public mutating func id(_ field: Int, _ high: UInt64, _ low: UInt64? = nil) {
        tag(field, 2)
        rawVarint(low == nil ? 8 : 16)
        withUnsafeBytes(of: high.bigEndian) { bytes.append(contentsOf: $0) }
        if let low { withUnsafeBytes(of: low.bigEndian) { bytes.append(contentsOf: $0) } }
    }

    /// A nested message in a writer of its own (cold paths).
    public mutating func message(_ field: Int, _ body: (inout ProtoWriter) -> Void) {
        var nested = ProtoWriter()
        body(&nested)
        bytes(field, nested.bytes)
    }

    /// `KeyValue { key = 1, value = 2: AnyValue { string 1 | bool 2 | int 3 | double 4 } }` as
    /// field `field`, its lengths computed up front (no nested buffer).
    public mutating func keyValue(_ field: Int, _ key: String, _ value: SpanAttribute) {
        var key = key
        key.withUTF8 { keyBytes in
            switch value {
            case .string(let text):
                var text = text
                text.withUTF8 { textBytes in
                    let any = 1 + Self.varintSize(UInt64(textBytes.count)) + textBytes.count
                    frameKeyValue(field, keyBytes, anySize: any) {
                        $0.tag(1, 2)
                        $0.rawVarint(UInt64(textBytes.count))
                        $0.bytes.append(contentsOf: textBytes)
                    }
                }
            case .bool(let flag):
                frameKeyValue(field, keyBytes, anySize: 2) { $0.varint(2, flag ? 1 : 0) }
            case .int64(let number):
                frameKeyValue(field, keyBytes, anySize: 1 + Self.varintSize(UInt64(bitPattern: number))) { $0.varint(3, UInt64(bitPattern: number)) }
            case .int32(let number):
                let wide = UInt64(bitPattern: Int64(number))
                frameKeyValue(field, keyBytes, anySize: 1 + Self.varintSize(wide)) { $0.varint(3, wide) }
            case .double(let number):
                frameKeyValue(field, keyBytes, anySize: 9) { $0.fixed64(4, number.bitPattern) }
            default:
                keyValue(field, String(decoding: keyBytes, as: UTF8.self), .string("\(value)"))
            }
        }
    }

    private mutating func frameKeyValue(_ field: Int, _ key: UnsafeBufferPointer<UInt8>, anySize: Int, _ any: (inout ProtoWriter) -> Void) {
        let inner = 1 + Self.varintSize(UInt64(key.count)) + key.count + 1 + Self.varintSize(UInt64(anySize)) + anySize
        tag(field, 2)
        rawVarint(UInt64(inner))
        tag(1, 2)
        rawVarint(UInt64(key.count))
        bytes.append(contentsOf: key)
        tag(2, 2)
        rawVarint(UInt64(anySize))
        any(&self)
    }

    public static func varintSize(_ value: UInt64) -> Int {
        var value = value, size = 1
        while value >= 0x80 {
            value >>= 7
            size += 1
        }
        return size
    }
}

/// Bytes made once and kept for the life of the process (a route's or method's span name and
/// attributes, a status code's attribute), outside any reference-counted buffer: every core
/// reads them for every request, and a retain and release of one shared buffer is an atomic the
/// cores contend on. Bytes made for one request are lent (`lending`), never kept: a client must
/// not be able to make the process keep memory.
public struct KeptBytes: @unchecked Sendable {
    public let buffer: UnsafeBufferPointer<UInt8>

    /// Copies made so far (tests: a request keeps none).
    static let made = Atomic<Int>(0)

    /// A copy that is never freed.
    public init(_ bytes: [UInt8]) {
        Self.made.add(1, ordering: .relaxed)
        let storage = UnsafeMutablePointer<UInt8>.allocate(capacity: max(bytes.count, 1))
        storage.initialize(from: bytes, count: bytes.count)
        buffer = UnsafeBufferPointer(start: storage, count: bytes.count)
    }

    public init(utf8 text: String) { self.init(Array(text.utf8)) }

    public init(borrowing buffer: UnsafeBufferPointer<UInt8>) { self.buffer = buffer }

    /// `body` with `bytes` viewed as `KeptBytes` while it runs; nothing is kept.
    public static func lending<R>(_ bytes: [UInt8], _ body: (KeptBytes) throws -> R) rethrows -> R {
        try bytes.withUnsafeBufferPointer { try body(KeptBytes(borrowing: $0)) }
    }

    public var count: Int { buffer.count }

    public static let empty = KeptBytes([])

    /// A table made once, read without touching an array's reference count.
    public static func table(_ entries: [KeptBytes]) -> UnsafeBufferPointer<KeptBytes> {
        let storage = UnsafeMutablePointer<KeptBytes>.allocate(capacity: max(entries.count, 1))
        storage.initialize(from: entries, count: entries.count)
        return UnsafeBufferPointer(start: storage, count: entries.count)
    }
}

/// Writes protocol-buffer fields into memory sized in advance (an export's body, whose every
/// length is computed first): no capacity or uniqueness check per byte, as `ProtoWriter` has.
/// The caller guarantees the room; `end` says how far it wrote.
public struct ProtoCursor {
    public private(set) var end: UnsafeMutablePointer<UInt8>

    public init(_ start: UnsafeMutablePointer<UInt8>) { end = start }

    @inline(__always) public mutating func rawVarint(_ value: UInt64) {
        var value = value
        while value >= 0x80 {
            end.pointee = UInt8(truncatingIfNeeded: value) | 0x80
            end += 1
            value >>= 7
        }
        end.pointee = UInt8(value)
        end += 1
    }

    @inline(__always) public mutating func tag(_ field: Int, _ wireType: UInt8) { rawVarint(UInt64(field) << 3 | UInt64(wireType)) }

    public mutating func varint(_ field: Int, _ value: UInt64) {
        tag(field, 0)
        rawVarint(value)
    }

    public mutating func fixed64(_ field: Int, _ value: UInt64) {
        tag(field, 1)
        UnsafeMutableRawPointer(end).storeBytes(of: value.littleEndian, as: UInt64.self)
        end += 8
    }

    /// An id: 8 bytes big-endian (a span id), or 16 (`high` then `low`, a trace id).
    public mutating func id(_ field: Int, _ high: UInt64, _ low: UInt64? = nil) {
        tag(field, 2)
        rawVarint(low == nil ? 8 : 16)
        UnsafeMutableRawPointer(end).storeBytes(of: high.bigEndian, as: UInt64.self)
        end += 8
        if let low {
            UnsafeMutableRawPointer(end).storeBytes(of: low.bigEndian, as: UInt64.self)
            end += 8
        }
    }

    /// Bytes as they are (already framed).
    public mutating func raw(_ bytes: [UInt8]) {
        bytes.withUnsafeBufferPointer { raw($0) }
    }

    public mutating func raw(_ bytes: UnsafeBufferPointer<UInt8>) {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return }
        end.update(from: base, count: bytes.count)
        end += bytes.count
    }

    /// A length-delimited field.
    public mutating func bytes(_ field: Int, _ bytes: UnsafeBufferPointer<UInt8>) {
        tag(field, 2)
        rawVarint(UInt64(bytes.count))
        raw(bytes)
    }

    public mutating func bytes(_ field: Int, _ bytes: [UInt8]) {
        tag(field, 2)
        rawVarint(UInt64(bytes.count))
        raw(bytes)
    }

    public mutating func string(_ field: Int, _ text: String) {
        var text = text
        text.withUTF8 { utf8 in
            tag(field, 2)
            rawVarint(UInt64(utf8.count))
            raw(utf8)
        }
    }

    /// The size of a length-delimited field of `count` bytes (field numbers below 16).
    public static func fieldSize(_ count: Int) -> Int { 1 + ProtoWriter.varintSize(UInt64(count)) + count }
}
