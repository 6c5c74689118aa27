import TalkMeshBase
import TalkMeshMessages

/// What RunPod's own timings say about this endpoint: seconds of execution per second of audio
/// and seconds spent queued, as moving averages over finished chunks. Polls are timed by it and
/// ETAs come from it.
public final class Throughput: Sendable {
    public struct Estimate: Sendable, Equatable {
        /// Execution seconds per audio second; nil until a chunk finished.
        public var secondsPerAudioSecond: Double?
        /// Queue delay of a chunk, seconds; nil until a chunk started.
        public var queueDelaySeconds: Double?
    }

    private let state = Locked(Estimate())
    /// Weight of the newest sample.
    let smoothing: Double

    public init(smoothing: Double = 0.3) {
        self.smoothing = smoothing
    }

    public var estimate: Estimate { state.withLock { $0 } }

    /// Adds a finished chunk: its audio length and RunPod's delayTime and executionTime.
    public func record(audioSeconds: Double, queueDelayMs: Int64, executionMs: Int64) {
        guard audioSeconds > 0, queueDelayMs >= 0, executionMs >= 0 else { return }
        let rate = Double(executionMs) / 1000 / audioSeconds
        let delay = Double(queueDelayMs) / 1000
        let weight = smoothing
        state.withLock { estimate in
            estimate.secondsPerAudioSecond = estimate.secondsPerAudioSecond.map { $0 + weight * (rate - $0) } ?? rate
            estimate.queueDelaySeconds = estimate.queueDelaySeconds.map { $0 + weight * (delay - $0) } ?? delay
        }
    }
}

/// When to poll a RunPod job next. Not a fixed ladder: once the job runs, the next poll lands
/// when RunPod's own throughput says it should be done, then follows closely until it is.
public struct PollPlanner: Sendable {
    /// Shortest and longest waits, seconds.
    public var shortest = 0.1
    public var longest = 10.0
    /// Polls after the predicted end: this first, growing by `growth` up to `overdueLongest`.
    public var overdueFirst = 0.1
    public var growth = 1.5
    public var overdueLongest = 1.0
    /// Unknown throughput: this first, growing up to `unknownLongest`; a running chunk waits
    /// `unknownFraction` of the time it has run (within those bounds), so the poll that finds it
    /// done comes at most that fraction of its run late. (A ladder of ×1.5 steps started alike
    /// for every chunk of a job: a fresh Dispatcher's first chunks, which all end together, were
    /// found up to 2 s late.)
    public var unknownFirst = 0.25
    public var unknownLongest = 2.0
    public var unknownFraction = 0.1
    /// A queued chunk is not asked again before it could be done: what is left of this fraction
    /// of the queue delay RunPod's recent chunks saw (counted from its submission), then this
    /// fraction of the run the throughput predicts for it. Both whole: the poll aims at the
    /// predicted end, so a chunk that keeps to it is found COMPLETED by one poll. (At 0.75 and 0.8
    /// most chunks were found IN_PROGRESS first, which cost a poll and a RUNNING write each, and
    /// found them done no sooner: the next poll then aimed at the same predicted end.)
    public var queuedExecutionFraction = 1.0
    public var queuedDelayFraction = 1.0

    public init() {}

    /// The wait before the next poll. `previous` is the last wait (0 at first);
    /// `executionMs` what RunPod reports the job has run so far; `queuedSeconds` how long ago
    /// the chunk was submitted.
    public func next(running: Bool, executionMs: Int64?, audioSeconds: Double, estimate: Throughput.Estimate, previous: Double,
                     queuedSeconds: Double = 0) -> Double {
        guard running, let rate = estimate.secondsPerAudioSecond else {
            if running, let executionMs {
                return min(unknownLongest, max(unknownFirst, unknownFraction * Double(executionMs) / 1000))
            }
            let ladder = min(unknownLongest, previous <= 0 ? unknownFirst : previous * growth)
            let queue = estimate.queueDelaySeconds.map { max(0, queuedDelayFraction * $0 - queuedSeconds) } ?? 0
            let run = estimate.secondsPerAudioSecond.map { queuedExecutionFraction * $0 * audioSeconds } ?? 0
            return min(longest, max(ladder, queue + run))
        }
        let remaining = rate * audioSeconds - Double(executionMs ?? 0) / 1000
        if remaining > shortest { return min(longest, remaining) }
        return min(overdueLongest, previous <= 0 || previous > overdueLongest ? overdueFirst : previous * growth)
    }
}

/// Progress and ETA from a job's stage and chunks: preparation 5 %, rendering 85 % by audio seconds
/// done, stitching 10 %; the ETA from RunPod's measured throughput.
public enum JobProgress {
    public static let preparingWeight = 0.05
    public static let renderingWeight = 0.85

    /// Fraction done, 0…1.
    public static func progress(of job: Job) -> Double {
        switch job.stage {
        case .stageDone: return job.status == .completed ? 1 : job.progress
        case .stageStitching: return preparingWeight + renderingWeight
        case .stageRendering:
            let total = job.chunks.reduce(0) { $0 + $1.durationSec }
            guard total > 0 else { return preparingWeight }
            let done = job.chunks.filter { $0.status == .chunkCompleted }.reduce(0) { $0 + $1.durationSec }
            return preparingWeight + renderingWeight * done / total
        default: return 0
        }
    }

    /// Seconds left, or -1 while unknown: the remaining audio rendered `concurrency` at a time
    /// at the measured rate, plus one queue delay, plus stitching (`stitchSeconds`).
    public static func eta(of job: Job, estimate: Throughput.Estimate, concurrency: Int, stitchSeconds: Double = 2) -> Double {
        switch job.stage {
        case .stageDone: return job.status == .completed ? 0 : -1
        case .stageStitching: return stitchSeconds
        case .stageRendering:
            guard let rate = estimate.secondsPerAudioSecond else { return -1 }
            let left = job.chunks.filter { $0.status != .chunkCompleted }
            guard !left.isEmpty else { return stitchSeconds }
            let seconds = left.map { $0.durationSec * rate }.sorted(by: >)
            // Longest first onto `concurrency` lanes: the finish time of the busiest lane.
            var lanes = [Double](repeating: 0, count: max(1, min(concurrency, seconds.count)))
            for item in seconds {
                let index = lanes.indices.min { lanes[$0] < lanes[$1] }!
                lanes[index] += item
            }
            return lanes.max()! + (estimate.queueDelaySeconds ?? 0) + stitchSeconds
        default: return -1
        }
    }
}
