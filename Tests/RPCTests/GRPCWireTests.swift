import TalkMeshBase
import Testing
@testable import TalkMeshRPC

@Suite("gRPC wire format")
struct GRPCWireTests {
    @Test("grpc-timeout units parse to nanoseconds", arguments: [
        ("1H", Int64(3_600_000_000_000)), ("2M", 120_000_000_000), ("3S", 3_000_000_000),
        ("250m", 250_000_000), ("7u", 7_000), ("99999999n", 99_999_999),
    ])
    func timeoutParses(text: String, nanoseconds: Int64) {
        #expect(GRPCTimeout.parse(text) == nanoseconds)
    }

    @Test("malformed grpc-timeout values are rejected", arguments: ["", "S", "10", "123456789S", "1x", "-1S", "1.5S", "ab"])
    func timeoutRejects(text: String) {
        #expect(GRPCTimeout.parse(text) == nil)
    }

    @Test("the largest timeouts the spec allows are clamped, never overflow", arguments: ["99999999H", "2562048H", "2562047H", "99999999M"])
    func timeoutClamps(text: String) {
        let parsed = GRPCTimeout.parse(text)!
        #expect(parsed <= GRPCTimeout.maximumNanoseconds)
        #expect(parsed > 0)
        // A deadline from it, at any instant of the clock, is representable.
        #expect(MonotonicClock.deadline(after: parsed) > MonotonicClock.nanoseconds())
        #expect(MonotonicClock.deadline(after: parsed, from: Int64.max - 1) == Int64.max)
        #expect(MonotonicClock.deadline(after: -5, from: 100) == 100)
    }

    @Test("encoding the largest durations does not overflow")
    func timeoutEncodesExtremes() {
        #expect(GRPCTimeout.encode(nanoseconds: Int64.max) == "2562048H")
        #expect(GRPCTimeout.encode(nanoseconds: Int64.min) == "0n")
        #expect(GRPCTimeout.encode(nanoseconds: GRPCTimeout.maximumNanoseconds) == "52560000M")
    }

    @Test("encoded timeouts keep 8 digits and round up")
    func timeoutEncodes() {
        #expect(GRPCTimeout.encode(nanoseconds: 500) == "500n")
        #expect(GRPCTimeout.encode(nanoseconds: 1_500_000_000) == "1500000u")
        #expect(GRPCTimeout.encode(nanoseconds: 3_600_000_000_000_000) == "3600000S")
        #expect(GRPCTimeout.encode(nanoseconds: 360_000_000_000_000_000) == "6000000M")
        for value: Int64 in [1, 999, 123_456_789, 86_400_000_000_000] {
            let parsed = GRPCTimeout.parse(GRPCTimeout.encode(nanoseconds: value))!
            #expect(parsed >= value)
        }
    }

    @Test("grpc-message percent-encoding round-trips and escapes only what it must")
    func percentEncoding() {
        #expect(PercentEncoding.encode("plain text ok") == "plain text ok")
        #expect(PercentEncoding.encode("50% off") == "50%25 off")
        #expect(PercentEncoding.encode("a\nb") == "a%0Ab")
        #expect(PercentEncoding.encode("é") == "%C3%A9")
        for text in ["", "héllo wörld — ✓", "%%%", "tab\there", "\u{0}\u{7F}"] {
            #expect(PercentEncoding.decode(PercentEncoding.encode(text)) == text)
        }
        #expect(PercentEncoding.decode("bad %ZZ escape %4") == "bad %ZZ escape %4")
    }

    @Test("a message split at every byte is reassembled")
    func readerReassembles() throws {
        let payload = (0..<1000).map { UInt8(truncatingIfNeeded: $0) }
        let framed = GRPCFraming.frame(payload) + GRPCFraming.frame([])
        var reader = GRPCMessageReader(maxMessageBytes: 4096)
        for byte in framed {
            try [byte].withUnsafeBufferPointer { try reader.append($0) }
        }
        let messages = reader.takeMessages()
        #expect(messages == [payload, []])
        #expect(!reader.hasPartialMessage)
    }

    @Test("a partial message is reported as partial")
    func readerPartial() throws {
        var reader = GRPCMessageReader(maxMessageBytes: 100)
        try [0, 0, 0, 0, 10, 1, 2].withUnsafeBufferPointer { try reader.append($0) }
        #expect(reader.hasPartialMessage)
        #expect(reader.takeMessages().isEmpty)
    }

    @Test("the size limit fails on the prefix, before the body is buffered")
    func readerLimit() {
        var reader = GRPCMessageReader(maxMessageBytes: 1024)
        #expect(throws: GRPCMessageReader.Failure.tooLarge(announced: 1025, limit: 1024)) {
            try [0, 0, 0, 4, 1].withUnsafeBufferPointer { try reader.append($0) }
        }
    }

    @Test("a compressed message without negotiated encoding is refused")
    func readerCompressed() {
        var reader = GRPCMessageReader(maxMessageBytes: 1024)
        #expect(throws: GRPCMessageReader.Failure.compressed) {
            try [1, 0, 0, 0, 1, 9].withUnsafeBufferPointer { try reader.append($0) }
        }
    }

    @Test("metadata decodes -bin values and keeps order")
    func metadata() {
        var metadata = Metadata()
        metadata.addWire(key: "x-id", value: "1")
        metadata.addWire(key: "trace-bin", value: "AAH+/w")
        metadata.addWire(key: "x-id", value: "2")
        #expect(metadata.first("x-id") == "1")
        #expect(metadata["X-ID"] == [.string("1"), .string("2")])
        #expect(metadata["trace-bin"] == [.binary([0, 1, 0xFE, 0xFF])])
        #expect(metadata.count == 3)
    }

    @Test("RPCError maps thrown errors to a status")
    func errorMapping() {
        #expect(RPCError(from: CancellationError()).code == .cancelled)
        #expect(RPCError(from: RPCError(code: .notFound, message: "x")).code == .notFound)
        struct Other: Error {}
        #expect(RPCError(from: Other()).code == .unknown)
        #expect(RPCError.Code.resourceExhausted.description == "RESOURCE_EXHAUSTED")
        #expect(RPCError.Code(rawValue: 99).description == "CODE_99")
    }
}
