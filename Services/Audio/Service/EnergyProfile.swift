/// The signal energy of decoded audio at millisecond boundaries, with pydub's arithmetic: a
/// millisecond `ms` starts at frame `Int(Double(ms) * (Double(rate) / 1000.0))`, the length is
/// `round(1000 * frames / rate)` ms (half to even), and energies are sums of squared 16-bit samples
/// over all channels. Any window's sum is then one subtraction: O(1) per window, O(n) in all.
public struct EnergyProfile: Sendable {
    public let rate: Int
    public let channels: Int
    public let frames: Int
    /// The length in milliseconds, as pydub's `len()` gives it.
    public let lengthMs: Int
    /// `prefix[ms]`: the energy of frames before `frameIndex(ms)` (all of it past the end).
    let prefix: [Int64]

    /// pydub's millisecond → frame conversion (truncating a float product).
    public func frameIndex(_ ms: Int) -> Int {
        Int(Double(ms) * (Double(rate) / 1000.0))
    }

    /// The energy of `[startMs, endMs)`, clamped to the length.
    public func energy(fromMs startMs: Int, toMs endMs: Int) -> Int64 {
        let start = min(max(startMs, 0), lengthMs)
        let end = min(max(endMs, start), lengthMs)
        return prefix[end] - prefix[start]
    }

    /// pydub's `AudioSegment[start:end].rms`: the integer RMS, counting the zero frames pydub pads
    /// a final window with.
    public func rms(fromMs startMs: Int, toMs endMs: Int) -> UInt32 {
        let start = min(startMs, lengthMs)
        let end = min(endMs, lengthMs)
        let samples = (frameIndex(end) - frameIndex(start)) * channels
        guard samples > 0 else { return 0 }
        // audioop.rms: (unsigned int)sqrt(sum_squares / (double)samples), a truncation.
        return UInt32((Double(prefix[end] - prefix[start]) / Double(samples)).squareRoot())
    }
}

/// Builds an `EnergyProfile` while samples stream in (decoding never holds the input twice).
public struct EnergyProfileBuilder {
    public let rate: Int
    public let channels: Int
    private var frames = 0
    private var cumulative: Int64 = 0
    private var prefix: [Int64] = []
    private var nextBoundary = 0
    private var partial: Int64 = 0
    private var partialCount = 0

    public init(rate: Int, channels: Int) {
        self.rate = rate
        self.channels = channels
        prefix.reserveCapacity(1024)
    }

    private func boundary(_ ms: Int) -> Int { Int(Double(ms) * (Double(rate) / 1000.0)) }

    /// Adds interleaved 16-bit samples (a partial frame is kept for the next call).
    public mutating func add(_ samples: UnsafeBufferPointer<Int16>) {
        var index = 0
        // Finish a frame split across calls.
        while partialCount != 0 && index < samples.count {
            addSample(samples[index])
            index += 1
        }
        // Whole frames: sum squares in tight runs between millisecond boundaries.
        let wholeFrames = (samples.count - index) / channels
        var frame = 0
        while frame < wholeFrames {
            while nextBoundary <= frames {
                prefix.append(cumulative)
                nextBoundary = boundary(prefix.count)
            }
            let run = min(wholeFrames - frame, nextBoundary - frames)
            let start = index + frame * channels
            var sum: Int64 = 0
            for position in start..<(start + run * channels) {
                let value = Int64(samples[position])
                sum &+= value &* value
            }
            cumulative += sum
            frames += run
            frame += run
        }
        index += wholeFrames * channels
        while index < samples.count {
            addSample(samples[index])
            index += 1
        }
    }

    private mutating func addSample(_ sample: Int16) {
        partial += Int64(sample) * Int64(sample)
        partialCount += 1
        if partialCount == channels {
            while nextBoundary <= frames {
                prefix.append(cumulative)
                nextBoundary = boundary(prefix.count)
            }
            cumulative += partial
            frames += 1
            partial = 0
            partialCount = 0
        }
    }

    /// The number of whole frames added so far.
    public var frameCount: Int { frames }

    public func finish() -> EnergyProfile {
        var prefix = self.prefix
        let lengthMs = rate > 0 ? Int((1000.0 * (Double(frames) / Double(rate))).rounded(.toNearestOrEven)) : 0
        // Every boundary not yet recorded lies at or past the last frame: it sees all the energy.
        while prefix.count <= lengthMs { prefix.append(cumulative) }
        return EnergyProfile(rate: rate, channels: channels, frames: frames, lengthMs: lengthMs, prefix: prefix)
    }
}
