import TalkMeshBase
import TalkMeshMessages

/// The Dispatcher's Prometheus metrics: job state changes, chunk outcomes, RunPod submissions (and
/// the resubmissions the crash window forces), RunPod's queue delay and execution time, and job
/// duration.
public final class DispatcherCounters: Sendable {
    /// Upper bounds of the histograms' buckets, seconds.
    static let bounds: [Double] = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]

    struct Histogram {
        var buckets = [UInt64](repeating: 0, count: DispatcherCounters.bounds.count)
        var count: UInt64 = 0
        var sum = 0.0

        mutating func observe(_ value: Double) {
            count += 1
            sum += value
            for (index, bound) in DispatcherCounters.bounds.enumerated() where value <= bound { buckets[index] += 1 }
        }
    }

    private struct State {
        var events: [String: Int] = [:]
        /// Unfinished jobs by state, deployment-wide (read from the store), and jobs driven here.
        var unfinished: [JobStatus: Int] = [:]
        var driven = 0
        var histograms: [String: Histogram] = [:]
    }

    private let state = Locked(State())
    /// How many chunks each job's audio was split into.
    public let chunks = HistogramFamily("talkmesh_dispatcher_job_chunks", help: "Chunks per job, counted when its audio is split.",
                                        labels: [], bounds: [1, 2, 3, 5, 10, 20, 40, 80, 160])

    public init() {}

    /// Counts a job reaching `status`.
    public func count(job status: JobStatus) {
        count(event: "jobs_\(status.description.lowercased())")
    }

    public func count(event: String, by amount: Int = 1) {
        state.withLock { $0.events[event, default: 0] += amount }
    }

    /// Adds a sample (seconds) to a histogram: `runpod_queue_delay`, `runpod_execution`, `job_duration`.
    public func observe(_ name: String, seconds: Double) {
        guard seconds.isFinite, seconds >= 0 else { return }
        state.withLock { $0.histograms[name, default: Histogram()].observe(seconds) }
    }

    /// The store's latest count of unfinished jobs by state.
    public func set(unfinished: [JobStatus: Int]) {
        state.withLock { $0.unfinished = unfinished }
    }

    /// Jobs this replica drives now.
    public func set(driven: Int) {
        state.withLock { $0.driven = driven }
    }

    public func value(_ event: String) -> Int { state.withLock { $0.events[event] ?? 0 } }

    /// What each histogram measures.
    static let help = ["runpod_queue_delay": "RunPod's queue delay (delayTime) of each finished chunk",
                       "runpod_execution": "RunPod's execution time (executionTime) of each finished chunk",
                       "job_duration": "Time from creation to completion of each completed job"]

    /// The Prometheus text exposition of every counter and histogram.
    public func render() -> String {
        histogramsText() + chunks.render()
    }

    private func histogramsText() -> String {
        let (events, histograms, unfinished, driven) = state.withLock { ($0.events, $0.histograms, $0.unfinished, $0.driven) }
        var text = "# HELP talkmesh_dispatcher_jobs Jobs waiting or running in the whole store, by status.\n# TYPE talkmesh_dispatcher_jobs gauge\n"
        for status in [JobStatus.inQueue, .running] {
            text += "talkmesh_dispatcher_jobs{status=\"\(status)\"} \(unfinished[status] ?? 0)\n"
        }
        text += "# HELP talkmesh_dispatcher_jobs_driven Jobs this replica drives now.\n"
        text += "# TYPE talkmesh_dispatcher_jobs_driven gauge\ntalkmesh_dispatcher_jobs_driven \(driven)\n"
        text += "# HELP talkmesh_dispatcher_events_total What the Dispatcher did: jobs by end state, RunPod submissions, chunks, retention.\n"
        text += "# TYPE talkmesh_dispatcher_events_total counter\n"
        for (event, value) in events.sorted(by: { $0.key < $1.key }) {
            text += "talkmesh_dispatcher_events_total{event=\"\(event)\"} \(value)\n"
        }
        for (name, histogram) in histograms.sorted(by: { $0.key < $1.key }) {
            let metric = "talkmesh_dispatcher_\(name)_seconds"
            text += "# HELP \(metric) \(Self.help[name] ?? name), in seconds.\n"
            text += "# TYPE \(metric) histogram\n"
            for (index, bound) in Self.bounds.enumerated() {
                text += "\(metric)_bucket{le=\"\(bound)\"} \(histogram.buckets[index])\n"
            }
            text += "\(metric)_bucket{le=\"+Inf\"} \(histogram.count)\n\(metric)_sum \(histogram.sum)\n\(metric)_count \(histogram.count)\n"
        }
        return text
    }
}
