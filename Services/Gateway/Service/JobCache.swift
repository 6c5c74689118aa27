import TalkMeshBase
import TalkMeshMessages

/// The Gateway's memory of recent `GET /v1/jobs/{id}` answers: a client polling a job costs the
/// Dispatcher one `GetJob` per `ttl` (JOB_CACHE_TTL), and the answer's JSON is encoded once per
/// version instead of per poll. What this replica changes itself (a job it created or cancelled)
/// and every change a watch through this replica sees (SSE, `WatchJob`) is stored at once, newer
/// versions only; any other change shows within `ttl`. Bounded: at most `capacity`
/// answers, expired ones dropped first.
final class JobCache: Sendable {
    /// A class: a poll hands on one reference, not a copy of the whole job.
    final class Answer: Sendable {
        let job: Job
        let body: [UInt8]
        let expires: Int64

        init(job: Job, body: [UInt8], expires: Int64) {
            self.job = job
            self.body = body
            self.expires = expires
        }
    }

    private let entries = Locked<[String: Answer]>([:])
    let ttlNanoseconds: Int64
    let capacity: Int
    let videoURL: JobJSON.VideoURL?

    init(ttlNanoseconds: Int64, capacity: Int = 10_000, videoURL: JobJSON.VideoURL? = nil) {
        self.ttlNanoseconds = ttlNanoseconds
        self.capacity = capacity
        self.videoURL = videoURL
    }

    var enabled: Bool { ttlNanoseconds > 0 }

    /// The stored answer for `id`, while fresh.
    func answer(_ id: String) -> Answer? {
        guard enabled else { return nil }
        let now = MonotonicClock.nanoseconds()
        return entries.withLock { entries in
            guard let answer = entries[id] else { return nil }
            if answer.expires <= now {
                entries[id] = nil
                return nil
            }
            return answer
        }
    }

    /// Stores `job` (and its encoded answer), unless a newer version is already there.
    @discardableResult
    func store(_ job: Job) -> Answer {
        let answer = Answer(job: job, body: JobJSON.data(JobJSON.object(job, videoURL: videoURL)), expires: MonotonicClock.nanoseconds() + ttlNanoseconds)
        guard enabled else { return answer }
        entries.withLock { entries in
            if let held = entries[job.id], held.job.version > job.version { return }
            if entries.count >= capacity && entries[job.id] == nil {
                let now = MonotonicClock.nanoseconds()
                entries = entries.filter { $0.value.expires > now }
                if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
            }
            entries[job.id] = answer
        }
        return answer
    }
}
