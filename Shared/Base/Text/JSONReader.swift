/// A JSON document (RFC 8259) read without Foundation. Every value keeps its place in the source,
/// so a string of megabytes (a RunPod video in base64) stays a slice of the bytes received
/// instead of becoming a `String` first; strings are unescaped only when asked for.
public struct JSONDocument: Sendable {
    public enum Failure: Error, Equatable { case invalid(offset: Int), tooDeep, tooManyValues }

    /// One value: its kind, and where it is in `bytes` (a string's range excludes its quotes).
    public struct Value: Sendable {
        public enum Kind: Sendable {
            case null, bool(Bool), number
            /// `escaped`: the text holds backslash escapes (its bytes are not its value).
            case string(escaped: Bool)
            case array([Value])
            case object([Member])
        }

        public let kind: Kind
        public let range: Range<Int>
    }

    public struct Member: Sendable {
        public let name: String
        public let value: Value
    }

    public let bytes: [UInt8]
    public let root: Value
    /// Arrays and objects nest at most this deep.
    public static let maxDepth = 64
    /// A document holds at most this many values: the tree costs about 40 bytes a value, so
    /// ten megabytes of `[1,1,1,…]` cannot become hundreds of megabytes of it.
    public static let maxValues = 100_000

    public init(_ bytes: [UInt8]) throws(Failure) {
        self.bytes = bytes
        var reader = Reader(bytes: bytes)
        reader.skipSpace()
        root = try reader.value(depth: 0)
        reader.skipSpace()
        guard reader.index == bytes.count else { throw .invalid(offset: reader.index) }
    }

    /// The member `name` of an object (the last, if given twice, as JSONSerialization does), or
    /// nil when `value` is not an object or has no such member.
    public func member(_ name: String, of value: Value) -> Value? {
        guard case .object(let members) = value.kind else { return nil }
        return members.last { $0.name == name }?.value
    }

    /// A string's value; nil for any other kind.
    public func string(_ value: Value?) -> String? {
        guard let value, case .string(let escaped) = value.kind else { return nil }
        let text = bytes[value.range]
        return escaped ? String(decoding: Self.unescape(text), as: UTF8.self) : String(decoding: text, as: UTF8.self)
    }

    /// A string's value as UTF-8 bytes, without a copy when it holds no escapes.
    public func utf8(_ value: Value?) -> ArraySlice<UInt8>? {
        guard let value, case .string(let escaped) = value.kind else { return nil }
        return escaped ? Self.unescape(bytes[value.range])[...] : bytes[value.range]
    }

    /// A number that is a whole value within `Int`; nil otherwise.
    public func int(_ value: Value?) -> Int? {
        guard let value, case .number = value.kind else { return nil }
        let text = String(decoding: bytes[value.range], as: UTF8.self)
        if let exact = Int(text) { return exact }
        guard let number = Double(text), number.rounded() == number, abs(number) < 9.2e18 else { return nil }
        return Int(number)
    }

    /// The value as written in the source.
    public func text(_ value: Value) -> String {
        if case .string = value.kind { return String(decoding: bytes[(value.range.lowerBound - 1)..<(value.range.upperBound + 1)], as: UTF8.self) }
        return String(decoding: bytes[value.range], as: UTF8.self)
    }

    /// Resolves a string's escapes (already checked by the reader). A lone surrogate becomes U+FFFD.
    static func unescape(_ text: ArraySlice<UInt8>) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(text.count)
        var index = text.startIndex
        func hex4(_ at: Int) -> UInt32 {
            var value: UInt32 = 0
            for byte in text[at..<(at + 4)] { value = value << 4 | UInt32(Hex.digitValue(byte) ?? 0) }
            return value
        }
        while index < text.endIndex {
            let byte = text[index]
            guard byte == UInt8(ascii: "\\") else {
                out.append(byte)
                index += 1
                continue
            }
            let escape = text[index + 1]
            index += 2
            switch escape {
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = hex4(index)
                index += 4
                if (0xD800..<0xDC00).contains(scalar), index + 6 <= text.endIndex, text[index] == UInt8(ascii: "\\"),
                   text[index + 1] == UInt8(ascii: "u"), case let low = hex4(index + 2), (0xDC00..<0xE000).contains(low) {
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    index += 6
                }
                out.append(contentsOf: UTF8.encode(Unicode.Scalar(scalar) ?? "\u{FFFD}")!)
            default: out.append(escape)  // " \ /
            }
        }
        return out
    }

    private struct Reader {
        let bytes: [UInt8]
        var index = 0
        var values = 0

        init(bytes: [UInt8]) {
            self.bytes = bytes
        }

        mutating func skipSpace() {
            while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x0A || bytes[index] == 0x0D || bytes[index] == 0x09 {
                index += 1
            }
        }

        func fail() -> Failure { .invalid(offset: index) }

        mutating func value(depth: Int) throws(Failure) -> Value {
            guard index < bytes.count else { throw fail() }
            values += 1
            guard values <= JSONDocument.maxValues else { throw .tooManyValues }
            let start = index
            switch bytes[index] {
            case UInt8(ascii: "{"):
                guard depth < JSONDocument.maxDepth else { throw .tooDeep }
                index += 1
                var members: [Member] = []
                skipSpace()
                if index < bytes.count && bytes[index] == UInt8(ascii: "}") {
                    index += 1
                    return Value(kind: .object(members), range: start..<index)
                }
                while true {
                    skipSpace()
                    guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw fail() }
                    let (range, escaped) = try string()
                    let name = escaped ? String(decoding: JSONDocument.unescape(bytes[range]), as: UTF8.self)
                        : String(decoding: bytes[range], as: UTF8.self)
                    skipSpace()
                    guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw fail() }
                    index += 1
                    skipSpace()
                    members.append(Member(name: name, value: try value(depth: depth + 1)))
                    skipSpace()
                    guard index < bytes.count else { throw fail() }
                    if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                    guard bytes[index] == UInt8(ascii: "}") else { throw fail() }
                    index += 1
                    return Value(kind: .object(members), range: start..<index)
                }
            case UInt8(ascii: "["):
                guard depth < JSONDocument.maxDepth else { throw .tooDeep }
                index += 1
                var items: [Value] = []
                skipSpace()
                if index < bytes.count && bytes[index] == UInt8(ascii: "]") {
                    index += 1
                    return Value(kind: .array(items), range: start..<index)
                }
                while true {
                    skipSpace()
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard index < bytes.count else { throw fail() }
                    if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                    guard bytes[index] == UInt8(ascii: "]") else { throw fail() }
                    index += 1
                    return Value(kind: .array(items), range: start..<index)
                }
            case UInt8(ascii: "\""):
                let (range, escaped) = try string()
                return Value(kind: .string(escaped: escaped), range: range)
            case UInt8(ascii: "t"): try literal("true"); return Value(kind: .bool(true), range: start..<index)
            case UInt8(ascii: "f"): try literal("false"); return Value(kind: .bool(false), range: start..<index)
            case UInt8(ascii: "n"): try literal("null"); return Value(kind: .null, range: start..<index)
            default:
                try number()
                return Value(kind: .number, range: start..<index)
            }
        }

        mutating func literal(_ word: StaticString) throws(Failure) {
            let count = word.utf8CodeUnitCount
            guard index + count <= bytes.count else { throw fail() }
            for offset in 0..<count where bytes[index + offset] != word.utf8Start[offset] { throw fail() }
            index += count
        }

        /// A string from its opening quote: the range inside the quotes, and whether it has escapes.
        mutating func string() throws(Failure) -> (Range<Int>, Bool) {
            index += 1
            let start = index
            var escaped = false
            let found: Bool = bytes.withUnsafeBufferPointer { buffer in
                let end = buffer.count
                while index < end {
                    // Eight bytes at a time while none is a quote, a backslash or a control byte
                    // (a video's megabytes of base64 have none).
                    if index + 8 <= end {
                        let word = UInt64(littleEndian: UnsafeRawPointer(buffer.baseAddress! + index).loadUnaligned(as: UInt64.self))
                        let ones: UInt64 = 0x0101_0101_0101_0101, highs: UInt64 = 0x8080_8080_8080_8080
                        func zeroByte(_ x: UInt64) -> UInt64 { (x &- ones) & ~x & highs }
                        let special = zeroByte(word ^ (0x22 &* ones)) | zeroByte(word ^ (0x5C &* ones)) | ((word &- 0x20 &* ones) & ~word & highs)
                        if special == 0 {
                            index += 8
                            continue
                        }
                    }
                    let byte = buffer[index]
                    if byte == UInt8(ascii: "\"") { return true }
                    if byte < 0x20 { return false }
                    if byte == UInt8(ascii: "\\") {
                        escaped = true
                        guard index + 1 < end else { return false }
                        switch buffer[index + 1] {
                        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"),
                             UInt8(ascii: "n"), UInt8(ascii: "r"), UInt8(ascii: "t"):
                            index += 2
                        case UInt8(ascii: "u"):
                            guard index + 6 <= end, (2..<6).allSatisfy({ Hex.digitValue(buffer[index + $0]) != nil }) else { return false }
                            index += 6
                        default:
                            return false
                        }
                        continue
                    }
                    index += 1
                }
                return false
            }
            guard found else { throw fail() }
            let range = start..<index
            index += 1
            return (range, escaped)
        }

        /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
        mutating func number() throws(Failure) {
            func digit(_ at: Int) -> Bool { at < bytes.count && bytes[at] >= UInt8(ascii: "0") && bytes[at] <= UInt8(ascii: "9") }
            if index < bytes.count && bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard digit(index) else { throw fail() }
            if bytes[index] == UInt8(ascii: "0") { index += 1 } else { while digit(index) { index += 1 } }
            if index < bytes.count && bytes[index] == UInt8(ascii: ".") {
                index += 1
                guard digit(index) else { throw fail() }
                while digit(index) { index += 1 }
            }
            if index < bytes.count && (bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E")) {
                index += 1
                if index < bytes.count && (bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-")) { index += 1 }
                guard digit(index) else { throw fail() }
                while digit(index) { index += 1 }
            }
        }
    }
}

extension JSONDocument.Value {
    public var isNull: Bool {
        if case .null = kind { return true }
        return false
    }
}
