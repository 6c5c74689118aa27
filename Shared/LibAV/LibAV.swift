import CTalkMesh
import Glibc
import TalkMeshBase
import TalkMeshCore

/// libav's message for an error code (`av_strerror`).
public func avErrorText(_ code: Int32) -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    av_strerror(code, &buffer, buffer.count)
    return cString(buffer)
}

/// Checks a libav return: a negative one (other than those in `allowing`) throws INTERNAL with
/// what failed and libav's text.
@discardableResult
public func avCheck(_ code: Int32, _ what: @autoclosure () -> String, allowing: [Int32] = []) throws -> Int32 {
    if code < 0 && !allowing.contains(code) { throw ServiceError(.internalError, what(), cause: avErrorText(code)) }
    return code
}

/// `AVERROR(EAGAIN)` and `AVERROR_EOF`, which Swift cannot import as macros.
public let avErrorAgain = tm_averror(EAGAIN)
public let avErrorEOF = tm_averror_eof()

/// An opened input file (`AVFormatContext`), closed on deinit. Reads stop promptly when the
/// call's cancellation flag is set (libav's interrupt callback).
public final class MediaInput {
    public private(set) var context: UnsafeMutablePointer<AVFormatContext>?
    private let flag: CancellationFlag

    /// libav's own console logging is reduced to errors: services log through swift-log and
    /// carry libav's message in their errors.
    private static let quietLogging: Void = { av_log_set_level(AV_LOG_ERROR) }()

    /// Opens and probes `path`; `invalid` is the error code used for undecodable input. `probe:
    /// false` skips `avformat_find_stream_info`, which decodes a still image once only to learn
    /// its size: a caller that decodes the picture anyway learns it from the frame.
    public init(path: String, flag: CancellationFlag, invalid: ErrorCode, probe: Bool = true) throws {
        Self.quietLogging
        self.flag = flag
        var context = avformat_alloc_context()
        context?.pointee.interrupt_callback.callback = { opaque in
            Unmanaged<CancellationFlag>.fromOpaque(opaque!).takeUnretainedValue().isCancelled ? 1 : 0
        }
        context?.pointee.interrupt_callback.opaque = Unmanaged.passUnretained(flag).toOpaque()
        let opened = avformat_open_input(&context, path, nil, nil)
        guard opened == 0 else {
            // avformat_open_input frees the context on failure.
            try flag.check()
            throw ServiceError(invalid, "cannot open the input", cause: avErrorText(opened))
        }
        self.context = context
        guard probe else { return }
        let probed = avformat_find_stream_info(context, nil)
        guard probed >= 0 else {
            try flag.check()
            throw ServiceError(invalid, "cannot read stream information", cause: avErrorText(probed))
        }
    }

    deinit {
        avformat_close_input(&context)
    }

    /// The container's short name (`wav`, `mov,mp4,m4a,3gp,3g2,mj2`, `ogg`…).
    public var containerName: String {
        guard let name = context?.pointee.iformat?.pointee.name else { return "" }
        return String(cString: name)
    }

    /// The container's duration in seconds, when it declares one.
    public var declaredDuration: Double? {
        guard let duration = context?.pointee.duration, duration != Int64(bitPattern: 0x8000_0000_0000_0000), duration > 0 else { return nil }
        return Double(duration) / Double(AV_TIME_BASE)
    }

    /// Reads every packet to the end of the input; `body` borrows each (it is unreferenced after).
    /// A read error other than the end is `invalid`; cancellation stops the loop.
    public func readPackets(invalid: ErrorCode, what: String = "the input",
                            _ body: (UnsafeMutablePointer<AVPacket>) throws -> Bool) throws {
        let packet = Packet()
        while true {
            try flag.check()
            let read = av_read_frame(context, packet.pointer)
            if read == avErrorEOF { return }
            guard read >= 0 else {
                try flag.check()
                throw ServiceError(invalid, "\(what) could not be read to its end", cause: avErrorText(read))
            }
            defer { av_packet_unref(packet.pointer) }
            guard try body(packet.pointer!) else { return }
        }
    }

    /// The streams.
    public var streams: [UnsafeMutablePointer<AVStream>] {
        guard let context else { return [] }
        return (0..<Int(context.pointee.nb_streams)).compactMap { context.pointee.streams[$0] }
    }
}

/// A decoder for one stream (`AVCodecContext`), freed on deinit.
public final class StreamDecoder {
    public private(set) var context: UnsafeMutablePointer<AVCodecContext>?
    public let streamIndex: Int32

    /// `lowres` (0–3) asks a decoder that supports it (MJPEG) for the picture at 1/2^lowres of
    /// its size, reduced in the DCT domain.
    public init(input: MediaInput, mediaType: AVMediaType, invalid: ErrorCode, what: String, lowres: Int32 = 0) throws {
        var codec: UnsafePointer<AVCodec>?
        let index = av_find_best_stream(input.context, mediaType, -1, -1, &codec, 0)
        guard index >= 0, let codec else {
            throw ServiceError(invalid, "no \(what) stream found", cause: index < 0 ? avErrorText(index) : nil)
        }
        streamIndex = index
        context = avcodec_alloc_context3(codec)
        guard let context else { throw ServiceError(.internalError, "cannot allocate a decoder") }
        let parameters = input.context!.pointee.streams[Int(index)]!.pointee.codecpar
        var rv = avcodec_parameters_to_context(context, parameters)
        context.pointee.lowres = min(lowres, Int32(codec.pointee.max_lowres))
        if rv >= 0 { rv = avcodec_open2(context, codec, nil) }
        guard rv >= 0 else { throw ServiceError(invalid, "cannot open the \(what) decoder", cause: avErrorText(rv)) }
    }

    deinit {
        avcodec_free_context(&context)
    }

    public var codecName: String {
        guard let context else { return "" }
        return String(cString: avcodec_get_name(context.pointee.codec_id))
    }
}

/// An `AVPacket`, freed on deinit.
public final class Packet {
    public var pointer: UnsafeMutablePointer<AVPacket>?
    public init() { pointer = av_packet_alloc() }
    deinit { av_packet_free(&pointer) }
}

/// An `AVFrame`, freed on deinit.
public final class Frame {
    public var pointer: UnsafeMutablePointer<AVFrame>?
    public init() { pointer = av_frame_alloc() }
    deinit { av_frame_free(&pointer) }
}

/// A sample-format, rate and channel-layout converter (`SwrContext`) to interleaved signed 16-bit.
public final class Resampler {
    private var context: OpaquePointer?
    public let outputRate: Int32
    public let outputChannels: Int32

    public init(inputLayout: AVChannelLayout, inputFormat: AVSampleFormat, inputRate: Int32, outputRate: Int32, outputChannels: Int32) throws {
        self.outputRate = outputRate
        self.outputChannels = outputChannels
        var input = inputLayout
        if input.order == AV_CHANNEL_ORDER_UNSPEC || av_channel_layout_check(&input) == 0 {
            var fallback = AVChannelLayout()
            av_channel_layout_default(&fallback, input.nb_channels)
            input = fallback
        }
        var output = AVChannelLayout()
        av_channel_layout_default(&output, outputChannels)
        let rv = swr_alloc_set_opts2(&context, &output, AV_SAMPLE_FMT_S16, outputRate, &input, inputFormat, inputRate, 0, nil)
        guard rv >= 0, swr_init(context) >= 0 else {
            throw ServiceError(.invalidAudio, "cannot convert this audio", cause: avErrorText(rv))
        }
    }

    deinit { swr_free(&context) }

    /// Forgets the audio converted so far, to start on an unrelated stretch (swr keeps its
    /// filter bank when the parameters are unchanged, so this is cheap).
    public func reset() {
        swr_init(context)
    }

    /// Converts interleaved 16-bit samples (when the input format is S16) and appends the output.
    public func convert(_ samples: [Int16], into output: inout [Int16], inputChannels: Int) {
        samples.withUnsafeBytes { input in
            var source: UnsafePointer<UInt8>? = input.baseAddress?.assumingMemoryBound(to: UInt8.self)
            append(inputCount: Int32(samples.count / max(inputChannels, 1)), into: &output) { destination, capacity, count in
                swr_convert(context, destination, capacity, &source, count)
            }
        }
    }

    /// Converts a decoded frame (or flushes with nil) and appends the interleaved samples.
    public func convert(_ frame: UnsafeMutablePointer<AVFrame>?, into output: inout [Int16]) {
        append(inputCount: frame?.pointee.nb_samples ?? 0, into: &output) { destination, capacity, count in
            guard let frame else { return swr_convert(context, destination, capacity, nil, 0) }
            return frame.pointee.extended_data.withMemoryRebound(to: UnsafePointer<UInt8>?.self, capacity: 8) { source in
                swr_convert(context, destination, capacity, source, count)
            }
        }
    }

    /// Makes room for what `inputCount` frames can produce, lets `convert` write there (given the
    /// destination, its capacity in frames and `inputCount`), and keeps what it produced.
    private func append(inputCount: Int32, into output: inout [Int16],
                        _ convert: (UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>, Int32, Int32) -> Int32) {
        let capacity = Int(swr_get_out_samples(context, inputCount)) + 32
        guard capacity > 0 else { return }
        let start = output.count
        output.append(contentsOf: repeatElement(0, count: capacity * Int(outputChannels)))
        let produced: Int32 = output.withUnsafeMutableBufferPointer { buffer in
            var destination: UnsafeMutablePointer<UInt8>? = UnsafeMutableRawPointer(buffer.baseAddress! + start).assumingMemoryBound(to: UInt8.self)
            return convert(&destination, Int32(capacity), inputCount)
        }
        output.removeLast(output.count - start - Int(max(produced, 0)) * Int(outputChannels))
    }
}

extension MediaInput {
    /// Reads the input to its end in one pass, each packet to the decoder of its stream; `body`
    /// gets every frame with the index of its decoder in `decoders`, and returns false to stop.
    /// A few undecodable packets per stream are tolerated, past that it is `invalid`; so is a read
    /// error other than EOF. Returns the last decode error seen (0: none), for a caller that
    /// reports why nothing decoded.
    @discardableResult
    public func decode(_ decoders: [StreamDecoder], invalid: ErrorCode, what: String = "the input",
                       _ body: (Int, UnsafeMutablePointer<AVFrame>) throws -> Bool) throws -> Int32 {
        let frame = Frame()
        var errors = Array(repeating: 0, count: decoders.count)
        var lastError: Int32 = 0
        var stop = false
        func failed(_ index: Int, _ code: Int32) throws {
            errors[index] += 1
            lastError = code
            if errors[index] > 8 { throw ServiceError(invalid, "\(what) does not decode", cause: avErrorText(code)) }
        }
        func drain(_ index: Int) throws {
            while !stop {
                let received = avcodec_receive_frame(decoders[index].context, frame.pointer)
                if received == avErrorAgain || received == avErrorEOF { return }
                guard received >= 0 else { return try failed(index, received) }
                stop = try !body(index, frame.pointer!)
                av_frame_unref(frame.pointer)
            }
        }
        try readPackets(invalid: invalid, what: what) { packet in
            guard let index = decoders.firstIndex(where: { $0.streamIndex == packet.pointee.stream_index }) else { return true }
            let sent = avcodec_send_packet(decoders[index].context, packet)
            if sent < 0 && sent != avErrorAgain {
                try failed(index, sent)
                return true
            }
            try drain(index)
            return !stop
        }
        for index in decoders.indices where !stop {
            avcodec_send_packet(decoders[index].context, nil)
            try drain(index)
        }
        return lastError
    }
}

extension StreamDecoder {
    /// Reads `input` to its end, decoding this decoder's stream; `body` gets every frame
    /// (`MediaInput.decode` with this one decoder).
    @discardableResult
    public func decodeAll(from input: MediaInput, flag: CancellationFlag, invalid: ErrorCode, what: String = "the input",
                          _ body: (UnsafeMutablePointer<AVFrame>) throws -> Bool) throws -> Int32 {
        try input.decode([self], invalid: invalid, what: what) { _, frame in try body(frame) }
    }
}
