import CTalkMesh
import TalkMeshCore

/// An AAC encoder fed decoded audio of any format: resampled, buffered into the encoder's frame
/// size (1024), timestamped by sample count, muxed into its own output stream.
public final class AudioEncoderPipeline {
    let encoder: StreamEncoder
    public let stream: UnsafeMutablePointer<AVStream>
    let output: MediaOutput
    private var resampler: OpaquePointer?
    private var resamplerKey: (Int32, Int32, Int32) = (0, 0, -1)
    private var fifo: OpaquePointer?
    private var samplesWritten: Int64 = 0
    let rate: Int32
    let channels: Int32

    /// `options`: AAC encoder options (e.g. `aac_coder: fast` where speed matters more than quality).
    public init(rate: Int32, channels: Int32, output: MediaOutput, options: [String: String] = [:]) throws {
        guard let aac = avcodec_find_encoder(AV_CODEC_ID_AAC) else { throw ServiceError(.internalError, "no AAC encoder") }
        self.rate = rate
        self.channels = max(1, channels)
        self.output = output
        let globalHeader = output.context!.pointee.oformat.pointee.flags & AVFMT_GLOBALHEADER != 0
        let channelCount = self.channels
        encoder = try StreamEncoder(codec: aac, options: options) { context in
            context.pointee.sample_rate = rate
            context.pointee.sample_fmt = AV_SAMPLE_FMT_FLTP
            av_channel_layout_default(&context.pointee.ch_layout, channelCount)
            context.pointee.bit_rate = 128_000
            context.pointee.time_base = AVRational(num: 1, den: rate)
            if globalHeader { context.pointee.flags |= AV_CODEC_FLAG_GLOBAL_HEADER }
        }
        stream = try output.addStream()
        try avCheck(avcodec_parameters_from_context(stream.pointee.codecpar, encoder.context), "cannot describe the audio stream")
        stream.pointee.time_base = AVRational(num: 1, den: rate)
        fifo = av_audio_fifo_alloc(AV_SAMPLE_FMT_FLTP, self.channels, 4096)
    }

    deinit {
        swr_free(&resampler)
        av_audio_fifo_free(fifo)
    }

    /// Adds decoded audio (any format, rate or layout).
    public func add(_ frame: UnsafeMutablePointer<AVFrame>) throws {
        let f = frame.pointee
        if resampler == nil || resamplerKey != (f.sample_rate, f.ch_layout.nb_channels, f.format) {
            swr_free(&resampler)
            var input = f.ch_layout
            if input.order == AV_CHANNEL_ORDER_UNSPEC {
                var fallback = AVChannelLayout()
                av_channel_layout_default(&fallback, f.ch_layout.nb_channels)
                input = fallback
            }
            var outputLayout = AVChannelLayout()
            av_channel_layout_default(&outputLayout, channels)
            let rv = swr_alloc_set_opts2(&resampler, &outputLayout, AV_SAMPLE_FMT_FLTP, rate, &input, AVSampleFormat(rawValue: f.format), f.sample_rate, 0, nil)
            guard rv >= 0, swr_init(resampler) >= 0 else { throw ServiceError(.invalidAudio, "cannot convert the audio", cause: avErrorText(rv)) }
            resamplerKey = (f.sample_rate, f.ch_layout.nb_channels, f.format)
        }
        try convert(frame)
        try drain(final: false)
    }

    private func convert(_ frame: UnsafeMutablePointer<AVFrame>?) throws {
        let inputCount = frame?.pointee.nb_samples ?? 0
        let capacity = swr_get_out_samples(resampler, inputCount) + 64
        guard capacity > 0 else { return }
        let converted = try encoderFrame(samples: capacity)
        let produced: Int32 = converted.pointer!.pointee.extended_data.withMemoryRebound(to: UnsafeMutablePointer<UInt8>?.self, capacity: 8) { out in
            if let frame {
                return frame.pointee.extended_data.withMemoryRebound(to: UnsafePointer<UInt8>?.self, capacity: 8) { source in
                    swr_convert(resampler, out, capacity, source, inputCount)
                }
            }
            return swr_convert(resampler, out, capacity, nil, 0)
        }
        if produced > 0 {
            _ = converted.pointer!.pointee.extended_data.withMemoryRebound(to: UnsafeMutableRawPointer?.self, capacity: 8) { data in
                av_audio_fifo_write(fifo, data, produced)
            }
        }
    }

    /// A frame in the encoder's format (planar float, our rate and layout) with room for `samples`.
    private func encoderFrame(samples: Int32) throws -> Frame {
        let frame = Frame()
        frame.pointer!.pointee.nb_samples = samples
        frame.pointer!.pointee.format = AV_SAMPLE_FMT_FLTP.rawValue
        av_channel_layout_default(&frame.pointer!.pointee.ch_layout, channels)
        frame.pointer!.pointee.sample_rate = rate
        guard av_frame_get_buffer(frame.pointer, 0) >= 0 else { throw ServiceError(.internalError, "cannot allocate audio") }
        return frame
    }

    private func drain(final: Bool) throws {
        let frameSize = max(encoder.context!.pointee.frame_size, 1024)
        while av_audio_fifo_size(fifo) >= frameSize || (final && av_audio_fifo_size(fifo) > 0) {
            let count = min(frameSize, av_audio_fifo_size(fifo))
            let frame = try encoderFrame(samples: count)
            _ = frame.pointer!.pointee.extended_data.withMemoryRebound(to: UnsafeMutableRawPointer?.self, capacity: 8) { data in
                av_audio_fifo_read(fifo, data, count)
            }
            frame.pointer!.pointee.pts = samplesWritten
            samplesWritten += Int64(count)
            try encoder.encode(frame.pointer, write)
        }
    }

    private func write(_ packet: UnsafeMutablePointer<AVPacket>) throws {
        av_packet_rescale_ts(packet, encoder.context!.pointee.time_base, stream.pointee.time_base)
        packet.pointee.stream_index = stream.pointee.index
        try output.write(packet)
    }

    /// Encodes what is buffered (a short last frame included) and flushes the encoder.
    public func finish() throws {
        if resampler != nil { try convert(nil) }
        try drain(final: true)
        try encoder.encode(nil, write)
    }
}

