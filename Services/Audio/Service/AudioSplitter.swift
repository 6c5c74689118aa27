import TalkMeshCore
import TalkMeshMessages

/// SplitAudio and ProbeAudio: validation, decoding, silence detection, cut planning and writing
/// the chunks, on a blocking work pool.
public struct AudioSplitter: Sendable {
    public struct Configuration: Sendable {
        /// Longest audio accepted, in seconds (MAX_AUDIO_SEC).
        public var maxAudioSeconds: Double = 1800
        /// RunPod's /run body limit; a chunk's base64 must fit under it.
        public var maxChunkBase64Bytes = 10_000_000
        public init() {}
    }

    public let store: any BlobStore
    public let configuration: Configuration

    public init(store: any BlobStore, configuration: Configuration = Configuration()) {
        self.store = store
        self.configuration = configuration
    }

    /// Validated parameters, defaults applied.
    struct Options {
        var audioKey: BlobKey
        var planner: ChunkPlanner.Parameters
        var minSilenceMs: Int
        var thresholdDB: Double
        var sampleRate: Int
        var channels: Int
        var prefix: String
        var keepFull: Bool
    }

    func validate(_ request: SplitAudioRequest) throws(ServiceError) -> Options {
        func invalid(_ field: String, _ rule: String) -> ServiceError {
            ServiceError(.invalidArgument, "\(field): \(rule)")
        }
        guard !request.audioKey.isEmpty else { throw invalid("audio_key", "required") }
        let key = try BlobKey(request.audioKey)
        let target = request.targetSec == 0 ? 45 : request.targetSec
        guard target.isFinite, target >= 5, target <= 600 else { throw invalid("target_sec", "must be between 5 and 600 (default 45)") }
        let maxSec = request.maxSec == 0 ? max(60, target) : request.maxSec
        guard maxSec.isFinite, maxSec >= target, maxSec <= 900 else { throw invalid("max_sec", "must be at least target_sec and at most 900 (default 60)") }
        let minSilence = request.minSilenceMs == 0 ? 500 : Int(request.minSilenceMs)
        guard (10...10_000).contains(minSilence) else { throw invalid("min_silence_ms", "must be between 10 and 10000 (default 500)") }
        let threshold = request.silenceThreshDb == 0 ? -40 : request.silenceThreshDb
        guard threshold.isFinite, threshold < 0, threshold >= -120 else { throw invalid("silence_thresh_db", "must be below 0 and at least -120 dBFS (default -40)") }
        let fps = request.fps == 0 ? 25 : Int(request.fps)
        guard (1...120).contains(fps) else { throw invalid("fps", "must be between 1 and 120 (default 25)") }
        let rate = request.sampleRate == 0 ? 16_000 : Int(request.sampleRate)
        guard (8_000...96_000).contains(rate) else { throw invalid("sample_rate", "must be between 8000 and 96000 (default 16000)") }
        let channels = request.channels == 0 ? 1 : Int(request.channels)
        guard (1...2).contains(channels) else { throw invalid("channels", "must be 1 or 2 (default 1)") }
        let sizes = WAVFile.sizes(seconds: maxSec, rate: rate, channels: channels)
        guard sizes.base64 < configuration.maxChunkBase64Bytes else {
            throw ServiceError(.chunkTooLarge, "a \(Int(maxSec)) s chunk at \(rate) Hz × \(channels) would be \(sizes.base64) bytes in base64, over RunPod's \(configuration.maxChunkBase64Bytes); lower max_sec, sample_rate or channels")
        }
        var prefix = request.outputPrefix
        if prefix.isEmpty {
            prefix = key.replacingExtension(with: "chunks") + "/"
        } else if !prefix.hasSuffix("/") {
            prefix += "/"
        }
        _ = try BlobKey(prefix + "chunk-000.wav")
        return Options(audioKey: key, planner: ChunkPlanner.Parameters(targetSec: target, maxSec: maxSec, fps: fps),
                       minSilenceMs: minSilence, thresholdDB: threshold, sampleRate: rate, channels: channels, prefix: prefix,
                       keepFull: request.keepFull)
    }

    /// Runs a whole split (blocking: call it on the work pool).
    public func split(_ request: SplitAudioRequest, flag: CancellationFlag) throws -> SplitAudioResponse {
        let options = try validate(request)
        let audio = try store.withLocalFile(options.audioKey) { path in
            try AudioDecoding.decode(path: path, flag: flag, outputRate: options.sampleRate, outputChannels: options.channels,
                                     maxSeconds: configuration.maxAudioSeconds)
        }
        try flag.check()
        let silences = SilenceDetector.detect(audio.profile, minSilenceMs: options.minSilenceMs, thresholdDB: options.thresholdDB)
        let planner = ChunkPlanner(parameters: options.planner)
        let duration = Double(audio.converted.count / options.channels) / Double(options.sampleRate)
        let cuts = planner.cuts(durationSec: duration, silences: silences) { audio.profile.quietest20ms(fromMs: $0, toMs: $1) }
        let chunks = planner.chunks(durationSec: duration, cuts: cuts)

        var response = SplitAudioResponse()
        response.durationSec = duration
        response.sampleRate = Int32(options.sampleRate)
        response.channels = Int32(options.channels)
        response.silences = silences.map { silence in
            var range = SilenceRange()
            range.startSec = Double(silence.startMs) / 1000
            range.endSec = Double(silence.endMs) / 1000
            return range
        }
        let totalFrames = audio.converted.count / options.channels
        let fps = options.planner.fps
        // Sample boundaries from the frame grid, so the chunks tile the converted audio exactly.
        let boundaries = chunks.map { Int((Double($0.startFrame) * Double(options.sampleRate) / Double(fps)).rounded()) } + [totalFrames]
        for (index, chunk) in chunks.enumerated() {
            try flag.check()
            let from = boundaries[index] * options.channels
            let to = boundaries[index + 1] * options.channels
            let bytes = WAVFile.encode(audio.converted[from..<to], rate: options.sampleRate, channels: options.channels)
            let key = try BlobKey(options.prefix + "chunk-" + Self.threeDigits(index) + ".wav")
            try store.put(key, bytes)
            var item = AudioChunk()
            item.key = key.rawValue
            item.index = Int32(index)
            item.startSec = chunk.startSec
            item.durationSec = Double(boundaries[index + 1] - boundaries[index]) / Double(options.sampleRate)
            item.sizeBytes = Int64(bytes.count)
            response.chunks.append(item)
        }
        if options.keepFull {
            let key = try BlobKey(options.prefix + "full.wav")
            try store.put(key, WAVFile.encode(audio.converted[...], rate: options.sampleRate, channels: options.channels))
            response.fullAudioKey = key.rawValue
        }
        return response
    }

    /// ProbeAudio (blocking).
    public func probe(_ request: ProbeAudioRequest, flag: CancellationFlag) throws -> ProbeAudioResponse {
        guard !request.audioKey.isEmpty else { throw ServiceError(.invalidArgument, "audio_key: required") }
        let key = try BlobKey(request.audioKey)
        let probe = try store.withLocalFile(key) { try AudioDecoding.probe(path: $0, flag: flag) }
        var response = ProbeAudioResponse()
        response.durationSec = probe.durationSec
        response.sampleRate = Int32(probe.sampleRate)
        response.channels = Int32(probe.channels)
        response.codec = probe.codec
        response.container = probe.container
        return response
    }

    static func threeDigits(_ value: Int) -> String {
        value < 10 ? "00\(value)" : value < 100 ? "0\(value)" : "\(value)"
    }
}
