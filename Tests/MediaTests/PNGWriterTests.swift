import Foundation
import CTalkMesh
import Glibc
import Testing
import TalkMeshCore
import TalkMeshLibAV
@testable import TalkMeshMediaService

@Suite("PNG writer")
struct PNGWriterTests {
    /// Decodes PNG bytes with libavcodec's own PNG decoder into RGB24 rows.
    func decode(_ png: [UInt8]) throws -> (Int, Int, [UInt8]) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-pngwriter-\(UUID().uuidString).png").path
        try FileBlobStore.writeAll(path, png)
        defer { unlink(path) }
        let input = try MediaInput(path: path, flag: CancellationFlag(), invalid: .invalidImage)
        let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_VIDEO, invalid: .invalidImage, what: "image")
        var result: (Int, Int, [UInt8]) = (0, 0, [])
        try decoder.decodeAll(from: input, flag: CancellationFlag(), invalid: .invalidImage) { frame in
            #expect(frame.pointee.format == AV_PIX_FMT_RGB24.rawValue)
            let width = Int(frame.pointee.width)
            let height = Int(frame.pointee.height)
            var rows: [UInt8] = []
            for y in 0..<height {
                rows += UnsafeBufferPointer(start: frame.pointee.data.0! + y * Int(frame.pointee.linesize.0), count: width * 3)
            }
            result = (width, height, rows)
            return false
        }
        return result
    }

    @Test("What libavcodec decodes is exactly what was written (odd sizes, every byte value, sharp edges)",
          arguments: [(1, 1), (7, 3), (384, 576), (255, 17)])
    func roundTrip(width: Int, height: Int) throws {
        var rgb = [UInt8](repeating: 0, count: width * height * 3)
        for index in rgb.indices { rgb[index] = UInt8(truncatingIfNeeded: (index &* 2_654_435_761) >> 7) }
        let png = try PNGWriter.encode(rgb: rgb, width: width, height: height)
        #expect(Array(png.prefix(8)) == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
        let (decodedWidth, decodedHeight, decoded) = try decode(png)
        #expect((decodedWidth, decodedHeight) == (width, height))
        #expect(decoded == rgb)
    }

    @Test("A flat canvas compresses to a small file")
    func flat() throws {
        let png = try PNGWriter.encode(rgb: [UInt8](repeating: 40, count: 384 * 576 * 3), width: 384, height: 576)
        #expect(png.count < 4_000)
        #expect(try decode(png).2.allSatisfy { $0 == 40 })
    }
}
