import CTalkMesh
import Testing
import TalkMeshLibAV

@Suite("Banded scaling")
struct BandedScaleTests {
    /// A frame of `format` whose every byte follows a pattern with edges and gradients.
    func pattern(width: Int32, height: Int32, format: AVPixelFormat) throws -> Frame {
        let frame = try makeVideoFrame(width: width, height: height, format: format)
        let planes = frame.pointer!.planes
        let count = Int(av_pix_fmt_count_planes(format))
        for plane in 0..<count {
            let rows = plane == 0 ? Int(height) : (Int(height) + 1) / 2
            for y in 0..<rows {
                let row = planes.data[plane]! + y * Int(planes.strides[plane])
                for x in 0..<Int(planes.strides[plane]) {
                    row[x] = UInt8(truncatingIfNeeded: (x * 7 + y * 3 + plane * 50) ^ ((x / 16 + y / 16) % 2 == 0 ? 0 : 0x5A))
                }
            }
        }
        if format == AV_PIX_FMT_PAL8 {
            // The palette: 256 entries of 4 bytes.
            for index in 0..<1024 { planes.data[1]![index] = UInt8(truncatingIfNeeded: index * 37) }
        }
        return frame
    }

    func rows(_ frame: Frame) -> [[UInt8]] {
        let planes = frame.pointer!.planes
        let width = Int(frame.pointer!.pointee.width) * 3
        return (0..<Int(frame.pointer!.pointee.height)).map { y in
            Array(UnsafeBufferPointer(start: planes.data[0]! + y * Int(planes.strides[0]), count: width))
        }
    }

    @Test("Two bands on two threads give exactly the rows of one pass (RGB output)",
          arguments: [AV_PIX_FMT_RGB24, AV_PIX_FMT_BGR24, AV_PIX_FMT_GRAY8, AV_PIX_FMT_YUVJ420P, AV_PIX_FMT_YUV420P, AV_PIX_FMT_YUV422P,
                      AV_PIX_FMT_YUV444P, AV_PIX_FMT_PAL8, AV_PIX_FMT_RGB48BE, AV_PIX_FMT_GRAY16BE])
    func bandsEqualOnePass(format: AVPixelFormat) throws {
        let source = try pattern(width: 540, height: 960, format: format)
        let one = try makeVideoFrame(width: 324, height: 577, format: AV_PIX_FMT_RGB24)
        let two = try makeVideoFrame(width: 324, height: 577, format: AV_PIX_FMT_RGB24)
        try Scaler.scale(source.pointer!, into: one.pointer!, bands: 1)
        try Scaler.scale(source.pointer!, into: two.pointer!, bands: 2)
        let expected = rows(one)
        let actual = rows(two)
        #expect(expected.count == 577)
        #expect(actual == expected)
        #expect(Set(expected.joined()).count > 16)  // the output is a picture, not a blank
    }
}
