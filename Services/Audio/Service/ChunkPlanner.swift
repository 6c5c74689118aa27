/// Plans where long audio is cut into RunPod-sized chunks.
///
/// From the last cut the ideal next one is `last + target`. It goes at the middle of the silence
/// nearest to that within ±target/3 (the part of the silence inside that window), else at the
/// quietest 20 ms there; never later than `last + max`. Every cut is snapped to the video frame
/// grid (1/fps s). A final piece shorter than target/3 merges into its predecessor when the result
/// stays within `max`. The chunks cover the timeline exactly.
public struct ChunkPlanner: Sendable {
    public struct Parameters: Sendable, Hashable {
        public var targetSec: Double = 45
        public var maxSec: Double = 60
        public var fps: Int = 25
        public init(targetSec: Double = 45, maxSec: Double = 60, fps: Int = 25) {
            self.targetSec = targetSec
            self.maxSec = maxSec
            self.fps = fps
        }
    }

    /// One planned chunk, in video frames (the grid) and seconds.
    public struct Chunk: Hashable, Sendable {
        public var startFrame: Int
        /// The end; the last chunk ends at the audio's end, which may fall between frames.
        public var endSec: Double
        public var startSec: Double
    }

    public let parameters: Parameters

    public init(parameters: Parameters) {
        self.parameters = parameters
    }

    /// Finds the quietest 20 ms in a window: the middle of it, in ms.
    public typealias QuietestPoint = (_ fromMs: Int, _ toMs: Int) -> Int

    /// The cuts (frame indices on the grid, strictly increasing, never 0) for audio of
    /// `durationSec` with these silences.
    public func cuts(durationSec: Double, silences: [Silence], quietest: QuietestPoint) -> [Int] {
        let fps = Double(parameters.fps)
        let target = parameters.targetSec
        let maxLength = parameters.maxSec
        guard durationSec > target else { return [] }
        var cuts: [Int] = []
        var lastFrame = 0
        while durationSec - Double(lastFrame) / fps > target {
            let last = Double(lastFrame) / fps
            let ideal = last + target
            let low = max(ideal - target / 3, last + 1 / fps)
            let high = min(ideal + target / 3, last + maxLength, durationSec)
            var best: Double?
            for silence in silences {
                let start = max(Double(silence.startMs) / 1000, low)
                let end = min(Double(silence.endMs) / 1000, high)
                guard end >= start else { continue }
                let point = (start + end) / 2
                if best == nil || abs(point - ideal) < abs(best! - ideal) { best = point }
            }
            let cut = best ?? Double(quietest(Int((low * 1000).rounded(.up)), Int((high * 1000).rounded(.down)))) / 1000
            var frame = Int((cut * fps).rounded())
            let latest = lastFrame + Int((maxLength * fps).rounded(.down))
            frame = min(max(frame, lastFrame + 1), latest)
            if Double(frame) / fps >= durationSec { break }
            cuts.append(frame)
            lastFrame = frame
        }
        if let final = cuts.last, durationSec - Double(final) / fps < target / 3 {
            let previous = cuts.count >= 2 ? Double(cuts[cuts.count - 2]) / fps : 0
            if durationSec - previous <= maxLength { cuts.removeLast() }
        }
        return cuts
    }

    /// The chunks the cuts make.
    public func chunks(durationSec: Double, cuts: [Int]) -> [Chunk] {
        let fps = Double(parameters.fps)
        let starts = [0] + cuts
        return starts.enumerated().map { index, frame in
            let end = index + 1 < starts.count ? Double(starts[index + 1]) / fps : durationSec
            return Chunk(startFrame: frame, endSec: end, startSec: Double(frame) / fps)
        }
    }
}

extension EnergyProfile {
    /// The middle (ms) of the quietest 20 ms window starting in `[fromMs, toMs - 20]`.
    public func quietest20ms(fromMs: Int, toMs: Int) -> Int {
        let width = 20
        let lastStart = max(fromMs, toMs - width)
        var bestStart = fromMs
        var bestEnergy = Int64.max
        for start in fromMs...lastStart {
            let value = energy(fromMs: start, toMs: start + width)
            if value < bestEnergy {
                bestEnergy = value
                bestStart = start
            }
        }
        return bestStart + width / 2
    }
}
