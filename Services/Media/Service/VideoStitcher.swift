import CTalkMesh
import Glibc
import TalkMeshCore
import TalkMeshLibAV
import TalkMeshMessages

/// StitchVideos: concatenates MP4 parts. Stream copy when every part matches (codec, size, pixel
/// format, time base, sample rate, channel layout, extradata), with per-stream offsets so DTS stay
/// monotonic and gap-free; otherwise re-encodes to H.264 + AAC at the first part's geometry. With
/// `audio_key`, the original audio (encoded once to AAC) replaces the parts' audio. `+faststart`.
public struct VideoStitcher: Sendable {
    public let store: any BlobStore

    public init(store: any BlobStore) {
        self.store = store
    }

    public func stitch(_ request: StitchVideosRequest, flag: CancellationFlag) throws -> StitchVideosResponse {
        guard !request.videoKeys.isEmpty else { throw ServiceError(.invalidArgument, "video_keys: at least one part is required") }
        guard request.videoKeys.count <= 500 else { throw ServiceError(.invalidArgument, "video_keys: at most 500 parts") }
        let keys = try request.videoKeys.map { try BlobKey($0) }
        let audioKey = request.audioKey.isEmpty ? nil : try BlobKey(request.audioKey)
        let outputText = request.outputKey.isEmpty ? keys[0].replacingExtension(with: "stitched.mp4") : request.outputKey
        let outputKey = try BlobKey(outputText)

        // Every part (and the audio) as a local file for as long as the stitching runs: the
        // file store lends its own paths, S3 downloads copies removed afterwards.
        let (duration, copy, size) = try store.withLocalFiles(keys + (audioKey.map { [$0] } ?? [])) { local in
            let paths = Array(local.prefix(keys.count))
            let audioPath = audioKey == nil ? nil : local.last
            let parts = try paths.map { try MediaInput(path: $0, flag: flag, invalid: .invalidVideo) }
            for (index, part) in parts.enumerated() {
                guard part.streams.contains(where: { $0.pointee.codecpar.pointee.codec_type == AVMEDIA_TYPE_VIDEO }) else {
                    throw ServiceError(.invalidVideo, "part \(index) (\(keys[index])) has no video stream")
                }
            }
            let copy = !request.forceReencode && Self.partsMatch(parts, includeAudio: audioPath == nil)
            let scratch = try store.scratchPath(suffix: ".mp4")
            defer { unlink(scratch) }  // gone after a store; a failure leaves nothing behind
            let output = try MediaOutput(path: scratch, format: "mp4", flag: flag)
            let duration = copy ? try copyParts(parts, audioPath: audioPath, output: output, flag: flag)
                                : try reencodeParts(parts, audioPath: audioPath, output: output, flag: flag)
            try output.finish()
            var info = stat()
            stat(scratch, &info)
            try store.store(outputKey, fromFile: scratch)
            return (duration, copy, Int64(info.st_size))
        }
        var response = StitchVideosResponse()
        response.videoKey = outputKey.rawValue
        response.durationSec = duration
        response.mode = copy ? "copy" : "reencode"
        response.sizeBytes = size
        return response
    }

    /// Whether stream copy is safe: the same streams with the same codec parameters in every part.
    static func partsMatch(_ parts: [MediaInput], includeAudio: Bool) -> Bool {
        func relevant(_ part: MediaInput) -> [UnsafeMutablePointer<AVStream>] {
            part.streams.filter { stream in
                let type = stream.pointee.codecpar.pointee.codec_type
                return type == AVMEDIA_TYPE_VIDEO || (includeAudio && type == AVMEDIA_TYPE_AUDIO)
            }
        }
        let first = relevant(parts[0])
        for part in parts.dropFirst() {
            let streams = relevant(part)
            guard streams.count == first.count else { return false }
            for (a, b) in zip(first, streams) {
                let p = a.pointee.codecpar.pointee, q = b.pointee.codecpar.pointee
                guard p.codec_type == q.codec_type, p.codec_id == q.codec_id, p.width == q.width, p.height == q.height,
                      p.format == q.format, p.sample_rate == q.sample_rate,
                      a.pointee.time_base.num == b.pointee.time_base.num, a.pointee.time_base.den == b.pointee.time_base.den,
                      p.extradata_size == q.extradata_size else { return false }
                var layoutA = p.ch_layout, layoutB = q.ch_layout
                guard av_channel_layout_compare(&layoutA, &layoutB) == 0 else { return false }
                if p.extradata_size > 0 && memcmp(p.extradata, q.extradata, Int(p.extradata_size)) != 0 { return false }
            }
        }
        return true
    }

    // MARK: Copy

    private func copyParts(_ parts: [MediaInput], audioPath: String?, output: MediaOutput, flag: CancellationFlag) throws -> Double {
        let first = parts[0]
        var mapping: [Int: Int32] = [:]  // input stream index → output stream index
        var outputStreams: [UnsafeMutablePointer<AVStream>] = []
        for (index, stream) in first.streams.enumerated() {
            let type = stream.pointee.codecpar.pointee.codec_type
            guard type == AVMEDIA_TYPE_VIDEO || (audioPath == nil && type == AVMEDIA_TYPE_AUDIO) else { continue }
            let out = try output.addStream(copying: stream)
            mapping[index] = Int32(outputStreams.count)
            outputStreams.append(out)
        }
        let audio = try audioPath.map { try AudioTrack(path: $0, output: output, flag: flag) }
        try output.start(options: ["movflags": "+faststart"])

        var ends = [Int64](repeating: 0, count: outputStreams.count)       // next DTS per output stream
        var presentationEnd = [Int64](repeating: 0, count: outputStreams.count)
        for (partIndex, part) in parts.enumerated() {
            var shift = [Int64?](repeating: nil, count: outputStreams.count)
            var partEnds = ends
            try part.readPackets(invalid: .invalidVideo, what: "part \(partIndex)") { p in
                guard let outIndex = mapping[Int(p.pointee.stream_index)] else { return true }
                let s = Int(outIndex)
                let noValue = Int64(bitPattern: 0x8000_0000_0000_0000)
                if p.pointee.dts == noValue { p.pointee.dts = p.pointee.pts }
                if shift[s] == nil {
                    // This part starts where the previous one ended, whatever its own first DTS.
                    shift[s] = partIndex == 0 ? 0 : ends[s] - p.pointee.dts
                }
                if p.pointee.pts != noValue { p.pointee.pts += shift[s]! }
                if p.pointee.dts != noValue { p.pointee.dts += shift[s]! }
                let duration = max(p.pointee.duration, 1)
                partEnds[s] = max(partEnds[s], p.pointee.dts + duration)
                if p.pointee.pts != noValue { presentationEnd[s] = max(presentationEnd[s], p.pointee.pts + duration) }
                let inBase = parts[0].streams[Int(p.pointee.stream_index)].pointee.time_base
                av_packet_rescale_ts(p, inBase, outputStreams[s].pointee.time_base)
                p.pointee.stream_index = outIndex
                p.pointee.pos = -1
                try output.write(p)
                return true
            }
            ends = partEnds
        }
        try audio?.encodeAll(flag: flag)
        let videoIndex = outputStreams.firstIndex { $0.pointee.codecpar.pointee.codec_type == AVMEDIA_TYPE_VIDEO } ?? 0
        let base = first.streams[mapping.first { $0.value == Int32(videoIndex) }!.key].pointee.time_base
        return Double(presentationEnd[videoIndex]) * Double(base.num) / Double(base.den)
    }

    // MARK: Re-encode

    /// Re-encodes the parts (already opened and probed by `stitch`, not yet read).
    private func reencodeParts(_ parts: [MediaInput], audioPath: String?, output: MediaOutput, flag: CancellationFlag) throws -> Double {
        let probe = parts[0]
        let firstDecoder = try StreamDecoder(input: probe, mediaType: AVMEDIA_TYPE_VIDEO, invalid: .invalidVideo, what: "video")
        let width = (firstDecoder.context!.pointee.width / 2) * 2
        let height = (firstDecoder.context!.pointee.height / 2) * 2
        var rate = probe.streams[Int(firstDecoder.streamIndex)].pointee.avg_frame_rate
        if rate.num <= 0 || rate.den <= 0 { rate = AVRational(num: 25, den: 1) }
        guard let h264 = avcodec_find_encoder_by_name("libx264") ?? avcodec_find_encoder(AV_CODEC_ID_H264) else {
            throw ServiceError(.internalError, "no H.264 encoder")
        }
        let globalHeader = output.context!.pointee.oformat.pointee.flags & AVFMT_GLOBALHEADER != 0
        let video = try StreamEncoder(codec: h264, options: ["preset": "veryfast", "crf": "20"]) { context in
            context.pointee.width = width
            context.pointee.height = height
            context.pointee.pix_fmt = AV_PIX_FMT_YUV420P
            context.pointee.time_base = AVRational(num: rate.den, den: rate.num)
            context.pointee.framerate = rate
            context.pointee.gop_size = 50
            if globalHeader { context.pointee.flags |= AV_CODEC_FLAG_GLOBAL_HEADER }
        }
        let videoStream = try output.addStream()
        try avCheck(avcodec_parameters_from_context(videoStream.pointee.codecpar, video.context), "cannot describe the video stream")
        videoStream.pointee.time_base = video.context!.pointee.time_base

        // The parts' own audio, unless the original audio replaces it.
        var partsAudio: AudioEncoderPipeline?
        var track: AudioTrack?
        if let audioPath {
            track = try AudioTrack(path: audioPath, output: output, flag: flag)
        } else if let audioDecoder = try? StreamDecoder(input: probe, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidVideo, what: "audio") {
            let context = audioDecoder.context!.pointee
            partsAudio = try AudioEncoderPipeline(rate: context.sample_rate, channels: min(2, context.ch_layout.nb_channels), output: output)
        }
        try output.start(options: ["movflags": "+faststart"])

        var frameIndex: Int64 = 0
        let frame = try makeVideoFrame(width: width, height: height, format: AV_PIX_FMT_YUV420P)
        func writeVideo(_ packet: UnsafeMutablePointer<AVPacket>) throws {
            av_packet_rescale_ts(packet, video.context!.pointee.time_base, videoStream.pointee.time_base)
            packet.pointee.stream_index = videoStream.pointee.index
            try output.write(packet)
        }
        for (index, input) in parts.enumerated() {
            let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_VIDEO, invalid: .invalidVideo, what: "video")
            var scaler: Scaler?
            var scalerKey: (Int32, Int32, Int32) = (0, 0, -1)
            var decoders = [decoder]
            if partsAudio != nil, let audio = try? StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidVideo, what: "audio") {
                decoders.append(audio)
            }
            // Video and audio of one part are read in one pass: packets go to their decoder.
            try input.decode(decoders, invalid: .invalidVideo, what: "part \(index)") { stream, decoded in
                if stream == 1 {
                    try partsAudio!.add(decoded)
                    return true
                }
                let d = decoded.pointee
                if scaler == nil || scalerKey != (d.width, d.height, d.format) {
                    scaler = try Scaler(from: (d.width, d.height, AVPixelFormat(rawValue: d.format)), to: (width, height, AV_PIX_FMT_YUV420P),
                                        flags: SWS_BICUBIC)
                    scalerKey = (d.width, d.height, d.format)
                }
                try avCheck(av_frame_make_writable(frame.pointer), "cannot write the video frame")
                let source = decoded.planes
                let target = frame.pointer!.planes
                scaler!.scale(source.data.map { UnsafePointer($0) }, source.strides, height: d.height, target.data, target.strides)
                frame.pointer!.pointee.pts = frameIndex
                frameIndex += 1
                try video.encode(frame.pointer, writeVideo)
                return true
            }
        }
        try video.encode(nil, writeVideo)
        try partsAudio?.finish()
        try track?.encodeAll(flag: flag)
        return Double(frameIndex) * Double(rate.den) / Double(rate.num)
    }
}

/// The original full audio as the output's audio track: its packets copied when it is AAC already
/// (an `EncodeAudio` result: the stitch then only muxes), else decoded and encoded once to AAC.
final class AudioTrack {
    private enum Source {
        case copy(from: UnsafeMutablePointer<AVStream>, to: UnsafeMutablePointer<AVStream>)
        case encode(AudioEncoding)
    }

    let input: MediaInput
    private let source: Source
    private let output: MediaOutput

    init(path: String, output: MediaOutput, flag: CancellationFlag) throws {
        self.output = output
        input = try MediaInput(path: path, flag: flag, invalid: .invalidAudio)
        let aac = input.streams.first { $0.pointee.codecpar.pointee.codec_type == AVMEDIA_TYPE_AUDIO && $0.pointee.codecpar.pointee.codec_id == AV_CODEC_ID_AAC }
        if let aac {
            source = .copy(from: aac, to: try output.addStream(copying: aac))
        } else {
            source = .encode(try AudioEncoding(input: input, output: output))
        }
    }

    func encodeAll(flag: CancellationFlag) throws {
        switch source {
        case .encode(let encoding):
            try encoding.encodeAll(from: input, flag: flag)
        case .copy(let from, let to):
            // Timestamps as stored, the encoder's priming included (negative at the start): the
            // MP4 muxer writes the edit list that hides it, as in the source.
            try input.readPackets(invalid: .invalidAudio, what: "the audio") { packet in
                guard packet.pointee.stream_index == from.pointee.index else { return true }
                av_packet_rescale_ts(packet, from.pointee.time_base, to.pointee.time_base)
                packet.pointee.stream_index = to.pointee.index
                packet.pointee.pos = -1
                try output.write(packet)
                return true
            }
        }
    }
}

/// Decodes an input's audio and encodes it to AAC into an output stream.
final class AudioEncoding {
    let decoder: StreamDecoder
    let pipeline: AudioEncoderPipeline
    private(set) var samples: Int64 = 0

    init(input: MediaInput, output: MediaOutput) throws {
        decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidAudio, what: "audio")
        let context = decoder.context!.pointee
        // The "fast" AAC coder: for speech at 128 kbit/s it is audibly the same as the default
        // two-loop search and ~6× faster — and this encode is on every job's critical path (600 s
        // of speech: ~2.5 s instead of ~15 s with the ffmpeg CLI's default on this machine).
        pipeline = try AudioEncoderPipeline(rate: context.sample_rate, channels: min(2, context.ch_layout.nb_channels), output: output,
                                            options: ["aac_coder": "fast"])
    }

    var rate: Int32 { decoder.context!.pointee.sample_rate }

    func encodeAll(from input: MediaInput, flag: CancellationFlag) throws {
        try decoder.decodeAll(from: input, flag: flag, invalid: .invalidAudio) { frame in
            samples += Int64(frame.pointee.nb_samples)
            try pipeline.add(frame)
            return true
        }
        try pipeline.finish()
    }
}

/// EncodeAudio: any audio the service decodes → AAC in an M4A (the fast coder, 128 kbit/s), for
/// StitchVideos to copy. The Dispatcher has it made while the chunks render, so the stitch after
/// the last chunk only muxes.
public struct AudioEncoder: Sendable {
    public let store: any BlobStore

    public init(store: any BlobStore) {
        self.store = store
    }

    public func encode(_ request: EncodeAudioRequest, flag: CancellationFlag) throws -> EncodeAudioResponse {
        guard !request.audioKey.isEmpty else { throw ServiceError(.invalidArgument, "audio_key: required") }
        let key = try BlobKey(request.audioKey)
        let outputKey = try BlobKey(request.outputKey.isEmpty ? key.replacingExtension(with: "m4a") : request.outputKey)
        let (samples, rate, size) = try store.withLocalFile(key) { path in
            let input = try MediaInput(path: path, flag: flag, invalid: .invalidAudio)
            let scratch = try store.scratchPath(suffix: ".m4a")
            defer { unlink(scratch) }
            let output = try MediaOutput(path: scratch, format: "ipod", flag: flag)
            let encoding = try AudioEncoding(input: input, output: output)
            try output.start()
            try encoding.encodeAll(from: input, flag: flag)
            try output.finish()
            guard encoding.samples > 0 else { throw ServiceError(.invalidAudio, "the audio has no samples") }
            var info = stat()
            stat(scratch, &info)
            try store.store(outputKey, fromFile: scratch)
            return (encoding.samples, encoding.rate, Int64(info.st_size))
        }
        var response = EncodeAudioResponse()
        response.audioKey = outputKey.rawValue
        response.durationSec = Double(samples) / Double(rate)
        response.sizeBytes = size
        return response
    }
}
