import CTalkMesh
import Glibc
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
        avcodec_parameters_copy(stream.pointee.codecpar, source.pointee.codecpar)
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
