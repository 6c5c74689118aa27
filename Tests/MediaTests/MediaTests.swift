import Foundation
import Testing
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshMediaService

@Suite("EXIF orientation")
struct ExifOrientationTests {
    func jpeg(orientation: UInt16, littleEndian: Bool) -> [UInt8] {
        func u16(_ v: UInt16) -> [UInt8] { littleEndian ? [UInt8(v & 0xFF), UInt8(v >> 8)] : [UInt8(v >> 8), UInt8(v & 0xFF)] }
        func u32(_ v: UInt32) -> [UInt8] { littleEndian ? [UInt8(v & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 24)] : [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
        var tiff: [UInt8] = littleEndian ? [0x49, 0x49] : [0x4D, 0x4D]
        tiff += u16(42) + u32(8) + u16(2)
        tiff += u16(0x010F) + u16(2) + u32(4) + u32(0)          // Make, ignored
        tiff += u16(0x0112) + u16(3) + u32(1) + u16(orientation) + u16(0)
        tiff += u32(0)
        let payload: [UInt8] = Array("Exif".utf8) + [0, 0] + tiff
        let length = payload.count + 2
        return [0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0] + [0xFF, 0xE1, UInt8(length >> 8), UInt8(length & 0xFF)] + payload + [0xFF, 0xDA, 0, 2]
    }

    @Test("orientation is read from little- and big-endian EXIF", arguments: [1, 3, 6, 8])
    func read(orientation: Int) {
        #expect(ExifOrientation.read(jpeg(orientation: UInt16(orientation), littleEndian: true)) == orientation)
        #expect(ExifOrientation.read(jpeg(orientation: UInt16(orientation), littleEndian: false)) == orientation)
    }

    @Test("absent, invalid or non-JPEG input reads as 1")
    func absent() {
        #expect(ExifOrientation.read([0x89, 0x50, 0x4E, 0x47]) == 1)
        #expect(ExifOrientation.read([0xFF, 0xD8, 0xFF, 0xDA, 0, 2]) == 1)
        #expect(ExifOrientation.read(jpeg(orientation: 9, littleEndian: true)) == 1)
        #expect(ExifOrientation.read([]) == 1)
    }

    @Test("the eight orientations map pixels as EXIF defines them")
    func mapping() {
        // A 3×2 source; where does the output's top-left pixel come from?
        let expected: [Int: (Int, Int)] = [1: (0, 0), 2: (2, 0), 3: (2, 1), 4: (0, 1), 5: (0, 0), 6: (0, 1), 7: (2, 1), 8: (2, 0)]
        for (orientation, source) in expected {
            let pixel = ExifOrientation.sourcePixel(orientation: orientation, x: 0, y: 0, width: 3, height: 2)
            #expect(pixel == source, "orientation \(orientation)")
            let size = ExifOrientation.outputSize(orientation: orientation, width: 3, height: 2)
            #expect(size == (orientation >= 5 ? (2, 3) : (3, 2)))
        }
    }
}

@Suite("Resize parameters and geometry")
struct ResizeGeometryTests {
    /// Geometry touches no file: the store's directory is removed as soon as the store is made.
    let resizer: ImageResizer = {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-media-unit-\(UUID().uuidString)").path
        let store = try! FileBlobStore(root: root)
        try? FileManager.default.removeItem(atPath: root)
        return ImageResizer(store: store)
    }()

    func options(_ width: Int32, _ height: Int32, fit: String = "") throws -> ImageResizer.Options {
        var request = ResizeImageRequest()
        request.imageKey = "in/a.png"
        request.width = width
        request.height = height
        request.fit = fit
        return try resizer.validate(request)
    }

    @Test("pad fits inside, crop covers; both keep the aspect ratio")
    func sizes() throws {
        let pad = try options(384, 576)
        #expect(resizer.scaledSize(width: 1080, height: 1920, options: pad) == (324, 576))
        #expect(resizer.scaledSize(width: 1920, height: 1080, options: pad) == (384, 216))
        let crop = try options(512, 512, fit: "crop")
        #expect(resizer.scaledSize(width: 1080, height: 1920, options: crop) == (512, 910))
    }

    @Test("the default output key and format")
    func defaults() throws {
        let pad = try options(384, 576)
        #expect(pad.output.rawValue == "in/a.384x576.png")
        #expect(!pad.jpeg && !pad.crop && pad.quality == 90)
    }

    @Test("placing centres the picture on the background")
    func place() throws {
        var pad = try options(64, 64)
        pad.background = (9, 9, 9)
        let picture = [UInt8](repeating: 200, count: 32 * 64 * 3)
        let canvas = picture.withUnsafeBufferPointer { resizer.place($0.baseAddress!, stride: 32 * 3, scaledWidth: 32, scaledHeight: 64, options: pad) }
        #expect(canvas[0] == 9 && canvas[(16 * 3) - 1] == 9)      // left band
        #expect(canvas[16 * 3] == 200 && canvas[(48 * 3) - 1] == 200)  // the picture
        #expect(canvas[48 * 3] == 9)                                 // right band
    }
}
