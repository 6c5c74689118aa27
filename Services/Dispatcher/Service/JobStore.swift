import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages

/// Where jobs live: every state change is committed here before the next step depends on it.
/// Writes are compare-and-swap on the job's version, so two writers (the workflow and a cancel,
/// or two replicas) cannot overwrite each other: the loser gets STORE_CONFLICT and re-reads.
public protocol JobStore: Sendable {
    /// Inserts a new job, or returns the job that already holds `(owner, idempotency_key)`
    /// (`created` false).
    func create(_ record: JobRecord) async throws -> (record: JobRecord, created: Bool)
    /// The job, or nil.
    func get(_ id: String) async throws -> JobRecord?
    /// Writes `record` when the stored version is still `record.job.version`; returns it with its
    /// new version. STORE_CONFLICT when someone else wrote first. `asHolder`: the write of the
    /// job's driver, which needs this replica's lease (LEASE_LOST without it — also once the
    /// lease was lost and forgotten, so a stale driver can never write as a mere bystander);
    /// otherwise a bystander's write (a cancel), checked by version alone.
    func update(_ record: JobRecord, asHolder: Bool) async throws -> JobRecord
    /// One page of an owner's jobs, newest first.
    func list(_ query: JobQuery) async throws -> (jobs: [Job], nextPageToken: String)
    /// Up to `limit` ids of jobs that are not terminal and that this replica should drive now,
    /// none of `running` (with leases: the ones it just claimed).
    func claimUnfinished(limit: Int, running: Set<String>) async throws -> [String]
    /// Gives up what this replica holds on a job (a terminal job, or shutdown).
    func release(_ id: String) async throws
    /// Jobs queued and running, in the whole store: the jobs-by-state gauge, and `/readyz`'s
    /// question (it fails while the store does not answer).
    func unfinishedCounts() async throws -> [JobStatus: Int]

    // MARK: Retention

    /// Ended jobs (ended before `endedBefore`, Unix ms) whose blobs are not deleted yet, oldest first.
    func jobsWithBlobs(endedBefore: Int64, limit: Int) async throws -> [JobRecord]
    /// Deletes up to `limit` jobs that ended before `endedBefore` and whose blobs are gone, keeping a
    /// tombstone of each (`JobRecord.tombstone`) that `get` answers; and drops tombstones made before
    /// `tombstonesBefore`. Returns how many jobs it deleted.
    func expireJobs(endedBefore: Int64, tombstonesBefore: Int64, limit: Int) async throws -> Int
    /// Whether a job other than `id` whose blobs are not deleted names `key` as its image or audio
    /// (jobs created over gRPC may share an upload). Jobs stored before retention existed count as
    /// naming every key, until their own blobs are deleted.
    func inputInUse(_ key: String, except id: String) async throws -> Bool
    /// Jobs whose pending webhook delivery is due at `now` (Unix ms), the longest waiting first.
    func webhooksDue(at now: Int64, limit: Int) async throws -> [JobRecord]
    /// Takes (or keeps) the deployment's retention sweep for `seconds`: false while another replica
    /// holds it, so one replica sweeps at a time.
    func claimSweep(seconds: Double) async throws -> Bool

    // MARK: Sharing the work between replicas (a store one replica owns keeps the defaults)

    /// How long a claim lasts without a heartbeat, seconds; nil when there are no leases.
    var leaseSeconds: Double? { get }
    /// Extends this replica's leases; returns the ids of jobs it no longer holds (another
    /// replica claimed them after its lease expired).
    func heartbeat() async throws -> [String]
    /// Gives up every lease this replica holds (a clean shutdown: others take over at once).
    func releaseAll() async throws
    /// The deployment-wide cap on RunPod jobs in flight. Work of its own (PostgreSQL: the queue
    /// that asks the database for free slots) runs on `executor` (nil: Swift's global pool).
    func inFlightSlots(capacity: Int, executor: (any TaskExecutor)?) throws -> any InFlightSlots
    /// The deployment-wide budget of one RunPod route: `limit` requests per `window` seconds.
    /// Work of its own (PostgreSQL: fetching tokens) runs on `executor` (nil: Swift's global pool).
    func requestGate(route: String, limit: Int, window: Double, executor: (any TaskExecutor)?) throws -> any RequestGate
    /// Calls `handler` for every change other replicas make. This replica's own job writes are
    /// left out where the store can tell (PostgreSQL: a version this replica wrote); otherwise the
    /// handler tells them apart by version.
    func observe(_ handler: @escaping @Sendable (StoreChange) -> Void)
    /// The store's own metrics in Prometheus text (PostgreSQL: batches and statements sent).
    var metricsText: String { get }
}

/// A change the store reports (PostgreSQL: LISTEN/NOTIFY).
public enum StoreChange: Sendable, Equatable {
    /// The job was written; its version is now `version`.
    case job(id: String, version: Int64)
    /// RunPod slots were freed.
    case slotsFreed
    /// A replica released jobs (a clean shutdown, or no room): claim them now.
    case claimable
    /// Notices may have been missed (the listening connection was re-established): re-read.
    case resynchronize
}

extension JobStore {
    /// A bystander's write (checked by version alone).
    public func update(_ record: JobRecord) async throws -> JobRecord {
        try await update(record, asHolder: false)
    }

    public var leaseSeconds: Double? { nil }
    public func claimSweep(seconds: Double) async throws -> Bool { true }
    public func heartbeat() async throws -> [String] { [] }
    public func releaseAll() async throws {}
    public func inFlightSlots(capacity: Int, executor: (any TaskExecutor)?) throws -> any InFlightSlots {
        LocalInFlightSlots(capacity: capacity)
    }
    public func requestGate(route: String, limit: Int, window: Double, executor: (any TaskExecutor)?) throws -> any RequestGate {
        RequestBudget(limit: limit, window: window)
    }
    public func inFlightSlots(capacity: Int) throws -> any InFlightSlots { try inFlightSlots(capacity: capacity, executor: nil) }
    public func requestGate(route: String, limit: Int, window: Double) throws -> any RequestGate {
        try requestGate(route: route, limit: limit, window: window, executor: nil)
    }
    public func observe(_ handler: @escaping @Sendable (StoreChange) -> Void) {}
    public var metricsText: String { "" }
}

/// A `ListJobs` query.
public struct JobQuery: Sendable, Equatable {
    public var owner: String
    public var status: JobStatus?
    public var pageSize: Int
    /// From the previous page: where to continue.
    public var after: PageToken?

    public init(owner: String, status: JobStatus? = nil, pageSize: Int = 50, after: PageToken? = nil) {
        self.owner = owner
        self.status = status
        self.pageSize = pageSize
        self.after = after
    }
}

/// A position in the newest-first order: creation time, then id.
public struct PageToken: Sendable, Equatable {
    public var createdAtUnixMs: Int64
    public var id: String

    public init(createdAtUnixMs: Int64, id: String) {
        self.createdAtUnixMs = createdAtUnixMs
        self.id = id
    }

    /// `<ms>.<id>`; INVALID_ARGUMENT for anything else.
    public init(parsing text: String) throws(ServiceError) {
        let parts = text.split(separator: ".", maxSplits: 1)
        guard parts.count == 2, let ms = Int64(parts[0]), ms >= 0, JobID.isValid(String(parts[1])) else {
            throw ServiceError(.invalidArgument, "page_token is not one this service issued")
        }
        createdAtUnixMs = ms
        id = String(parts[1])
    }

    public var text: String { "\(createdAtUnixMs).\(id)" }
}

/// Job ids: `job_` and 24 random hex digits.
public enum JobID {
    public static func make() -> String {
        var generator = SystemRandomNumberGenerator()
        let digits = Array("0123456789abcdef")
        return "job_" + String((0..<24).map { _ in digits[Int(generator.next() % 16)] })
    }

    public static func isValid(_ id: String) -> Bool {
        id.utf8.count == 28 && id.hasPrefix("job_") && id.utf8.dropFirst(4).allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}

/// Opens the store a `JOB_STORE` URL names.
public enum JobStores {
    /// `sqlite://PATH` (`sqlite:///abs/jobs.db`), or `postgres://…` / `postgresql://…` (libpq's URL,
    /// e.g. `postgres://user:pass@host:5432/talkmesh`) where replicas share the work under leases
    /// of `leaseSeconds`.
    /// `workflow`: the thread the jobs' workflows run on (PostgreSQL batches what it writes).
    public static func open(_ url: String, leaseSeconds: Double = 30, clock: any WallClock = SystemWallClock(),
                            workflow: WorkflowExecutor? = nil) throws -> any JobStore {
        if url.hasPrefix("sqlite://") {
            let path = String(url.dropFirst("sqlite://".count))
            guard !path.isEmpty else { throw ServiceError(.invalidArgument, "JOB_STORE=\(url): expected sqlite://PATH") }
            return try SQLiteJobStore(path: path, clock: clock)
        }
        if url.hasPrefix("postgres://") || url.hasPrefix("postgresql://") {
            return try PostgresJobStore(url: url, leaseSeconds: leaseSeconds, clock: clock, workflow: workflow)
        }
        throw ServiceError(.invalidArgument, "JOB_STORE=\(PostgresConnection.redact(url)): expected sqlite://PATH or postgres://…")
    }
}
