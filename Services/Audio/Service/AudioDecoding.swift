import CTalkMesh
import TalkMeshCore
import TalkMeshLibAV

/// Decoded audio: the energy profile of the original (pydub's view: 16-bit at the input's own
/// rate and channels) and the whole input converted once to the chunks' format.
public struct DecodedAudio: Sendable {
    public var profile: EnergyProfile
    public var converted: [Int16]
    public var outputRate: Int
    public var outputChannels: Int
    public var inputRate: Int
    public var inputChannels: Int
    public var codec: String
    public var container: String
}

/// What ProbeAudio reports.
public struct AudioProbe: Sendable {
    public var durationSec: Double
    public var sampleRate: Int
    public var channels: Int
    public var codec: String
    public var container: String
}

/// The libav side of the Audio service: any format libavformat/libavcodec read, in process.
public enum AudioDecoding {
    /// The widest formats accepted; a header can claim anything (a WAV's rate is 32 bits), and a
    /// resampler set up for an absurd one fails with no useful error.
    static let sampleRates = 1_000...768_000
    static let channelCounts = 1...64

    static func checkFormat(rate: Int, channels: Int) throws(ServiceError) {
        guard sampleRates.contains(rate) else {
            throw ServiceError(.invalidAudio, "the audio's sample rate \(rate) Hz is outside \(sampleRates.lowerBound)–\(sampleRates.upperBound) Hz")
        }
        guard channelCounts.contains(channels) else {
            throw ServiceError(.invalidAudio, "the audio has \(channels) channels; at most \(channelCounts.upperBound) are accepted")
        }
    }

    /// Reads stream parameters and the declared duration without decoding.
    public static func probe(path: String, flag: CancellationFlag) throws -> AudioProbe {
        let input = try MediaInput(path: path, flag: flag, invalid: .invalidAudio)
        let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidAudio, what: "audio")
        let context = decoder.context!.pointee
        try checkFormat(rate: Int(context.sample_rate), channels: Int(context.ch_layout.nb_channels))
        let stream = input.streams[Int(decoder.streamIndex)].pointee
        var duration = input.declaredDuration ?? 0
        if stream.duration > 0 {
            duration = Double(stream.duration) * Double(stream.time_base.num) / Double(stream.time_base.den)
        }
        return AudioProbe(durationSec: duration, sampleRate: Int(context.sample_rate), channels: Int(context.ch_layout.nb_channels),
                          codec: decoder.codecName, container: input.containerName)
    }

    /// Decodes the whole input: builds the energy profile and converts to `outputRate`/`outputChannels`.
    /// Stops early with AUDIO_TOO_LONG past `maxSeconds`; INVALID_AUDIO on undecodable or truncated
    /// input; EMPTY_AUDIO when nothing decodes.
    public static func decode(path: String, flag: CancellationFlag, outputRate: Int, outputChannels: Int, maxSeconds: Double) throws -> DecodedAudio {
        let input = try MediaInput(path: path, flag: flag, invalid: .invalidAudio)
        let decoder = try StreamDecoder(input: input, mediaType: AVMEDIA_TYPE_AUDIO, invalid: .invalidAudio, what: "audio")
        guard let codec = decoder.context else { throw ServiceError(.internalError, "no decoder") }
        let rate = Int(codec.pointee.sample_rate)
        let channels = Int(codec.pointee.ch_layout.nb_channels)
        try checkFormat(rate: rate, channels: channels)
        if let declared = input.declaredDuration, declared > maxSeconds + 1 {
            throw ServiceError(.audioTooLong, "the audio lasts \(Int(declared)) s; the limit is \(Int(maxSeconds)) s")
        }
        let analysis = try Resampler(inputLayout: codec.pointee.ch_layout, inputFormat: codec.pointee.sample_fmt, inputRate: Int32(rate),
                                     outputRate: Int32(rate), outputChannels: Int32(channels))
        var builder = EnergyProfileBuilder(rate: rate, channels: channels)
        let nativeS16 = codec.pointee.sample_fmt == AV_SAMPLE_FMT_S16
        let expectedSeconds: Double = min(input.declaredDuration ?? 0, maxSeconds + 1)
        let reserve = Int(expectedSeconds * Double(outputRate * outputChannels)) + 4096
        let resampling = try ParallelResampler(inputLayout: codec.pointee.ch_layout, inputFormat: codec.pointee.sample_fmt, inputRate: rate,
                                               outputRate: outputRate, outputChannels: outputChannels, reserve: reserve)
        defer { resampling.abandon() }
        var scratch: [Int16] = []
        let lastError = try decoder.decodeAll(from: input, flag: flag, invalid: .invalidAudio, what: "the audio") { frame in
            if nativeS16 {
                // Already interleaved 16-bit: read the samples where libav put them.
                let count = Int(frame.pointee.nb_samples) * channels
                frame.pointee.data.0!.withMemoryRebound(to: Int16.self, capacity: count) {
                    builder.add(UnsafeBufferPointer(start: $0, count: count))
                }
            } else {
                scratch.removeAll(keepingCapacity: true)
                analysis.convert(frame, into: &scratch)
                scratch.withUnsafeBufferPointer { builder.add($0) }
            }
            resampling.push(frame)
            if Double(builder.frameCount) / Double(rate) > maxSeconds {
                throw ServiceError(.audioTooLong, "the audio is longer than the limit of \(Int(maxSeconds)) s")
            }
            return true
        }
        scratch.removeAll(keepingCapacity: true)
        analysis.convert(nil, into: &scratch)
        scratch.withUnsafeBufferPointer { builder.add($0) }
        let converted = resampling.finish()

        let profile = builder.finish()
        guard profile.frames > 0 else {
            throw ServiceError(.emptyAudio, "the audio holds no samples", cause: lastError != 0 ? avErrorText(lastError) : nil)
        }
        let decodedSeconds = Double(profile.frames) / Double(rate)
        // A container that states its length exactly (not estimated from the bitrate) and holds
        // markedly less: the file was cut short.
        if let declared = input.declaredDuration, input.context!.pointee.duration_estimation_method != AVFMT_DURATION_FROM_BITRATE,
           decodedSeconds < declared * 0.98 - 0.1 {
            throw ServiceError(.invalidAudio, "the audio is truncated: \(twoDecimals(decodedSeconds)) s of the \(twoDecimals(declared)) s it declares decode")
        }
        return DecodedAudio(profile: profile, converted: converted, outputRate: outputRate, outputChannels: outputChannels,
                            inputRate: rate, inputChannels: channels, codec: decoder.codecName, container: input.containerName)
    }
}

/// `value` with two decimals (for messages).
func twoDecimals(_ value: Double) -> String {
    let scaled = Int((value * 100).rounded())
    let fraction = abs(scaled) % 100
    return "\(scaled / 100).\(fraction < 10 ? "0" : "")\(fraction)"
}
