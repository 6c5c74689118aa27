import TalkMeshMessages

/// Reassembles length-prefixed gRPC messages (1-byte compressed flag, 4-byte big-endian length)
/// from DATA frames of any size, refusing a message over the limit as soon as its prefix arrives,
/// so the excess is never buffered.
package struct GRPCMessageReader {
    package enum Failure: Error, Equatable {
        /// The prefix announced more than the limit.
        case tooLarge(announced: Int, limit: Int)
        /// The compressed flag was set, and this server negotiates no compression.
        case compressed
    }

    let maxMessageBytes: Int
    private var header: [UInt8] = []
    private var message: [UInt8] = []
    private var expected = -1
    /// The first complete message (unary and server-streaming requests carry exactly one).
    private(set) var firstMessage: [UInt8]?
    /// Complete messages after the first.
    private var later: [[UInt8]] = []

    package init(maxMessageBytes: Int) {
        self.maxMessageBytes = maxMessageBytes
    }

    /// How many complete messages arrived.
    var messageCount: Int { firstMessage == nil ? 0 : 1 + later.count }

    /// True while a message has been started but not completed.
    var hasPartialMessage: Bool { !header.isEmpty || expected >= 0 }

    /// Takes the messages completed so far.
    package mutating func takeMessages() -> [[UInt8]] {
        defer { firstMessage = nil; later.removeAll() }
        return firstMessage.map { [$0] + later } ?? []
    }

    private mutating func completed(_ bytes: [UInt8]) {
        if firstMessage == nil { firstMessage = bytes } else { later.append(bytes) }
    }

    /// Feeds received bytes.
    package mutating func append(_ bytes: UnsafeBufferPointer<UInt8>) throws(Failure) {
        var index = 0
        // Fast path: whole messages inside this chunk, no partial state to join.
        while expected < 0 && header.isEmpty && bytes.count - index >= 5 {
            if bytes[index] != 0 { throw .compressed }
            let length = Int(bytes[index + 1]) << 24 | Int(bytes[index + 2]) << 16 | Int(bytes[index + 3]) << 8 | Int(bytes[index + 4])
            if length > maxMessageBytes { throw .tooLarge(announced: length, limit: maxMessageBytes) }
            guard bytes.count - index - 5 >= length else { break }
            let start = index + 5
            completed(Array(UnsafeBufferPointer(rebasing: bytes[start..<(start + length)])))
            index = start + length
        }
        while index < bytes.count {
            if expected < 0 {
                let take = min(5 - header.count, bytes.count - index)
                header.append(contentsOf: bytes[index..<(index + take)])
                index += take
                guard header.count == 5 else { continue }
                if header[0] != 0 { throw .compressed }
                let length = Int(header[1]) << 24 | Int(header[2]) << 16 | Int(header[3]) << 8 | Int(header[4])
                if length > maxMessageBytes { throw .tooLarge(announced: length, limit: maxMessageBytes) }
                expected = length
                message = []
                // Memory follows the bytes that arrive: a prefix that merely announces 64 MiB
                // must not reserve 64 MiB.
                message.reserveCapacity(min(length, 64 << 10))
            }
            let take = min(expected - message.count, bytes.count - index)
            if take > 0 {
                message.append(contentsOf: bytes[index..<(index + take)])
                index += take
            }
            if message.count == expected {
                completed(message)
                message = []
                header.removeAll(keepingCapacity: true)
                expected = -1
            }
        }
    }
}

/// Frames one gRPC message.
enum GRPCFraming {
    /// Serializes a message straight into a frame: no second copy.
    static func frame<Message: ProtoMessage>(_ message: Message) -> [UInt8] {
        var bytes = message.serializedBytes(reservingPrefix: 5)
        let length = UInt32(bytes.count - 5)
        bytes[1] = UInt8(truncatingIfNeeded: length >> 24)
        bytes[2] = UInt8(truncatingIfNeeded: length >> 16)
        bytes[3] = UInt8(truncatingIfNeeded: length >> 8)
        bytes[4] = UInt8(truncatingIfNeeded: length)
        return bytes
    }

    static func frame(_ payload: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(payload.count + 5)
        appendFrame(payload, to: &out)
        return out
    }

    static func appendFrame(_ payload: [UInt8], to out: inout [UInt8]) {
        let length = UInt32(payload.count)
        out.append(0)
        out.append(UInt8(truncatingIfNeeded: length >> 24))
        out.append(UInt8(truncatingIfNeeded: length >> 16))
        out.append(UInt8(truncatingIfNeeded: length >> 8))
        out.append(UInt8(truncatingIfNeeded: length))
        out.append(contentsOf: payload)
    }
}
