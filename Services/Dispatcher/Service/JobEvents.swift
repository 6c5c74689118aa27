import TalkMeshBase
import TalkMeshMessages

/// Tells watchers of a job about each stored change (`WatchJob`). A watcher's buffer is bounded:
/// a watcher too slow to keep up skips to the newest states, it never makes the Dispatcher hold
/// an unbounded queue.
public final class JobEvents: Sendable {
    private struct State {
        var watchers: [String: [UInt64: AsyncStream<Job>.Continuation]] = [:]
        var next: UInt64 = 0
    }

    private let state = Locked(State())
    /// Changes buffered per watcher.
    public let bufferSize: Int

    public init(bufferSize: Int = 256) {
        self.bufferSize = bufferSize
    }

    /// A stream of the job's changes from now on; it ends when the caller stops iterating.
    public func subscribe(_ id: String) -> AsyncStream<Job> {
        let (stream, continuation) = AsyncStream.makeStream(of: Job.self, bufferingPolicy: .bufferingNewest(bufferSize))
        let token = state.withLock { state in
            state.next += 1
            state.watchers[id, default: [:]][state.next] = continuation
            return state.next
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLock { state in
                state.watchers[id]?[token] = nil
                if state.watchers[id]?.isEmpty == true { state.watchers[id] = nil }
            }
        }
        return stream
    }

    /// Sends a stored change to the job's watchers.
    public func publish(_ job: Job) {
        let watchers = state.withLock { Array($0.watchers[job.id, default: [:]].values) }
        for watcher in watchers { watcher.yield(job) }
    }

    /// Whether anyone watches the job.
    public func isWatched(_ id: String) -> Bool { state.withLock { $0.watchers[id] != nil } }

    /// Jobs someone watches.
    public var watched: [String] { state.withLock { Array($0.watchers.keys) } }

    /// Watchers across all jobs.
    public var count: Int { state.withLock { $0.watchers.values.reduce(0) { $0 + $1.count } } }
}
