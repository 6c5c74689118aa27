import Testing
import TalkMeshBase

@Suite("Base: text helpers")
struct TextTests {
    @Test("base64 round-trips all lengths and accepts missing padding")
    func base64() {
        for length in 0..<40 {
            let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 * 37 + 11) }
            let encoded = Base64.encode(bytes)
            #expect(encoded.count % 4 == 0)
            #expect(Base64.decode(encoded) == bytes)
            #expect(Base64.decode(String(encoded.prefix { $0 != "=" })) == bytes)
        }
        #expect(Base64.encode(Array("foobar".utf8)) == "Zm9vYmFy")
        #expect(Base64.decode("not base64!") == nil)
    }

    @Test("hex encodes lower-case and decodes either case, rejecting odd or foreign digits")
    func hex() {
        #expect(Hex.encode([0x00, 0xAB, 0x7F, 0xFF]) == "00ab7fff")
        #expect(Hex.bytes("00AB7fFF") == [0x00, 0xAB, 0x7F, 0xFF])
        #expect(Hex.bytes("abc") == nil)
        #expect(Hex.bytes("zz") == nil)
        #expect(Hex.digitValue(UInt8(ascii: "g")) == nil)
    }

    @Test("JSON quoting escapes quotes, backslashes and control bytes, and passes other UTF-8 through")
    func jsonQuote() {
        #expect(JSONText.quote("a\"b\\c\n\r\t\u{01}") == #""a\"b\\c\n\r\t\u0001""#)
        #expect(JSONText.quote("é 日本") == "\"é 日本\"")
        var bytes: [UInt8] = [0x5B]
        JSONText.appendQuoted("x", to: &bytes)
        #expect(bytes == Array("[\"x\"".utf8))
    }

    @Test("trimming removes leading and trailing whitespace only")
    func trimming() {
        #expect("  a b \t\n".trimmingWhitespace == "a b")
        #expect("".trimmingWhitespace == "")
        #expect(" \t ".trimmingWhitespace == "")
    }

    @Test("a C buffer becomes the text before its first NUL")
    func cBuffer() {
        #expect(cString([104, 105, 0, 120]) == "hi")
        #expect(cString([104, 105]) == "hi")
        #expect(cString([]) == "")
    }
}
