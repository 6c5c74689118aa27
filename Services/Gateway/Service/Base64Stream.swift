/// Decodes base64 as it arrives, in pieces of any size: whitespace is skipped, a `data:…;base64,`
/// prefix is allowed, and anything else that is not base64 is an error.
struct Base64Stream {
    enum Failure: Error { case invalid }

    private static let table: [Int8] = {
        var table = [Int8](repeating: -1, count: 256)
        for (index, byte) in Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8).enumerated() {
            table[Int(byte)] = Int8(index)
        }
        // The URL-safe alphabet too.
        table[Int(UInt8(ascii: "-"))] = 62
        table[Int(UInt8(ascii: "_"))] = 63
        return table
    }()

    private var quad: UInt32 = 0
    private var count = 0
    private var padding = 0
    private var prefix: [UInt8] = []
    private var prefixDecided = false
    private(set) var sawAny = false

    /// Decodes `bytes`, appending the output to `out`.
    mutating func feed(_ bytes: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) throws {
        var start = 0
        if !prefixDecided {
            // "data:image/png;base64," — at most 200 bytes of it, then the base64 itself.
            while start < bytes.count && !prefixDecided {
                prefix.append(bytes[start])
                start += 1
                let data = Array("data:".utf8)
                if prefix.count <= data.count {
                    if prefix != Array(data.prefix(prefix.count)) {
                        prefixDecided = true
                        let held = prefix
                        prefix = []
                        try held.withUnsafeBufferPointer { try decode($0, into: &out) }
                    }
                } else if bytes[start - 1] == UInt8(ascii: ",") {
                    prefixDecided = true
                    prefix = []
                } else if prefix.count > 200 {
                    throw Failure.invalid
                }
            }
        }
        guard start < bytes.count else { return }
        try decode(UnsafeBufferPointer(rebasing: bytes[start...]), into: &out)
    }

    private mutating func decode(_ bytes: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) throws {
        out.reserveCapacity(out.count + bytes.count * 3 / 4 + 3)
        for byte in bytes {
            let value = Self.table[Int(byte)]
            if value >= 0 {
                guard padding == 0 else { throw Failure.invalid }
                quad = quad << 6 | UInt32(value)
                count += 1
                sawAny = true
                if count == 4 {
                    out += [UInt8(truncatingIfNeeded: quad >> 16), UInt8(truncatingIfNeeded: quad >> 8), UInt8(truncatingIfNeeded: quad)]
                    quad = 0
                    count = 0
                }
            } else if byte == UInt8(ascii: "=") {
                guard count >= 2 else { throw Failure.invalid }
                padding += 1
                quad = quad << 6
                count += 1
                if count == 4 {
                    out.append(UInt8(truncatingIfNeeded: quad >> 16))
                    if padding == 1 { out.append(UInt8(truncatingIfNeeded: quad >> 8)) }
                    quad = 0
                    count = 0
                }
            } else if byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 {
                continue
            } else {
                throw Failure.invalid
            }
        }
    }

    /// The end of the input: a last group without padding is accepted (2 or 3 characters).
    mutating func finish(into out: inout [UInt8]) throws {
        if !prefixDecided && !prefix.isEmpty {
            prefixDecided = true
            let held = prefix
            prefix = []
            try held.withUnsafeBufferPointer { try decode($0, into: &out) }
        }
        switch count {
        case 0: return
        case 2: out.append(UInt8(truncatingIfNeeded: quad >> 4))
        case 3: out += [UInt8(truncatingIfNeeded: quad >> 10), UInt8(truncatingIfNeeded: quad >> 2)]
        default: throw Failure.invalid
        }
        count = 0
    }
}
