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
    /// new version. STORE_CONFLICT when someone else wrote first, LEASE_LOST when this replica
    /// no longer holds the job.
    func update(_ record: JobRecord) async throws -> JobRecord
    /// One page of an owner's jobs, newest first.
    func list(_ query: JobQuery) async throws -> (jobs: [Job], nextPageToken: String)
    /// Ids of jobs that are not terminal and that this replica should drive now (with leases:
    /// the ones it claimed).
    func claimUnfinished(limit: Int) async throws -> [String]
    /// Gives up what this replica holds on a job (a terminal job, or shutdown).
    func release(_ id: String) async throws
    /// Succeeds when the store answers (for `/readyz`).
    func ping() async throws
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
    /// `sqlite://PATH` (`sqlite:///abs/jobs.db`).
    public static func open(_ url: String, clock: any WallClock = SystemWallClock()) throws -> any JobStore {
        if url.hasPrefix("sqlite://") {
            let path = String(url.dropFirst("sqlite://".count))
            guard !path.isEmpty else { throw ServiceError(.invalidArgument, "JOB_STORE=\(url): expected sqlite://PATH") }
            return try SQLiteJobStore(path: path, clock: clock)
        }
        throw ServiceError(.invalidArgument, "JOB_STORE=\(url): expected sqlite://PATH")
    }
}
