import Testing
@testable import TalkMeshMediaService

@Suite("Image header")
struct ImageHeaderTests {
    func be32(_ v: Int) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    func le(_ v: Int, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(v >> (8 * $0) & 0xFF) } }

    func png(width: Int, height: Int) -> [UInt8] {
        [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A] + be32(13) + Array("IHDR".utf8) + be32(width) + be32(height) + [16, 6, 0, 0, 0]
    }

    @Test("PNG IHDR, including a 16000×16000 claim in 33 bytes")
    func pngSize() throws {
        #expect(try ImageHeader.read(png(width: 384, height: 576)).get() == ImageHeader(format: .png, width: 384, height: 576))
        #expect(try ImageHeader.read(png(width: 16000, height: 16000)).get().width == 16000)
        #expect(ImageHeader.read(Array(png(width: 1, height: 1).prefix(20))) == .failure(.malformed("PNG without an IHDR chunk")))
        #expect(ImageHeader.read(png(width: 0, height: 5)) != .success(ImageHeader(format: .png, width: 0, height: 5)))
    }

    @Test("JPEG SOF after large APP segments, fill bytes, and progressive SOF2")
    func jpegSize() throws {
        let app = [0xFF, 0xE1] + [0xFF, 0xFF] + [UInt8](repeating: 7, count: 0xFFFF - 2)  // a 64 KiB APP1
        let sof2: [UInt8] = [0xFF, 0xC2, 0, 17, 8] + [0x04, 0x38] + [0x07, 0x80] + [3] + [UInt8](repeating: 0, count: 9)
        let bytes: [UInt8] = [0xFF, 0xD8] + app + app + [0xFF, 0xFF] + [0xFF, 0xC4, 0, 4, 0, 0] + sof2 + [0xFF, 0xDA, 0, 2]
        #expect(try ImageHeader.read(bytes).get() == ImageHeader(format: .jpeg, width: 1920, height: 1080))
        #expect(ImageHeader.read([0xFF, 0xD8, 0xFF, 0xDA, 0, 2]) == .failure(.malformed("JPEG without a frame header (SOF)")))
        #expect(ImageHeader.read([0xFF, 0xD8, 0xFF, 0xE0, 0, 1]) == .failure(.malformed("JPEG segment length 1")))
        #expect(ImageHeader.read([0xFF, 0xD8, 0x00, 0x00]) == .failure(.malformed("JPEG segment structure is broken")))
    }

    @Test("WebP: lossy VP8, lossless VP8L and extended VP8X")
    func webpSize() throws {
        let riff = Array("RIFF".utf8) + le(100, 4) + Array("WEBP".utf8)
        let vp8 = riff + Array("VP8 ".utf8) + le(80, 4) + [0, 0, 0, 0x9D, 0x01, 0x2A] + le(640, 2) + le(480, 2) + [0, 0]
        #expect(try ImageHeader.read(vp8).get() == ImageHeader(format: .webp, width: 640, height: 480))
        let bits = (300 - 1) | (200 - 1) << 14
        let vp8l = riff + Array("VP8L".utf8) + le(80, 4) + [0x2F] + le(bits, 4) + [0, 0, 0, 0, 0]
        #expect(try ImageHeader.read(vp8l).get() == ImageHeader(format: .webp, width: 300, height: 200))
        let vp8x = riff + Array("VP8X".utf8) + le(10, 4) + le(0, 4) + le(16383, 3) + le(9999, 3)
        #expect(try ImageHeader.read(vp8x).get() == ImageHeader(format: .webp, width: 16384, height: 10000))
    }

    @Test("BMP: core and info headers, top-down rows, Int32.min height")
    func bmpSize() throws {
        let info = Array("BM".utf8) + le(0, 12) + le(40, 4) + le(800, 4) + le(-600 & 0xFFFF_FFFF, 4) + le(1, 2)
        #expect(try ImageHeader.read(info).get() == ImageHeader(format: .bmp, width: 800, height: 600))
        let core = Array("BM".utf8) + le(0, 12) + le(12, 4) + le(320, 2) + le(240, 2) + le(0, 6)
        #expect(try ImageHeader.read(core).get() == ImageHeader(format: .bmp, width: 320, height: 240))
        let extreme = Array("BM".utf8) + le(0, 12) + le(40, 4) + le(1, 4) + le(0x8000_0000, 4) + le(1, 2)
        #expect(try ImageHeader.read(extreme).get().height == 2_147_483_648)
        let negativeWidth = Array("BM".utf8) + le(0, 12) + le(40, 4) + le(-5 & 0xFFFF_FFFF, 4) + le(5, 4) + le(1, 2)
        #expect(throws: ImageHeader.Failure.self) { try ImageHeader.read(negativeWidth).get() }
    }

    @Test("GIF logical screen, and unknown formats")
    func gifAndUnknown() throws {
        #expect(try ImageHeader.read(Array("GIF89a".utf8) + le(500, 2) + le(400, 2) + [0, 0]).get() == ImageHeader(format: .gif, width: 500, height: 400))
        #expect(ImageHeader.read(Array("not an image at all".utf8)) == .failure(.unknownFormat))
        #expect(ImageHeader.read([]) == .failure(.unknownFormat))
    }
}
