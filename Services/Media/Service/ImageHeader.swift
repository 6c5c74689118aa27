/// The format and pixel size an image declares in its header (PNG IHDR, JPEG SOF, WebP
/// VP8/VP8L/VP8X, BMP, GIF), read before any decoder runs: a decoder allocates what the header
/// claims, so a 69-byte PNG claiming 16000×16000 must be refused here, not after decoding.
public struct ImageHeader: Equatable, Sendable {
    public enum Format: String, Sendable { case png, jpeg, webp, bmp, gif }

    public var format: Format
    public var width: Int
    public var height: Int

    public init(format: Format, width: Int, height: Int) {
        self.format = format
        self.width = width
        self.height = height
    }

    /// Why a header could not be read.
    public enum Failure: Error, Equatable {
        /// Not one of the formats above.
        case unknownFormat
        /// The format's signature is there but the size is missing or malformed.
        case malformed(String)
    }

    /// Reads the header through `read(offset, count)`, which returns up to `count` bytes at
    /// `offset` (fewer at the end of the file). Only a few small reads are made: a JPEG's
    /// segments are skipped by their lengths, however large they are.
    public static func read(_ read: (Int, Int) -> [UInt8]) -> Result<ImageHeader, Failure> {
        let head = read(0, 32)
        if head.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) { return png(head) }
        if head.starts(with: [0xFF, 0xD8]) { return jpeg(read) }
        if head.count >= 12, head.starts(with: Array("RIFF".utf8)), Array(head[8..<12]) == Array("WEBP".utf8) { return webp(head) }
        if head.starts(with: Array("BM".utf8)) { return bmp(head) }
        if head.starts(with: Array("GIF87a".utf8)) || head.starts(with: Array("GIF89a".utf8)) { return gif(head) }
        return .failure(.unknownFormat)
    }

    /// Reads the header of an in-memory image (tests, small inputs).
    public static func read(_ bytes: [UInt8]) -> Result<ImageHeader, Failure> {
        read { offset, count in
            guard offset >= 0, offset < bytes.count, count > 0 else { return [] }
            return Array(bytes[offset..<min(bytes.count, offset + count)])
        }
    }

    private static func sized(_ format: Format, _ width: Int, _ height: Int) -> Result<ImageHeader, Failure> {
        guard width > 0, height > 0 else { return .failure(.malformed("the \(format.rawValue) header declares a \(width)×\(height) image")) }
        return .success(ImageHeader(format: format, width: width, height: height))
    }

    private static func png(_ head: [UInt8]) -> Result<ImageHeader, Failure> {
        guard head.count >= 24, Array(head[12..<16]) == Array("IHDR".utf8) else { return .failure(.malformed("PNG without an IHDR chunk")) }
        return sized(.png, bigEndian(head, 16, 4), bigEndian(head, 20, 4))
    }

    private static func jpeg(_ read: (Int, Int) -> [UInt8]) -> Result<ImageHeader, Failure> {
        var offset = 2
        // A JPEG has at most a few dozen segments before its frame header; bound the walk anyway.
        for _ in 0..<4096 {
            let marker = read(offset, 2)
            guard marker.count == 2, marker[0] == 0xFF else { return .failure(.malformed("JPEG segment structure is broken")) }
            switch marker[1] {
            case 0xFF:  // fill byte before a marker
                offset += 1
                continue
            case 0x01, 0xD0...0xD7:  // markers without a length
                offset += 2
                continue
            case 0xD9, 0xDA:
                return .failure(.malformed("JPEG without a frame header (SOF)"))
            default:
                break
            }
            let segment = read(offset + 2, 7)
            guard segment.count >= 2 else { return .failure(.malformed("truncated JPEG segment")) }
            let length = bigEndian(segment, 0, 2)
            guard length >= 2 else { return .failure(.malformed("JPEG segment length \(length)")) }
            switch marker[1] {
            case 0xC0...0xCF where marker[1] != 0xC4 && marker[1] != 0xC8 && marker[1] != 0xCC:
                guard segment.count >= 7 else { return .failure(.malformed("truncated JPEG frame header")) }
                return sized(.jpeg, bigEndian(segment, 5, 2), bigEndian(segment, 3, 2))
            default:
                offset += 2 + length
            }
        }
        return .failure(.malformed("JPEG with too many segments before its frame header"))
    }

    private static func webp(_ head: [UInt8]) -> Result<ImageHeader, Failure> {
        guard head.count >= 30 else { return .failure(.malformed("truncated WebP header")) }
        switch String(decoding: head[12..<16], as: UTF8.self) {
        case "VP8 ":
            guard Array(head[23..<26]) == [0x9D, 0x01, 0x2A] else { return .failure(.malformed("VP8 frame without its start code")) }
            return sized(.webp, littleEndian(head, 26, 2) & 0x3FFF, littleEndian(head, 28, 2) & 0x3FFF)
        case "VP8L":
            guard head[20] == 0x2F else { return .failure(.malformed("VP8L without its signature")) }
            let bits = littleEndian(head, 21, 4)
            return sized(.webp, (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1)
        case "VP8X":
            return sized(.webp, littleEndian(head, 24, 3) + 1, littleEndian(head, 27, 3) + 1)
        default:
            return .failure(.malformed("WebP with an unknown first chunk"))
        }
    }

    private static func bmp(_ head: [UInt8]) -> Result<ImageHeader, Failure> {
        guard head.count >= 26 else { return .failure(.malformed("truncated BMP header")) }
        if littleEndian(head, 14, 4) == 12 {  // BITMAPCOREHEADER: 16-bit sizes
            return sized(.bmp, littleEndian(head, 18, 2), littleEndian(head, 20, 2))
        }
        // 32-bit signed sizes; a negative height means top-down rows. Int64 keeps |Int32.min| exact.
        let width = Int64(Int32(truncatingIfNeeded: UInt32(littleEndian(head, 18, 4))))
        let height = Int64(Int32(truncatingIfNeeded: UInt32(littleEndian(head, 22, 4)))).magnitude
        return sized(.bmp, Int(width), Int(height))
    }

    private static func gif(_ head: [UInt8]) -> Result<ImageHeader, Failure> {
        guard head.count >= 10 else { return .failure(.malformed("truncated GIF header")) }
        return sized(.gif, littleEndian(head, 6, 2), littleEndian(head, 8, 2))
    }

    private static func bigEndian(_ bytes: [UInt8], _ at: Int, _ count: Int) -> Int {
        (at..<at + count).reduce(0) { $0 << 8 | Int(bytes[$1]) }
    }

    private static func littleEndian(_ bytes: [UInt8], _ at: Int, _ count: Int) -> Int {
        (at..<at + count).reversed().reduce(0) { $0 << 8 | Int(bytes[$1]) }
    }
}
