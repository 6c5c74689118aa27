/// Reassembles length-prefixed gRPC messages (1-byte compressed flag, 4-byte big-endian length)
/// from DATA frames of any size, refusing a message over the limit as soon as its prefix arrives,
/// so the excess is never buffered.
struct GRPCMessageReader {
    enum Failure: Error, Equatable {
        /// The prefix announced more than the limit.
        case tooLarge(announced: Int, limit: Int)
        /// The compressed flag was set, and this server negotiates no compression.
        case compressed
    }

    let maxMessageBytes: Int
    private var header: [UInt8] = []
    private var message: [UInt8] = []
    private var expected = -1
    private(set) var messages: [[UInt8]] = []

    init(maxMessageBytes: Int) {
        self.maxMessageBytes = maxMessageBytes
        header.reserveCapacity(5)
    }

    /// True while a message has been started but not completed.
    var hasPartialMessage: Bool { !header.isEmpty || expected >= 0 }

    /// Takes the messages completed so far.
    mutating func takeMessages() -> [[UInt8]] {
        defer { messages.removeAll() }
        return messages
    }

    /// Feeds received bytes.
    mutating func append(_ bytes: UnsafeBufferPointer<UInt8>) throws(Failure) {
        var index = 0
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
                message.reserveCapacity(length)
            }
            let take = min(expected - message.count, bytes.count - index)
            if take > 0 {
                message.append(contentsOf: bytes[index..<(index + take)])
                index += take
            }
            if message.count == expected {
                messages.append(message)
                message = []
                header.removeAll(keepingCapacity: true)
                expected = -1
            }
        }
    }
}

/// Frames one gRPC message.
enum GRPCFraming {
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
