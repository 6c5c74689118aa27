/// A silent stretch, in milliseconds.
public struct Silence: Hashable, Sendable {
    public var startMs: Int
    public var endMs: Int
    public init(startMs: Int, endMs: Int) {
        self.startMs = startMs
        self.endMs = endMs
    }
    public var middleMs: Double { Double(startMs + endMs) / 2 }
}

/// pydub's `silence.detect_silence(seg, min_silence_len, silence_thresh, seek_step=1)`, exactly,
/// in O(n): a window of `minSilenceMs` slides in 1 ms steps; it is silent when its integer RMS
/// over all samples of all channels is at or below `thresholdDB` dBFS of full scale (32768);
/// silent windows that touch or overlap merge into one range.
public enum SilenceDetector {
    public static func detect(_ profile: EnergyProfile, minSilenceMs: Int, thresholdDB: Double) -> [Silence] {
        let length = profile.lengthMs
        guard minSilenceMs > 0, length >= minSilenceMs else { return [] }
        // db_to_float(thresh) * max_possible_amplitude, as pydub computes it.
        let threshold = Double.pow10(thresholdDB / 20) * 32768.0
        var ranges: [Silence] = []
        var rangeStart = -1
        var previous = -1
        for start in 0...(length - minSilenceMs) {
            guard Double(profile.rms(fromMs: start, toMs: start + minSilenceMs)) <= threshold else { continue }
            if rangeStart < 0 {
                rangeStart = start
            } else if start != previous + 1 && start > previous + minSilenceMs {
                ranges.append(Silence(startMs: rangeStart, endMs: previous + minSilenceMs))
                rangeStart = start
            }
            previous = start
        }
        if rangeStart >= 0 { ranges.append(Silence(startMs: rangeStart, endMs: previous + minSilenceMs)) }
        return ranges
    }
}

extension Double {
    /// 10^x as Python's `10 ** x` computes it (C pow).
    static func pow10(_ exponent: Double) -> Double {
        _pow(10, exponent)
    }
}
