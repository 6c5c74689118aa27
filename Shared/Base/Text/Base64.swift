/// RFC 4648 base64 (the `-bin` metadata encoding, RunPod's inputs and videos); decoding accepts
/// missing padding.
public enum Base64 {
    static let alphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    /// Each byte's value in the alphabet (the URL-safe `-` and `_` too), or -1.
    static let values: [Int8] = {
        var table = [Int8](repeating: -1, count: 256)
        for (index, byte) in alphabet.enumerated() { table[Int(byte)] = Int8(index) }
        table[Int(UInt8(ascii: "-"))] = 62
        table[Int(UInt8(ascii: "_"))] = 63
        return table
    }()

    /// Each pair of input characters' 12 bits, or 0xFFFF when either is outside the alphabet: a
    /// decoder's inner loop then does two lookups per four characters instead of four.
    static let pairValues: [UInt16] = (0..<65536).map { pair in
        let first = values[pair & 255], second = values[pair >> 8]
        return first < 0 || second < 0 ? 0xFFFF : UInt16(first) << 6 | UInt16(second)
    }

    /// Two output characters for each 12 bits of input, as one little-endian UInt16: an
    /// encoder's inner loop then does two lookups per three bytes instead of four.
    static let pairs: [UInt16] = (0..<4096).map { UInt16(alphabet[$0 >> 6]) | UInt16(alphabet[$0 & 63]) << 8 }

    /// Encodes with padding.
    public static func encode(_ bytes: [UInt8]) -> String {
        let count = encodedCount(bytes.count)
        guard count > 0 else { return "" }
        return String(unsafeUninitializedCapacity: count) { text in
            bytes.withUnsafeBytes { write($0, to: text.baseAddress!) }
            return count
        }
    }

    /// The length of `count` bytes encoded, with padding.
    public static func encodedCount(_ count: Int) -> Int { (count + 2) / 3 * 4 }

    /// Writes `input` encoded (with padding) at `output`, which has room for
    /// `encodedCount(input.count)` bytes: a chunk's audio goes straight into a `/run` body.
    public static func write(_ input: UnsafeRawBufferPointer, to output: UnsafeMutablePointer<UInt8>) {
        let count = input.count
        var index = 0
        var write = 0
        pairs.withUnsafeBufferPointer { pairs in
            let raw = UnsafeMutableRawPointer(output)
            // Six bytes from one 8-byte load, eight characters in one 8-byte store.
            if let base = input.baseAddress {
                while index + 8 <= count {
                    let word = UInt64(bigEndian: base.loadUnaligned(fromByteOffset: index, as: UInt64.self))
                    let out = UInt64(pairs[Int(word >> 52)]) | UInt64(pairs[Int(word >> 40 & 4095)]) << 16
                        | UInt64(pairs[Int(word >> 28 & 4095)]) << 32 | UInt64(pairs[Int(word >> 16 & 4095)]) << 48
                    raw.storeBytes(of: out.littleEndian, toByteOffset: write, as: UInt64.self)
                    index += 6
                    write += 8
                }
            }
            while index + 3 <= count {
                let n = Int(input[index]) << 16 | Int(input[index + 1]) << 8 | Int(input[index + 2])
                raw.storeBytes(of: pairs[n >> 12].littleEndian, toByteOffset: write, as: UInt16.self)
                raw.storeBytes(of: pairs[n & 4095].littleEndian, toByteOffset: write + 2, as: UInt16.self)
                index += 3
                write += 4
            }
        }
        let rest = count - index
        guard rest > 0 else { return }
        var n = UInt32(input[index]) << 16
        if rest == 2 { n |= UInt32(input[index + 1]) << 8 }
        alphabet.withUnsafeBufferPointer { alphabet in
            output[write] = alphabet[Int(n >> 18)]
            output[write + 1] = alphabet[Int(n >> 12 & 63)]
            output[write + 2] = rest == 2 ? alphabet[Int(n >> 6 & 63)] : UInt8(ascii: "=")
            output[write + 3] = UInt8(ascii: "=")
        }
    }

    /// Decodes, or nil on a character outside the alphabet.
    public static func decode(_ text: String) -> [UInt8]? {
        var out: [UInt8] = []
        var accumulator: UInt32 = 0
        var bits = 0
        for byte in text.utf8 {
            if byte == UInt8(ascii: "=") { break }
            let value = values[Int(byte)]
            if value < 0 || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") { return nil }
            accumulator = accumulator << 6 | UInt32(value)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
            }
        }
        return out
    }
}

/// Decodes base64 as it arrives, in pieces of any size: whitespace is skipped, a `data:…;base64,`
/// prefix is allowed, the URL-safe alphabet too, and anything else is an error. Whole groups of
/// four go through a fast path; the rest byte by byte.
public struct Base64Stream {
    public enum Failure: Error { case invalid }

    private var quad: UInt32 = 0
    private var count = 0
    private var padding = 0
    private var prefix: [UInt8] = []
    private var prefixDecided = false
    public private(set) var sawAny = false

    public init() {}

    /// Decodes `bytes`, appending the output to `out`.
    public mutating func feed(_ bytes: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) throws(Failure) {
        var start = 0
        if !prefixDecided {
            // "data:image/png;base64," — at most 200 bytes of it, then the base64 itself.
            let data = Array("data:".utf8)
            while start < bytes.count && !prefixDecided {
                prefix.append(bytes[start])
                start += 1
                if prefix.count <= data.count {
                    if prefix != Array(data.prefix(prefix.count)) {
                        prefixDecided = true
                        let held = prefix
                        prefix = []
                        try held.withUnsafeBufferPointer { (held) throws(Failure) in try decode(held, into: &out) }
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

    private mutating func decode(_ bytes: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) throws(Failure) {
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: bytes.count / 4 * 3 + 3))
        var written = start
        defer { out.removeSubrange(written...) }
        var failed = false
        Base64.values.withUnsafeBufferPointer { table in
          Base64.pairValues.withUnsafeBufferPointer { pairs in
            out.withUnsafeMutableBufferPointer { output in
                var index = 0
                let end = bytes.count
                while index < end {
                    if count == 0 && padding == 0 && index + 4 <= end {
                        // Whole groups of four in a loop of locals (no state of the stream's
                        // touched per group), until one holds anything but the alphabet.
                        let input = UnsafeRawPointer(bytes.baseAddress!), target = output.baseAddress!
                        var from = index, to = written
                        // Eight characters from one load, six bytes in one 8-byte store (its last
                        // two are written over next, or cut: the output has room past them).
                        let room = output.count
                        while from + 8 <= end && to + 8 <= room {
                            let word = UInt64(littleEndian: input.loadUnaligned(fromByteOffset: from, as: UInt64.self))
                            let a = pairs[Int(word & 0xFFFF)], b = pairs[Int(word >> 16 & 0xFFFF)]
                            let c = pairs[Int(word >> 32 & 0xFFFF)], d = pairs[Int(word >> 48)]
                            // A pair outside the alphabet is 0xFFFF; those inside are under 4096.
                            guard (a | b | c | d) & 0xF000 == 0 else { break }
                            let n = UInt64(a) << 52 | UInt64(b) << 40 | UInt64(c) << 28 | UInt64(d) << 16
                            UnsafeMutableRawPointer(target + to).storeBytes(of: n.bigEndian, as: UInt64.self)
                            from += 8
                            to += 6
                        }
                        while from + 4 <= end {
                            let word = UInt32(littleEndian: input.loadUnaligned(fromByteOffset: from, as: UInt32.self))
                            let high = pairs[Int(word & 0xFFFF)], low = pairs[Int(word >> 16)]
                            guard high != 0xFFFF, low != 0xFFFF else { break }
                            let n = UInt32(high) << 12 | UInt32(low)
                            target[to] = UInt8(truncatingIfNeeded: n >> 16)
                            target[to + 1] = UInt8(truncatingIfNeeded: n >> 8)
                            target[to + 2] = UInt8(truncatingIfNeeded: n)
                            from += 4
                            to += 3
                        }
                        if from > index {
                            sawAny = true
                            index = from
                            written = to
                            continue
                        }
                    }
                    let byte = bytes[index]
                    index += 1
                    let value = table[Int(byte)]
                    if value >= 0 {
                        guard padding == 0 else { failed = true; return }
                        quad = quad << 6 | UInt32(value)
                        count += 1
                        sawAny = true
                        if count == 4 {
                            output[written] = UInt8(truncatingIfNeeded: quad >> 16)
                            output[written + 1] = UInt8(truncatingIfNeeded: quad >> 8)
                            output[written + 2] = UInt8(truncatingIfNeeded: quad)
                            written += 3
                            quad = 0
                            count = 0
                        }
                    } else if byte == UInt8(ascii: "=") {
                        guard count >= 2 else { failed = true; return }
                        padding += 1
                        quad = quad << 6
                        count += 1
                        if count == 4 {
                            output[written] = UInt8(truncatingIfNeeded: quad >> 16)
                            written += 1
                            if padding == 1 {
                                output[written] = UInt8(truncatingIfNeeded: quad >> 8)
                                written += 1
                            }
                            quad = 0
                            count = 0
                        }
                    } else if byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 {
                        continue
                    } else {
                        failed = true
                        return
                    }
                }
            }
          }
        }
        if failed { throw Failure.invalid }
    }

    /// The end of the input: a last group without padding is accepted (2 or 3 characters).
    public mutating func finish(into out: inout [UInt8]) throws(Failure) {
        if !prefixDecided && !prefix.isEmpty {
            prefixDecided = true
            let held = prefix
            prefix = []
            try held.withUnsafeBufferPointer { (held) throws(Failure) in try decode(held, into: &out) }
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
