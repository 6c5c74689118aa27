import Foundation
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

    @Test("base64 written into a buffer and decoded as a stream in pieces of any size match Foundation")
    func base64Stream() throws {
        var generator = SystemRandomNumberGenerator()
        for length in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 57, 1000, 65_537] {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            // Written after a prefix, into room of exactly `encodedCount`, and nothing past it touched.
            var out = Array("prefix:".utf8) + [UInt8](repeating: 0xAA, count: Base64.encodedCount(length) + 3)
            out.withUnsafeMutableBufferPointer { output in bytes.withUnsafeBytes { Base64.write($0, to: output.baseAddress! + 7) } }
            #expect(String(decoding: out[7..<(7 + Base64.encodedCount(length))], as: UTF8.self) == Data(bytes).base64EncodedString())
            #expect(out.suffix(3) == [0xAA, 0xAA, 0xAA])
            for piece in [1, 3, 4, 7, 4096] {
                var stream = Base64Stream()
                var decoded: [UInt8] = []
                let text = Array(("data:application/octet-stream;base64," + Data(bytes).base64EncodedString()).utf8)
                var start = 0
                while start < text.count {
                    let end = min(text.count, start + piece)
                    try text[start..<end].withUnsafeBufferPointer { try stream.feed($0, into: &decoded) }
                    start = end
                }
                try stream.finish(into: &decoded)
                #expect(decoded == bytes)
            }
        }
        // Line breaks every 76 characters and the URL-safe alphabet: the groups they break or
        // hold leave the two-lookup path for the byte-by-byte one, and back.
        let bytes = (0..<10_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let wrapped = Data(bytes).base64EncodedString(options: .lineLength76Characters)
        let urlSafe = Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        for text in [wrapped, urlSafe, " " + wrapped + "\n"] {
            var stream = Base64Stream()
            var decoded: [UInt8] = []
            try Array(text.utf8).withUnsafeBufferPointer { try stream.feed($0, into: &decoded) }
            try stream.finish(into: &decoded)
            #expect(decoded == bytes)
        }
        // A character outside the alphabet at every offset of a long text (whole groups of eight
        // and of four take the fast paths and must stop at it).
        let badAtEveryOffset = (0..<40).map { offset in String(repeating: "A", count: offset) + "*" + String(repeating: "A", count: 47 - offset) }
        for bad in ["AB*D", "A", "AB=C", "=AAA", "AAAAAAA*AAAA"] + badAtEveryOffset {
            var stream = Base64Stream()
            var decoded: [UInt8] = []
            #expect(throws: Base64Stream.Failure.self) {
                try Array(bad.utf8).withUnsafeBufferPointer { try stream.feed($0, into: &decoded) }
                try stream.finish(into: &decoded)
            }
        }
    }

    @Test("JSONDocument reads every kind, resolves escapes and surrogates, and refuses what is not JSON")
    func jsonReader() throws {
        let document = try JSONDocument(Array(#" {"a": [1, -2.5e3, true, false, null, {}], "s": "x\"\u00e9\ud83d\ude42\/", "a": 7} "#.utf8))
        #expect(document.int(document.member("a", of: document.root)) == 7)
        #expect(document.string(document.member("s", of: document.root)) == "x\"é🙂/")
        #expect(document.utf8(document.member("s", of: document.root)).map(Array.init) == Array("x\"é🙂/".utf8))
        #expect(document.member("missing", of: document.root) == nil)
        #expect(document.int(document.member("s", of: document.root)) == nil)
        // A quote, an escape or a control byte at every offset of a long string (the scan reads
        // eight bytes at a time and must stop at each).
        for offset in 0..<20 {
            let head = String(repeating: "a", count: offset), tail = String(repeating: "b", count: 20 - offset)
            let escaped = try JSONDocument(Array("\"\(head)\\n\(tail)\"".utf8))
            #expect(escaped.string(escaped.root) == head + "\n" + tail)
            let short = try JSONDocument(Array("[\"\(head)\", \"\(tail)\"]".utf8))
            if case .array(let items) = short.root.kind { #expect(items.map { short.string($0) } == [head, tail]) } else { Issue.record("not an array") }
            #expect(throws: JSONDocument.Failure.self) { try JSONDocument(Array("\"\(head)\u{1F}\(tail)\"".utf8)) }
            #expect(throws: JSONDocument.Failure.self) { try JSONDocument(Array("\"\(head)\(tail)".utf8)) }
        }
        let deep = String(repeating: "[", count: JSONDocument.maxDepth + 1) + String(repeating: "]", count: JSONDocument.maxDepth + 1)
        #expect(throws: JSONDocument.Failure.tooDeep) { try JSONDocument(Array(deep.utf8)) }
        let many = "[" + Array(repeating: "1", count: JSONDocument.maxValues).joined(separator: ",") + "]"
        #expect(throws: JSONDocument.Failure.tooManyValues) { try JSONDocument(Array(many.utf8)) }
        let enough = "[" + Array(repeating: "1", count: JSONDocument.maxValues - 1).joined(separator: ",") + "]"
        #expect(throws: Never.self) { try JSONDocument(Array(enough.utf8)) }
        let nested = String(repeating: "[", count: JSONDocument.maxDepth) + String(repeating: "]", count: JSONDocument.maxDepth)
        #expect(throws: Never.self) { try JSONDocument(Array(nested.utf8)) }
        for bad in ["", "{", "{\"a\"}", "[1,]", "01", "1.", "-", "tru", "\"\\u12\"", "\"a\u{01}\"", "{} {}", "\"\\x\""] {
            #expect(throws: JSONDocument.Failure.self, "\(bad)") { try JSONDocument(Array(bad.utf8)) }
        }
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
