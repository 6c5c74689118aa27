import CTalkMesh
import TalkMeshCore

/// Writes 8-bit RGB pixels as a PNG (one IDAT), every row with the "up" filter, compressed by
/// libdeflate. libavcodec's PNG encoder goes through zlib, which here spent ~12 ms on a
/// photo-like 384×576 canvas at its fastest useful level; libdeflate's level 1 takes ~5 ms for
/// a smaller file. The canvas is what RunPod receives (as base64, with every chunk), so both
/// the time and the size count.
enum PNGWriter {
    /// libdeflate's compression level (1 fastest … 12 smallest).
    static let level: Int32 = 1

    static func encode(rgb: [UInt8], width: Int, height: Int) throws -> [UInt8] {
        precondition(rgb.count == width * height * 3)
        let rowBytes = width * 3
        // Filtered scanlines: a filter-type byte, then each byte minus the one above it.
        let filtered = [UInt8](unsafeUninitializedCapacity: height * (rowBytes + 1)) { target, initialized in
            rgb.withUnsafeBufferPointer { source in
                for y in 0..<height {
                    let row = target.baseAddress! + y * (rowBytes + 1)
                    row[0] = 2  // up
                    let current = source.baseAddress! + y * rowBytes
                    if y == 0 {
                        (row + 1).update(from: current, count: rowBytes)
                    } else {
                        let above = current - rowBytes
                        for x in 0..<rowBytes { row[1 + x] = current[x] &- above[x] }
                    }
                }
            }
            initialized = height * (rowBytes + 1)
        }
        guard let compressor = libdeflate_alloc_compressor(level) else { throw ServiceError(.internalError, "cannot allocate a PNG compressor") }
        defer { libdeflate_free_compressor(compressor) }
        let bound = libdeflate_zlib_compress_bound(compressor, filtered.count)
        let compressed = [UInt8](unsafeUninitializedCapacity: bound) { output, initialized in
            initialized = filtered.withUnsafeBytes { input in
                libdeflate_zlib_compress(compressor, input.baseAddress, input.count, output.baseAddress, output.count)
            }
        }
        guard !compressed.isEmpty else { throw ServiceError(.internalError, "the PNG compressor produced nothing") }

        var png: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
        png.reserveCapacity(compressed.count + 64)
        // IHDR: width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
        appendChunk("IHDR", bigEndian(width) + bigEndian(height) + [8, 2, 0, 0, 0], to: &png)
        appendChunk("IDAT", compressed, to: &png)
        appendChunk("IEND", [], to: &png)
        return png
    }

    private static func bigEndian(_ value: Int) -> [UInt8] {
        [UInt8(truncatingIfNeeded: value >> 24), UInt8(truncatingIfNeeded: value >> 16), UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value)]
    }

    /// Length, type, data, and the CRC-32 of type and data.
    private static func appendChunk(_ type: String, _ data: [UInt8], to png: inout [UInt8]) {
        let typeBytes = Array(type.utf8)
        png += bigEndian(data.count)
        png += typeBytes
        png += data
        var crc = typeBytes.withUnsafeBytes { libdeflate_crc32(0, $0.baseAddress, $0.count) }
        crc = data.withUnsafeBytes { libdeflate_crc32(crc, $0.baseAddress, $0.count) }
        png += bigEndian(Int(crc))
    }
}
