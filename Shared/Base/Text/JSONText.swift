/// JSON string literals (RFC 8259 escapes; other UTF-8 passes through unchanged): the one quoter
/// for log lines, hand-written RunPod bodies and the emulator's answers.
public enum JSONText {
    private static let hex = Array("0123456789abcdef".utf8)

    /// Appends `text` as a quoted JSON string to a byte buffer.
    public static func appendQuoted(_ text: String, to out: inout [UInt8]) {
        out.append(0x22)
        for byte in text.utf8 {
            switch byte {
            case 0x22: out += [0x5C, 0x22]
            case 0x5C: out += [0x5C, 0x5C]
            case 0x0A: out += [0x5C, 0x6E]
            case 0x0D: out += [0x5C, 0x72]
            case 0x09: out += [0x5C, 0x74]
            case 0..<0x20: out += [0x5C, 0x75, 0x30, 0x30, hex[Int(byte >> 4)], hex[Int(byte & 0xF)]]
            default: out.append(byte)
            }
        }
        out.append(0x22)
    }

    /// `text` as a quoted JSON string.
    public static func quote(_ text: String) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count + 2)
        appendQuoted(text, to: &out)
        return String(decoding: out, as: UTF8.self)
    }
}
