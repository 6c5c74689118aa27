import CTalkMesh
import Testing
@testable import TalkMeshMediaService

@Suite("Halved picture")
struct HalvedPictureTests {
    func halve(_ bytes: [UInt8], stride: Int, width: Int, height: Int, format: AVPixelFormat) -> HalvedPicture? {
        bytes.withUnsafeBufferPointer { HalvedPicture([$0.baseAddress], [Int32(stride)], width: width, height: height, format: format) }
    }

    func plane(_ picture: HalvedPicture, _ index: Int, count: Int) -> [UInt8] {
        Array(UnsafeBufferPointer(start: picture.planes[index], count: count))
    }

    @Test("RGB24: each output pixel is the rounded mean of its 2×2 block, channel by channel")
    func rgb24() throws {
        // 4×2 RGB24 with a padded stride of 16 bytes.
        let row0: [UInt8] = [10, 20, 30, 11, 21, 31, 200, 0, 255, 100, 50, 1] + [9, 9, 9, 9]
        let row1: [UInt8] = [12, 22, 32, 13, 23, 34, 0, 255, 0, 101, 51, 2] + [9, 9, 9, 9]
        let half = try #require(halve(row0 + row1, stride: 16, width: 4, height: 2, format: AV_PIX_FMT_RGB24))
        #expect((half.width, half.height) == (2, 1))
        #expect(half.strides[0] >= 6)
        // (10+11+12+13+2)/4 = 12, (20+21+22+23+2)/4 = 22, (30+31+32+34+2)/4 = 32; (200+100+0+101+2)/4 = 100 …
        #expect(plane(half, 0, count: 6) == [12, 22, 32, 100, 89, 65])
    }

    @Test("An odd width and height: the last pixel pair stands alone and the last row is dropped by the halving")
    func oddSizes() throws {
        let gray: [UInt8] = [0, 4, 8, 100, 104, 108, 50, 50, 50]  // 3×3
        let half = try #require(halve(gray, stride: 3, width: 3, height: 3, format: AV_PIX_FMT_GRAY8))
        #expect((half.width, half.height) == (1, 1))
        #expect(plane(half, 0, count: 1) == [52])  // (0+4+100+104+2)/4
    }

    @Test("YUV 4:2:0: chroma planes are halved at their own size, odd chroma edges averaged with themselves")
    func yuv420() throws {
        // 6×2 luma, 3×1 chroma: halving gives 3×1 luma and 2×1 chroma (ceil(3/2)).
        let luma: [UInt8] = [0, 2, 4, 6, 8, 10, 2, 4, 6, 8, 10, 12]
        let u: [UInt8] = [10, 20, 40]
        let v: [UInt8] = [100, 110, 130]
        let half = try luma.withUnsafeBufferPointer { y in
            try u.withUnsafeBufferPointer { u in
                try v.withUnsafeBufferPointer { v in
                    try #require(HalvedPicture([y.baseAddress, u.baseAddress, v.baseAddress], [6, 3, 3], width: 6, height: 2, format: AV_PIX_FMT_YUV420P))
                }
            }
        }
        #expect((half.width, half.height) == (3, 1))
        #expect(plane(half, 0, count: 3) == [2, 6, 10])
        #expect(plane(half, 1, count: 2) == [15, 40])
        #expect(plane(half, 2, count: 2) == [105, 130])
    }

    @Test("Formats whose samples are not whole bytes are refused: a palette, 16-bit, bit-packed, packed 4:2:2")
    func refusedFormats() {
        let bytes = [UInt8](repeating: 0, count: 64)
        for format in [AV_PIX_FMT_PAL8, AV_PIX_FMT_RGB48LE, AV_PIX_FMT_MONOBLACK, AV_PIX_FMT_YUYV422, AV_PIX_FMT_RGB565LE] {
            #expect(halve(bytes, stride: 8, width: 4, height: 4, format: format) == nil, "\(format)")
        }
        #expect(halve(bytes, stride: 3, width: 1, height: 4, format: AV_PIX_FMT_RGB24) == nil)
    }
}
