import CTalkMesh
import Dispatch
import Glibc
import TalkMeshBase
import TalkMeshCore

/// An encoder (`AVCodecContext` opened for encoding), freed on deinit.
public final class StreamEncoder {
    public private(set) var context: UnsafeMutablePointer<AVCodecContext>?

    /// Allocates an encoder; `configure` sets its parameters before it is opened.
    public init(codec: UnsafePointer<AVCodec>, options: [String: String] = [:], configure: (UnsafeMutablePointer<AVCodecContext>) -> Void) throws {
        context = avcodec_alloc_context3(codec)
        guard let context else { throw ServiceError(.internalError, "cannot allocate an encoder") }
        configure(context)
        var dictionary: OpaquePointer?
        for (key, value) in options { av_dict_set(&dictionary, key, value, 0) }
        let rv = avcodec_open2(context, codec, &dictionary)
        av_dict_free(&dictionary)
        guard rv >= 0 else {
            throw ServiceError(.internalError, "cannot open the \(String(cString: codec.pointee.name)) encoder", cause: avErrorText(rv))
        }
    }

    deinit { avcodec_free_context(&context) }

    /// Sends a frame (nil flushes) and hands every packet produced to `body`.
    public func encode(_ frame: UnsafeMutablePointer<AVFrame>?, _ body: (UnsafeMutablePointer<AVPacket>) throws -> Void) throws {
        let sent = avcodec_send_frame(context, frame)
        guard sent >= 0 || sent == avErrorEOF else { throw ServiceError(.internalError, "encoding failed", cause: avErrorText(sent)) }
        let packet = Packet()
        while true {
            let received = avcodec_receive_packet(context, packet.pointer)
            if received == avErrorAgain || received == avErrorEOF { return }
            guard received >= 0 else { throw ServiceError(.internalError, "encoding failed", cause: avErrorText(received)) }
            try body(packet.pointer!)
            av_packet_unref(packet.pointer)
        }
    }
}

/// An output file being muxed (`AVFormatContext` + its AVIO), written to a scratch path; closed
/// (and the file removed unless `finish` succeeded) on deinit.
public final class MediaOutput {
    public private(set) var context: UnsafeMutablePointer<AVFormatContext>?
    public let path: String
    private var finished = false
    private var headerWritten = false
    private let flag: CancellationFlag

    public init(path: String, format: String, flag: CancellationFlag) throws {
        self.path = path
        self.flag = flag
        var context: UnsafeMutablePointer<AVFormatContext>?
        let rv = avformat_alloc_output_context2(&context, nil, format, path)
        guard rv >= 0, let context else { throw ServiceError(.internalError, "cannot create a \(format) output", cause: avErrorText(rv)) }
        self.context = context
    }

    deinit {
        if let context {
            if context.pointee.pb != nil { avio_closep(&context.pointee.pb) }
            avformat_free_context(context)
        }
        if !finished { unlink(path) }
    }

    /// Adds a stream.
    public func addStream() throws -> UnsafeMutablePointer<AVStream> {
        guard let stream = avformat_new_stream(context, nil) else { throw ServiceError(.internalError, "cannot add a stream") }
        return stream
    }

    /// Adds a stream that takes `source`'s packets as they are (stream copy): its codec
    /// parameters and time base, without the source container's codec tag.
    public func addStream(copying source: UnsafeMutablePointer<AVStream>) throws -> UnsafeMutablePointer<AVStream> {
        let stream = try addStream()
        try avCheck(avcodec_parameters_copy(stream.pointee.codecpar, source.pointee.codecpar), "cannot copy the stream parameters")
        stream.pointee.codecpar.pointee.codec_tag = 0
        stream.pointee.time_base = source.pointee.time_base
        return stream
    }

    /// Opens the file and writes the header (`options`: muxer options such as movflags).
    public func start(options: [String: String] = [:]) throws {
        var callback = AVIOInterruptCB()
        callback.callback = { opaque in Unmanaged<CancellationFlag>.fromOpaque(opaque!).takeUnretainedValue().isCancelled ? 1 : 0 }
        callback.opaque = Unmanaged.passUnretained(flag).toOpaque()
        let opened = avio_open2(&context!.pointee.pb, path, AVIO_FLAG_WRITE, &callback, nil)
        guard opened >= 0 else { throw Self.failure("cannot open the output", opened) }
        var dictionary: OpaquePointer?
        for (key, value) in options { av_dict_set(&dictionary, key, value, 0) }
        let written = avformat_write_header(context, &dictionary)
        av_dict_free(&dictionary)
        guard written >= 0 else { throw Self.failure("cannot write the header", written) }
        headerWritten = true
    }

    /// Writes a packet (takes its contents).
    public func write(_ packet: UnsafeMutablePointer<AVPacket>) throws {
        let rv = av_interleaved_write_frame(context, packet)
        guard rv >= 0 else {
            try flag.check()
            throw Self.failure("cannot write a packet", rv)
        }
    }

    /// Writes the trailer and closes the file; the file is kept.
    public func finish() throws {
        let rv = av_write_trailer(context)
        guard rv >= 0 else { throw Self.failure("cannot finish the output", rv) }
        avio_closep(&context!.pointee.pb)
        finished = true
    }

    static func failure(_ what: String, _ code: Int32) -> ServiceError {
        if code == tm_averror(ENOSPC) || code == tm_averror(EDQUOT) {
            return ServiceError(.storageFull, "no space left: \(what)", cause: avErrorText(code))
        }
        return ServiceError(.storageFailed, what, cause: avErrorText(code))
    }
}

/// A pixel-format and size converter (`SwsContext`), freed on deinit.
public final class Scaler {
    private var context: OpaquePointer?

    public init(from source: (Int32, Int32, AVPixelFormat), to destination: (Int32, Int32, AVPixelFormat), flags: Int32 = SWS_LANCZOS | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT) throws {
        context = sws_getContext(source.0, source.1, source.2, destination.0, destination.1, destination.2, flags, nil, nil, nil)
        guard context != nil else { throw ServiceError(.internalError, "cannot convert \(source) to \(destination)") }
    }

    deinit { sws_freeContext(context) }

    /// Runs `body` with a scaler for these parameters, reusing an idle one when there is: making
    /// one computes its filter bank (for Lanczos, thousands of taps through `sin`), 1–2 ms each
    /// time, and a service resizes to the same few sizes again and again. At most
    /// `ScalerKey.idleLimit` idle scalers are kept; a scaler is used by one call at a time.
    public static func reusing<T>(from source: (Int32, Int32, AVPixelFormat), to destination: (Int32, Int32, AVPixelFormat),
                                  flags: Int32 = SWS_LANCZOS | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, _ body: (Scaler) throws -> T) throws -> T {
        let key = ScalerKey(source: [source.0, source.1, source.2.rawValue], destination: [destination.0, destination.1, destination.2.rawValue], flags: flags)
        let scaler = try ScalerKey.idle.withLock { $0.take(key) } ?? Scaler(from: source, to: destination, flags: flags)
        defer { ScalerKey.idle.withLock { $0.give(scaler, key) } }
        return try body(scaler)
    }

    /// Scales a whole frame into another (both with refcounted buffers; `destination` already
    /// allocated at the output size and format), the output cut into `bands` horizontal bands
    /// computed at once, each on its own thread with its own scaler. For RGB output swscale
    /// computes a row the same way whichever rows are asked for, so the bands are exactly one
    /// pass (tested); for 4:2:0 output 5.1 wrote wrong rows, so ask for one band there.
    public static func scale(_ source: UnsafeMutablePointer<AVFrame>, into destination: UnsafeMutablePointer<AVFrame>,
                             flags: Int32 = SWS_LANCZOS | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, bands: Int) throws {
        let from = (source.pointee.width, source.pointee.height, AVPixelFormat(rawValue: source.pointee.format))
        let to = (destination.pointee.width, destination.pointee.height, AVPixelFormat(rawValue: destination.pointee.format))
        let height = Int(to.1)
        let failure = Locked<ServiceError?>(nil)
        let sourceAddress = UInt(bitPattern: source)
        let destinationAddress = UInt(bitPattern: destination)
        let count = max(1, min(bands, height / 16))
        DispatchQueue.concurrentPerform(iterations: count) { band in
            do {
                try reusing(from: from, to: to, flags: flags) { scaler in
                    let context = scaler.context
                    let alignment = Int(max(1, sws_receive_slice_alignment(context)))
                    let step = (height / count + alignment - 1) / alignment * alignment
                    let start = min(height, band * step)
                    let end = band == count - 1 ? height : min(height, start + step)
                    guard end > start else { return }
                    let source = UnsafeMutablePointer<AVFrame>(bitPattern: sourceAddress)!
                    let destination = UnsafeMutablePointer<AVFrame>(bitPattern: destinationAddress)!
                    var rv = sws_frame_start(context, destination, source)
                    if rv >= 0 { rv = sws_send_slice(context, 0, UInt32(source.pointee.height)) }
                    if rv >= 0 { rv = sws_receive_slice(context, UInt32(start), UInt32(end - start)) }
                    sws_frame_end(context)
                    if rv < 0 { failure.withLock { $0 = ServiceError(.internalError, "cannot scale the picture", cause: avErrorText(rv)) } }
                }
            } catch {
                failure.withLock { $0 = error as? ServiceError ?? ServiceError(.internalError, "cannot scale the picture") }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// Scales `sourceHeight` rows of planes to planes.
    public func scale(_ source: [UnsafePointer<UInt8>?], _ sourceStrides: [Int32], height: Int32,
                      _ destination: [UnsafeMutablePointer<UInt8>?], _ destinationStrides: [Int32]) {
        var source = source + Array(repeating: nil, count: 4 - source.count)
        var sourceStrides = sourceStrides + Array(repeating: 0, count: 4 - sourceStrides.count)
        var destination = destination + Array(repeating: nil, count: 4 - destination.count)
        var destinationStrides = destinationStrides + Array(repeating: 0, count: 4 - destinationStrides.count)
        _ = sws_scale(context, &source, &sourceStrides, 0, height, &destination, &destinationStrides)
    }
}

/// What a scaler was made for; the pool of idle scalers is keyed by it.
struct ScalerKey: Hashable {
    var source: [Int32]
    var destination: [Int32]
    var flags: Int32

    static let idleLimit = 16
    static let idle = Locked(IdleScalers())
}

/// Idle scalers, a few per key, at most `ScalerKey.idleLimit` in all (the oldest key goes first).
struct IdleScalers {
    private var scalers: [ScalerKey: [Scaler]] = [:]
    private var order: [ScalerKey] = []
    private var count = 0

    mutating func take(_ key: ScalerKey) -> Scaler? {
        guard let scaler = scalers[key]?.popLast() else { return nil }
        count -= 1
        return scaler
    }

    mutating func give(_ scaler: Scaler, _ key: ScalerKey) {
        if scalers[key] == nil { order.append(key) }
        scalers[key, default: []].append(scaler)
        count += 1
        while count > ScalerKey.idleLimit, let oldest = order.first {
            count -= scalers.removeValue(forKey: oldest)?.count ?? 0
            order.removeFirst()
        }
    }
}

extension UnsafeMutablePointer where Pointee == AVFrame {
    /// The frame's plane pointers and strides.
    public var planes: (data: [UnsafeMutablePointer<UInt8>?], strides: [Int32]) {
        var data = pointee.data
        var strides = pointee.linesize
        let pointers = withUnsafeBytes(of: &data) { Array($0.bindMemory(to: UnsafeMutablePointer<UInt8>?.self).prefix(4)) }
        let lines = withUnsafeBytes(of: &strides) { Array($0.bindMemory(to: Int32.self).prefix(4)) }
        return (pointers, lines)
    }
}

/// Allocates a frame with its buffers.
public func makeVideoFrame(width: Int32, height: Int32, format: AVPixelFormat) throws -> Frame {
    let frame = Frame()
    frame.pointer!.pointee.width = width
    frame.pointer!.pointee.height = height
    frame.pointer!.pointee.format = format.rawValue
    let rv = av_frame_get_buffer(frame.pointer, 0)
    guard rv >= 0 else { throw ServiceError(.internalError, "cannot allocate a \(width)×\(height) frame", cause: avErrorText(rv)) }
    return frame
}
