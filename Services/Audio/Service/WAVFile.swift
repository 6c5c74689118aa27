/// Canonical PCM WAV (RIFF, `fmt ` chunk 16 bytes, little-endian signed 16-bit).
public enum WAVFile {
    public static func encode(_ samples: ArraySlice<Int16>, rate: Int, channels: Int) -> [UInt8] {
        let dataBytes = samples.count * 2
        var out: [UInt8] = []
        out.reserveCapacity(44 + dataBytes)
        func u32(_ value: Int) { out += [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value >> 16 & 0xFF), UInt8(value >> 24 & 0xFF)] }
        func u16(_ value: Int) { out += [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF)] }
        out += Array("RIFF".utf8); u32(36 + dataBytes); out += Array("WAVE".utf8)
        out += Array("fmt ".utf8); u32(16); u16(1); u16(channels); u32(rate); u32(rate * channels * 2); u16(channels * 2); u16(16)
        out += Array("data".utf8); u32(dataBytes)
        samples.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: UInt8.self) { bytes in
                // Little-endian on every platform Swift runs TalkMesh on; swap on big-endian.
                if 1.littleEndian == 1 {
                    out.append(contentsOf: bytes)
                } else {
                    for sample in buffer { u16(Int(UInt16(bitPattern: sample))) }
                }
            }
        }
        return out
    }

    /// The encoded size of a chunk, and its size in base64 (what RunPod's request carries).
    public static func sizes(seconds: Double, rate: Int, channels: Int) -> (bytes: Int, base64: Int) {
        let bytes = 44 + Int((seconds * Double(rate)).rounded(.up)) * channels * 2
        return (bytes, (bytes + 2) / 3 * 4)
    }
}
