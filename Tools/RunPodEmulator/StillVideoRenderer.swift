import CTalkMesh
import Foundation
import Glibc
import TalkMeshBase
import TalkMeshCore
import TalkMeshLibAV

/// Renders what an InfiniteTalk worker returns, cheaply: an H.264/AAC MP4 of a still image at
/// width×height, 25 fps, carrying the chunk's audio and exactly its duration. The still is encoded
/// once per (image, size) — every frame is the same picture, so a clip of N frames is the first N
/// packets of one encoding (no B-frames) — and only the audio is encoded per job.
final class StillVideoRenderer: @unchecked Sendable {
    /// Codec parameters with one owner: freed when the last cached encoding holding them goes.
    private final class CodecParameters: @unchecked Sendable {  // never changed after encodeStill
        let pointer: UnsafeMutablePointer<AVCodecParameters>
        init() throws {
            guard let pointer = avcodec_parameters_alloc() else { throw ServiceError(.internalError, "cannot allocate codec parameters") }
            self.pointer = pointer
        }
        deinit { var owned: UnsafeMutablePointer<AVCodecParameters>? = pointer; avcodec_parameters_free(&owned) }
    }

    private struct EncodedStill {
        var parameters: CodecParameters
        var packets: [[UInt8]]
        var keyframes: [Bool]
    }

    private let lock = PThreadMutex()
    private var cache: [String: EncodedStill] = [:]
    private let scratch: String
    /// Renders in flight (under `lock`), and whether the renderer was closed.
    private var rendering = 0
    private var closed = false
    static let fps: Int32 = 25

    init(scratch: String) {
        self.scratch = scratch
    }

    /// Takes no more renders, waits up to `seconds` for those in flight (each removes its files
    /// when it ends), then removes the scratch directory: nothing is written into it after.
    func close(waitingUpTo seconds: Double) async {
        lock.withLock { closed = true }
        let deadline = MonotonicClock.nanoseconds() + Int64(seconds * 1e9)
        while lock.withLock({ rendering > 0 }) && MonotonicClock.nanoseconds() < deadline {
            try? await Task.sleep(nanoseconds: 10_000_000)
        }
        try? FileManager.default.removeItem(atPath: scratch)
    }

    /// Renders and returns the MP4's bytes.
    func render(image: [UInt8], wav: [UInt8], width: Int32, height: Int32, flag: CancellationFlag) throws -> [UInt8] {
        let admitted = lock.withLock {
            if !closed { rendering += 1 }
            return !closed
        }
        guard admitted else { throw ServiceError(.serviceUnavailable, "the emulator is stopping") }
        defer { lock.withLock { rendering -= 1 } }
        let id = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let imagePath = "\(scratch)/\(id).image", wavPath = "\(scratch)/\(id).wav", outputPath = "\(scratch)/\(id).mp4"
        defer { unlink(imagePath); unlink(wavPath); unlink(outputPath) }
        try FileBlobStore.writeAll(imagePath, image)
        try FileBlobStore.writeAll(wavPath, wav)

        // The audio decides the length.
        let audioInput = try MediaInput(path: wavPath, flag: flag, invalid: .invalidAudio)
        let audioDecoder = try StreamDecoder(input: audioInput, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidAudio, what: "audio")
        let rate = audioDecoder.context!.pointee.sample_rate
        let output = try MediaOutput(path: outputPath, format: "mp4", flag: flag)
        let videoStream = try output.addStream()
        // The fast AAC coder: a stand-in for a GPU worker needs speed more than the last bit of quality.
        let pipeline = try AudioEncoderPipeline(rate: rate, channels: min(2, audioDecoder.context!.pointee.ch_layout.nb_channels), output: output,
                                                options: ["aac_coder": "fast"])
        var samples = 0
        var frames: [Frame] = []  // each owns its reference to the decoded samples
        try audioDecoder.decodeAll(from: audioInput, flag: flag, invalid: .invalidAudio) { frame in
            samples += Int(frame.pointee.nb_samples)
            let copy = Frame()
            try avCheck(av_frame_ref(copy.pointer, frame), "cannot keep a decoded audio frame")
            frames.append(copy)
            return true
        }
        guard samples > 0 else { throw ServiceError(.emptyAudio, "wav_base64 holds no audio") }
        let videoFrames = max(1, Int((Double(samples) / Double(rate) * Double(Self.fps)).rounded()))
        let still = try encodedStill(image: image, path: imagePath, width: width, height: height, frames: videoFrames, flag: flag)
        try avCheck(avcodec_parameters_copy(videoStream.pointee.codecpar, still.parameters.pointer), "cannot copy the still's parameters")
        videoStream.pointee.time_base = AVRational(num: 1, den: Self.fps)
        try output.start()
        let packet = Packet()
        for index in 0..<videoFrames {
            let bytes = still.packets[index]
            try avCheck(av_new_packet(packet.pointer, Int32(bytes.count)), "cannot allocate a packet")
            bytes.withUnsafeBufferPointer { packet.pointer!.pointee.data.update(from: $0.baseAddress!, count: bytes.count) }
            packet.pointer!.pointee.pts = Int64(index)
            packet.pointer!.pointee.dts = Int64(index)
            packet.pointer!.pointee.duration = 1
            if still.keyframes[index] { packet.pointer!.pointee.flags |= AV_PKT_FLAG_KEY }
            packet.pointer!.pointee.stream_index = videoStream.pointee.index
            av_packet_rescale_ts(packet.pointer, AVRational(num: 1, den: Self.fps), videoStream.pointee.time_base)
            try output.write(packet.pointer!)
        }
        for frame in frames { try pipeline.add(frame.pointer!) }
        try pipeline.finish()
        try output.finish()
        return try FileBlobStore.readAll(outputPath)
    }

    /// The still's encoding with at least `frames` packets (cached; re-encoded longer on demand).
    private func encodedStill(image: [UInt8], path: String, width: Int32, height: Int32, frames: Int, flag: CancellationFlag) throws -> EncodedStill {
        var hasher = Hasher()
        hasher.combine(image)
        let key = "\(hasher.finalize())-\(width)x\(height)"
        if let cached = lock.withLock({ cache[key] }), cached.packets.count >= frames { return cached }
        let count = max(frames, 25 * 60)
        let encoded = try encodeStill(path: path, width: width, height: height, frames: count, flag: flag)
        lock.withLock { cache[key] = encoded }
        return encoded
    }

    private func encodeStill(path: String, width: Int32, height: Int32, frames: Int, flag: CancellationFlag) throws -> EncodedStill {
        let input = try MediaInput(path: path, flag: flag, invalid: .invalidImage)
        let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_VIDEO, invalid: .invalidImage, what: "image")
        let picture = try makeVideoFrame(width: width, height: height, format: AV_PIX_FMT_YUV420P)
        var decoded = false
        try decoder.decodeAll(from: input, flag: flag, invalid: .invalidImage) { frame in
            let scaler = try Scaler(from: (frame.pointee.width, frame.pointee.height, AVPixelFormat(rawValue: frame.pointee.format)),
                                    to: (width, height, AV_PIX_FMT_YUV420P), flags: SWS_BICUBIC)
            let source = frame.planes, target = picture.pointer!.planes
            scaler.scale(source.data.map { UnsafePointer($0) }, source.strides, height: frame.pointee.height, target.data, target.strides)
            decoded = true
            return false
        }
        guard decoded else { throw ServiceError(.invalidImage, "image_base64 holds no picture") }
        guard let h264 = avcodec_find_encoder_by_name("libx264") else { throw ServiceError(.internalError, "no libx264") }
        let encoder = try StreamEncoder(codec: h264, options: ["preset": "ultrafast", "tune": "stillimage", "x264-params": "bframes=0:keyint=250"]) { context in
            context.pointee.width = width
            context.pointee.height = height
            context.pointee.pix_fmt = AV_PIX_FMT_YUV420P
            context.pointee.time_base = AVRational(num: 1, den: Self.fps)
            context.pointee.framerate = AVRational(num: Self.fps, den: 1)
            context.pointee.flags |= AV_CODEC_FLAG_GLOBAL_HEADER
        }
        var packets: [[UInt8]] = []
        var keyframes: [Bool] = []
        let collect: (UnsafeMutablePointer<AVPacket>) throws -> Void = { packet in
            packets.append(Array(UnsafeBufferPointer(start: packet.pointee.data, count: Int(packet.pointee.size))))
            keyframes.append(packet.pointee.flags & AV_PKT_FLAG_KEY != 0)
        }
        for index in 0..<frames {
            try flag.check()
            try avCheck(av_frame_make_writable(picture.pointer), "cannot write the still frame")
            picture.pointer!.pointee.pts = Int64(index)
            try encoder.encode(picture.pointer, collect)
        }
        try encoder.encode(nil, collect)
        let parameters = try CodecParameters()
        try avCheck(avcodec_parameters_from_context(parameters.pointer, encoder.context), "cannot describe the still's stream")
        return EncodedStill(parameters: parameters, packets: packets, keyframes: keyframes)
    }
}
