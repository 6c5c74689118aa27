import Synchronization
import TalkMeshMessages

/// Counters for `/metrics`: job state changes, chunk outcomes, RunPod submissions, and the
/// resubmissions that the crash window forces.
public final class DispatcherCounters: Sendable {
    private let values = Mutex([String: Int]())

    public init() {}

    /// Counts a job reaching `status`.
    public func count(job status: JobStatus) {
        count(event: "jobs_\(status.description.lowercased())")
    }

    public func count(event: String) {
        values.withLock { $0[event, default: 0] += 1 }
    }

    public func value(_ event: String) -> Int { values.withLock { $0[event] ?? 0 } }

    /// Every counter, sorted by name.
    public var snapshot: [(String, Int)] { values.withLock { $0.sorted { $0.key < $1.key } } }
}
