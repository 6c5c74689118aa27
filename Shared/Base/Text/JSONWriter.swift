/// JSON from the dictionaries and arrays the handlers build (`[String: Any]`, `[Any]`, strings,
/// booleans, integers, doubles, `NSNull`), keys sorted — what `JSONSerialization` with
/// `.sortedKeys` writes, at a fraction of its cost (it was most of a `GET /v1/jobs/{id}`).
public enum JSONWriter {
    public static func encode(_ value: Any) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        append(value, to: &out)
        return out
    }

    private static func append(_ value: Any, to out: inout [UInt8]) {
        switch value {
        case let text as String: JSONText.appendQuoted(text, to: &out)
        case let flag as Bool: out += flag ? Array("true".utf8) : Array("false".utf8)
        case let number as Int: out += Array(String(number).utf8)
        case let number as Int32: out += Array(String(number).utf8)
        case let number as Int64: out += Array(String(number).utf8)
        case let number as Double: out += Array((number.isFinite ? Self.number(number) : "null").utf8)
        case let object as [String: Any]:
            out.append(UInt8(ascii: "{"))
            for (index, member) in object.sorted(by: { $0.key < $1.key }).enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                JSONText.appendQuoted(member.key, to: &out)
                out.append(UInt8(ascii: ":"))
                append(member.value, to: &out)
            }
            out.append(UInt8(ascii: "}"))
        case let array as [Any]:
            out.append(UInt8(ascii: "["))
            for (index, item) in array.enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                append(item, to: &out)
            }
            out.append(UInt8(ascii: "]"))
        default: out += Array("null".utf8)
        }
    }

    /// Whole numbers without a fraction (`100`, as JSONSerialization writes them); others in
    /// Swift's shortest round-tripping form.
    private static func number(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return "\(value)"
    }
}
