import CTalkMesh
import Glibc
import TalkMeshCore
import TalkMeshLibAV
import TalkMeshMessages

/// ResizeImage: decode any still image libavcodec reads, honour JPEG EXIF orientation, composite
/// alpha onto the background, scale preserving the aspect ratio (Lanczos) and pad (or crop) to
/// exactly the target size, encode PNG or JPEG. Absurd inputs are refused before decoding.
public struct ImageResizer: Sendable {
    public struct Configuration: Sendable {
        /// Largest source accepted, in pixels (IMAGE_TOO_LARGE past it).
        public var maxPixels = 50_000_000
        public init() {}
    }

    public let store: any BlobStore
    public let configuration: Configuration

    public init(store: any BlobStore, configuration: Configuration = Configuration()) {
        self.store = store
        self.configuration = configuration
    }

    struct Options {
        var key: BlobKey
        var output: BlobKey
        var width: Int
        var height: Int
        var crop: Bool
        var jpeg: Bool
        var quality: Int
        var background: (UInt8, UInt8, UInt8)
    }

    func validate(_ request: ResizeImageRequest) throws(ServiceError) -> Options {
        func invalid(_ field: String, _ rule: String) -> ServiceError { ServiceError(.invalidArgument, "\(field): \(rule)") }
        guard !request.imageKey.isEmpty else { throw invalid("image_key", "required") }
        let key = try BlobKey(request.imageKey)
        for (field, value) in [("width", request.width), ("height", request.height)] {
            guard (64...4096).contains(value), value % 2 == 0 else { throw invalid(field, "must be an even number from 64 to 4096") }
        }
        let fit = request.fit.lowercased()
        guard ["", "pad", "crop"].contains(fit) else { throw invalid("fit", "must be pad or crop") }
        let format = request.format.lowercased()
        guard ["", "png", "jpeg", "jpg"].contains(format) else { throw invalid("format", "must be png or jpeg") }
        let quality = request.jpegQuality == 0 ? 90 : Int(request.jpegQuality)
        guard (1...100).contains(quality) else { throw invalid("jpeg_quality", "must be from 1 to 100") }
        var background: (UInt8, UInt8, UInt8) = (0, 0, 0)
        if !request.background.isEmpty {
            let hex = request.background.hasPrefix("#") ? String(request.background.dropFirst()) : request.background
            guard hex.count == 6, let value = UInt32(hex, radix: 16) else { throw invalid("background", "must be #RRGGBB") }
            background = (UInt8(value >> 16 & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF))
        }
        let jpeg = format == "jpeg" || format == "jpg"
        let outputText = request.outputKey.isEmpty
            ? key.replacingExtension(with: "\(request.width)x\(request.height).\(jpeg ? "jpg" : "png")") : request.outputKey
        return Options(key: key, output: try BlobKey(outputText), width: Int(request.width), height: Int(request.height),
                       crop: fit == "crop", jpeg: jpeg, quality: quality, background: background)
    }

    /// Runs a resize (blocking: call it on the work pool).
    public func resize(_ request: ResizeImageRequest, flag: CancellationFlag) throws -> ResizeImageResponse {
        let options = try validate(request)
        let (canvas, sourceWidth, sourceHeight) = try store.withLocalFile(options.key) { path in
            try decodeAndFit(path: path, flag: flag, options: options)
        }
        try flag.check()
        let encoded = try encode(canvas, width: options.width, height: options.height, options: options)
        try store.put(options.output, encoded)
        var response = ResizeImageResponse()
        response.imageKey = options.output.rawValue
        response.width = Int32(options.width)
        response.height = Int32(options.height)
        response.sourceWidth = Int32(sourceWidth)
        response.sourceHeight = Int32(sourceHeight)
        response.format = options.jpeg ? "jpeg" : "png"
        return response
    }

    /// A fitted picture: RGB24 bytes, or (for JPEG output from a picture that needs no
    /// orientation or alpha work) a full-range 4:2:0 frame the JPEG encoder takes as it is.
    enum Canvas {
        case rgb([UInt8])
        case yuv(Frame)
    }

    /// Decodes the first frame and fits it to the target canvas; returns the canvas and the
    /// source's size (after orientation).
    func decodeAndFit(path: String, flag: CancellationFlag, options: Options) throws -> (Canvas, Int, Int) {
        // One open for both: the declared size, and the first 256 KiB where a JPEG keeps its EXIF.
        let (header, head) = try FileBlobStore.withReader(path) { read in
            (ImageHeader.read { (try? read($0, $1)) ?? [] }, (try? read(0, 256 * 1024)) ?? [])
        }
        let declared: ImageHeader
        switch header {
        case .failure(.unknownFormat):
            throw ServiceError(.invalidImage, "not a PNG, JPEG, WebP, BMP or GIF image")
        case .failure(.malformed(let reason)):
            throw ServiceError(.invalidImage, "the image header is malformed", cause: reason)
        case .success(let value):
            declared = value
            // Refused before any decoder runs: decoders allocate what the header claims.
            guard declared.width <= configuration.maxPixels / declared.height else {
                throw ServiceError(.imageTooLarge, "the image is \(declared.width)×\(declared.height); the limit is \(configuration.maxPixels / 1_000_000) megapixels")
            }
        }
        let orientation = ExifOrientation.read(head)
        // A JPEG at least twice the size it scales to is decoded smaller in the DCT domain
        // (lowres), which is faster than decoding it whole and a better filter than skipping.
        var lowres: Int32 = 0
        if declared.format == .jpeg {
            let (width, height) = ExifOrientation.outputSize(orientation: orientation, width: declared.width, height: declared.height)
            let (scaledWidth, scaledHeight) = scaledSize(width: width, height: height, options: options)
            while lowres < 3, width >> (lowres + 1) >= scaledWidth, height >> (lowres + 1) >= scaledHeight { lowres += 1 }
        }
        do {
            let (canvas, width, height) = try decodeAndFit(path: path, flag: flag, options: options, orientation: orientation, lowres: lowres)
            guard lowres > 0 else { return (canvas, width, height) }
            let (sourceWidth, sourceHeight) = ExifOrientation.outputSize(orientation: orientation, width: declared.width, height: declared.height)
            return (canvas, sourceWidth, sourceHeight)
        } catch let error as ServiceError where lowres > 0 && error.code == .invalidImage {
            // Lossless JPEG decodes only at full size.
            return try decodeAndFit(path: path, flag: flag, options: options, orientation: orientation, lowres: 0)
        }
    }

    func decodeAndFit(path: String, flag: CancellationFlag, options: Options, orientation: Int, lowres: Int32) throws -> (Canvas, Int, Int) {
        let background = options.background
        // No stream probe: it would decode the whole picture once more only to learn its size.
        let input = try MediaInput(path: path, flag: flag, invalid: .invalidImage, probe: false)
        let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_VIDEO, invalid: .invalidImage, what: "image", lowres: lowres)
        var rgba: [UInt8] = []
        var width = 0
        var height = 0
        var direct: Canvas?
        try decoder.decodeAll(from: input, flag: flag, invalid: .invalidImage) { frame in
            width = Int(frame.pointee.width)
            height = Int(frame.pointee.height)
            guard width > 0, height > 0 else { throw ServiceError(.invalidImage, "the image has no size") }
            guard width <= configuration.maxPixels / height else {
                throw ServiceError(.imageTooLarge, "the image is \(width)×\(height); the limit is \(configuration.maxPixels / 1_000_000) megapixels")
            }
            let format = AVPixelFormat(rawValue: frame.pointee.format)
            let hasAlpha = (av_pix_fmt_desc_get(format)?.pointee.flags ?? 0) & UInt64(AV_PIX_FMT_FLAG_ALPHA) != 0
            if orientation == 1 && !hasAlpha {
                // The common case: from the decoded format straight to the fitted size.
                direct = try fitFrame(frame, width: width, height: height, options: options, flag: flag)
                return false
            }
            rgba = [UInt8](repeating: 0, count: width * height * 4)
            let planes = frame.planes
            try Scaler.reusing(from: (Int32(width), Int32(height), AVPixelFormat(rawValue: frame.pointee.format)),
                               to: (Int32(width), Int32(height), AV_PIX_FMT_RGBA), flags: SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT) { scaler in
                rgba.withUnsafeMutableBufferPointer { buffer in
                    scaler.scale(planes.data.map { UnsafePointer($0) }, planes.strides, height: Int32(height), [buffer.baseAddress], [Int32(width * 4)])
                }
            }
            return false  // the first frame is the image
        }
        guard width > 0 else { throw ServiceError(.invalidImage, "no picture could be decoded") }
        if let direct { return (direct, width, height) }
        // Orientation, then alpha over the background, into RGB24.
        let (outWidth, outHeight) = ExifOrientation.outputSize(orientation: orientation, width: width, height: height)
        var rgb = [UInt8](repeating: 0, count: outWidth * outHeight * 3)
        let (br, bg, bb) = (Int(background.0), Int(background.1), Int(background.2))
        rgba.withUnsafeBufferPointer { source in
            rgb.withUnsafeMutableBufferPointer { target in
                for y in 0..<outHeight {
                    for x in 0..<outWidth {
                        let (sx, sy) = orientation == 1 ? (x, y) : ExifOrientation.sourcePixel(orientation: orientation, x: x, y: y, width: width, height: height)
                        let s = (sy * width + sx) * 4
                        let t = (y * outWidth + x) * 3
                        let alpha = Int(source[s + 3])
                        if alpha == 255 {
                            target[t] = source[s]; target[t + 1] = source[s + 1]; target[t + 2] = source[s + 2]
                        } else {
                            target[t] = UInt8((Int(source[s]) * alpha + br * (255 - alpha) + 127) / 255)
                            target[t + 1] = UInt8((Int(source[s + 1]) * alpha + bg * (255 - alpha) + 127) / 255)
                            target[t + 2] = UInt8((Int(source[s + 2]) * alpha + bb * (255 - alpha) + 127) / 255)
                        }
                    }
                }
            }
        }
        return (.rgb(try fit(rgb, width: outWidth, height: outHeight, options: options)), outWidth, outHeight)
    }

    /// The size the source scales to: inside the target (pad) or covering it (crop).
    func scaledSize(width: Int, height: Int, options: Options) -> (Int, Int) {
        let scaleX = Double(options.width) / Double(width)
        let scaleY = Double(options.height) / Double(height)
        let scale = options.crop ? max(scaleX, scaleY) : min(scaleX, scaleY)
        let scaledWidth = max(1, min(options.crop ? Int.max : options.width, Int((Double(width) * scale).rounded())))
        let scaledHeight = max(1, min(options.crop ? Int.max : options.height, Int((Double(height) * scale).rounded())))
        return (scaledWidth, scaledHeight)
    }

    /// Scales a decoded frame (any pixel format) straight to the fitted size, then places it. A
    /// frame at least twice the fitted size in 8-bit planes is first halved by 2×2 averaging
    /// (as Pillow's `reducing_gap` does): Lanczos then reads a quarter of the pixels.
    func fitFrame(_ frame: UnsafeMutablePointer<AVFrame>, width: Int, height: Int, options: Options, flag: CancellationFlag) throws -> Canvas {
        let (scaledWidth, scaledHeight) = scaledSize(width: width, height: height, options: options)
        let format = AVPixelFormat(rawValue: frame.pointee.format)
        var source = frame
        var reduced: [HalvedPicture] = []
        while Int(source.pointee.width) / 2 >= scaledWidth, Int(source.pointee.height) / 2 >= scaledHeight,
              let half = HalvedPicture(source.planes.data.map { UnsafePointer($0) }, source.planes.strides,
                                       width: Int(source.pointee.width), height: Int(source.pointee.height), format: format) {
            try flag.check()
            reduced.append(half)
            source = half.frame.pointer!
        }
        // JPEG out, and the picture's corner on even pixels: scale and pad in 4:2:0 directly.
        let offset = ((options.width - scaledWidth) / 2, (options.height - scaledHeight) / 2)
        let yuv = options.jpeg && offset.0 % 2 == 0 && offset.1 % 2 == 0
        let scaled = try makeVideoFrame(width: Int32(scaledWidth), height: Int32(scaledHeight), format: yuv ? AV_PIX_FMT_YUVJ420P : AV_PIX_FMT_RGB24)
        // Two bands on two threads once the work is worth a thread (a quarter-megapixel source).
        // RGB output only: asked for a row range of 4:2:0 output, swscale 5.1 wrote wrong rows.
        let bands = !yuv && Int(source.pointee.width) * Int(source.pointee.height) >= 1 << 18 ? 2 : 1
        try Scaler.scale(source, into: scaled.pointer!, bands: bands)
        withExtendedLifetime(reduced) {}
        if yuv { return .yuv(try placeYUV(scaled, offset: offset, options: options)) }
        let plane = scaled.pointer!.planes
        return .rgb(place(UnsafePointer(plane.data[0]!), stride: Int(plane.strides[0]), scaledWidth: scaledWidth, scaledHeight: scaledHeight, options: options))
    }

    /// Puts a scaled 4:2:0 picture on a full-range 4:2:0 canvas at an even `offset` (negative
    /// when cropping): the background around it, in Y'CbCr (BT.601, full range, as JPEG has it).
    func placeYUV(_ scaled: Frame, offset: (Int, Int), options: Options) throws -> Frame {
        let canvas = try makeVideoFrame(width: Int32(options.width), height: Int32(options.height), format: AV_PIX_FMT_YUVJ420P)
        let (r, g, b) = (Double(options.background.0), Double(options.background.1), Double(options.background.2))
        let fill = [0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b, 128 + 0.5 * r - 0.418688 * g - 0.081312 * b]
            .map { UInt8(max(0, min(255, $0.rounded()))) }
        let source = scaled.pointer!.planes
        let target = canvas.pointer!.planes
        for plane in 0..<3 {
            let shift = plane == 0 ? 0 : 1
            Self.placePlane(UnsafePointer(source.data[plane]!), stride: Int(source.strides[plane]),
                            size: ((Int(scaled.pointer!.pointee.width) + shift) >> shift, (Int(scaled.pointer!.pointee.height) + shift) >> shift),
                            into: target.data[plane]!, stride: Int(target.strides[plane]),
                            size: ((options.width + shift) >> shift, (options.height + shift) >> shift),
                            at: (offset.0 >> shift, offset.1 >> shift), fill: [fill[plane]])
        }
        return canvas
    }

    /// Copies a `picture`-sized plane onto a `canvas`-sized one at `offset` (negative when
    /// cropping) and fills what the picture does not cover with `fill`, one pixel's bytes.
    static func placePlane(_ source: UnsafePointer<UInt8>, stride sourceStride: Int, size picture: (Int, Int),
                           into target: UnsafeMutablePointer<UInt8>, stride: Int, size canvas: (Int, Int),
                           at offset: (Int, Int), fill: [UInt8]) {
        let pixel = fill.count
        func background(_ row: UnsafeMutablePointer<UInt8>, _ from: Int, _ to: Int) {
            guard to > from else { return }
            if pixel == 1 { (row + from).update(repeating: fill[0], count: to - from); return }
            for x in from..<to { for byte in 0..<pixel { row[x * pixel + byte] = fill[byte] } }
        }
        let from = min(canvas.0, max(0, offset.0))
        let to = max(from, min(canvas.0, offset.0 + picture.0))
        for y in 0..<canvas.1 {
            let row = target + y * stride
            let sy = y - offset.1
            guard sy >= 0, sy < picture.1, to > from else {
                background(row, 0, canvas.0)
                continue
            }
            background(row, 0, from)
            (row + from * pixel).update(from: source + sy * sourceStride + (from - offset.0) * pixel, count: (to - from) * pixel)
            background(row, to, canvas.0)
        }
    }

    /// Scales preserving the aspect ratio (Lanczos), then pads centred or crops centred.
    func fit(_ rgb: [UInt8], width: Int, height: Int, options: Options) throws -> [UInt8] {
        let (scaledWidth, scaledHeight) = scaledSize(width: width, height: height, options: options)
        var scaled = [UInt8](repeating: 0, count: scaledWidth * scaledHeight * 3)
        try Scaler.reusing(from: (Int32(width), Int32(height), AV_PIX_FMT_RGB24), to: (Int32(scaledWidth), Int32(scaledHeight), AV_PIX_FMT_RGB24)) { scaler in
            rgb.withUnsafeBufferPointer { source in
                scaled.withUnsafeMutableBufferPointer { target in
                    scaler.scale([source.baseAddress], [Int32(width * 3)], height: Int32(height), [target.baseAddress], [Int32(scaledWidth * 3)])
                }
            }
        }
        return scaled.withUnsafeBufferPointer { place($0.baseAddress!, stride: scaledWidth * 3, scaledWidth: scaledWidth, scaledHeight: scaledHeight, options: options) }
    }

    /// Puts the scaled RGB24 picture on the canvas: centred with background around it, or centre-cropped.
    func place(_ scaled: UnsafePointer<UInt8>, stride: Int, scaledWidth: Int, scaledHeight: Int, options: Options) -> [UInt8] {
        let offset = ((options.width - scaledWidth) / 2, (options.height - scaledHeight) / 2)
        return [UInt8](unsafeUninitializedCapacity: options.width * options.height * 3) { canvas, initialized in
            Self.placePlane(scaled, stride: stride, size: (scaledWidth, scaledHeight), into: canvas.baseAddress!, stride: options.width * 3,
                            size: (options.width, options.height), at: offset,
                            fill: [options.background.0, options.background.1, options.background.2])
            initialized = options.width * options.height * 3
        }
    }

    /// Encodes the canvas as PNG (PNGWriter), or as JPEG at the requested quality (libavcodec's MJPEG).
    func encode(_ canvas: Canvas, width: Int, height: Int, options: Options) throws -> [UInt8] {
        let frame: Frame
        switch canvas {
        case .rgb(let rgb):
            guard options.jpeg else { return try PNGWriter.encode(rgb: rgb, width: width, height: height) }
            frame = try makeVideoFrame(width: Int32(width), height: Int32(height), format: AV_PIX_FMT_YUVJ420P)
            let planes = frame.pointer!.planes
            try Scaler.reusing(from: (Int32(width), Int32(height), AV_PIX_FMT_RGB24), to: (Int32(width), Int32(height), AV_PIX_FMT_YUVJ420P),
                               flags: SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT) { scaler in
                rgb.withUnsafeBufferPointer { source in
                    scaler.scale([source.baseAddress], [Int32(width * 3)], height: Int32(height), planes.data, planes.strides)
                }
            }
        case .yuv(let yuv):
            frame = yuv
        }
        guard let codec = avcodec_find_encoder(AV_CODEC_ID_MJPEG) else { throw ServiceError(.internalError, "no JPEG encoder") }
        // JPEG quality 1–100 onto the MJPEG quantiser scale 31–2 (ffmpeg's -q:v).
        let qscale = max(2, min(31, Int((31 - Double(options.quality - 1) * 29 / 99).rounded())))
        let lambda = Int32(qscale) * 118  // FF_QP2LAMBDA
        let encoder = try StreamEncoder(codec: codec) { context in
            context.pointee.width = Int32(width)
            context.pointee.height = Int32(height)
            context.pointee.pix_fmt = AV_PIX_FMT_YUVJ420P
            context.pointee.time_base = AVRational(num: 1, den: 25)
            context.pointee.flags |= AV_CODEC_FLAG_QSCALE
            context.pointee.global_quality = lambda
            context.pointee.color_range = AVCOL_RANGE_JPEG
        }
        frame.pointer!.pointee.quality = lambda
        frame.pointer!.pointee.pts = 0
        var bytes: [UInt8] = []
        try encoder.encode(frame.pointer) { packet in
            bytes.append(contentsOf: UnsafeBufferPointer(start: packet.pointee.data, count: Int(packet.pointee.size)))
        }
        try encoder.encode(nil) { packet in
            bytes.append(contentsOf: UnsafeBufferPointer(start: packet.pointee.data, count: Int(packet.pointee.size)))
        }
        guard !bytes.isEmpty else { throw ServiceError(.internalError, "the encoder produced nothing") }
        return bytes
    }
}
