import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages

/// The shared `JobStore`: any number of Dispatcher replicas on one PostgreSQL database.
///
/// A replica drives only the jobs it holds a lease on. Claiming takes unleased or expired jobs
/// with `FOR UPDATE SKIP LOCKED` (two replicas never claim the same job) and bumps the job's
/// `lease_epoch`; a heartbeat extends the leases every third of their length. Every write of a
/// held job is fenced by the epoch: a replica that was paused past its lease, and whose job
/// another replica claimed meanwhile, gets LEASE_LOST and stops — it cannot write over the new
/// owner, so a chunk is never submitted by two replicas. Time is the database's (`now()`), so
/// replicas' clocks do not matter.
public final class PostgresJobStore: JobStore {
    let pool: PostgresPool
    /// Job writes and slot changes, sent in batches (group commit).
    let batcher: PostgresBatcher
    /// This replica: host, process and a random part (a restarted process is a new replica).
    public let replica: String
    public let leaseSeconds: Double?
    private let lease: Double
    private let clock: any WallClock
    /// The jobs this replica holds, with the epoch of its claim.
    private let held = Locked<[String: Int64]>([:])
    /// Rows leased to this replica that no runner here held at the last heartbeat (id → epoch).
    private let unheldLeases = Locked<[String: Int64]>([:])
    private let listener: PostgresListener
    /// The version this replica last wrote of each job it holds and has not ended.
    private let ownWrites = Locked<[String: Int64]>([:])

    /// The schema, one migration per version; all run under one advisory lock, so replicas that
    /// start together do not race.
    static let migrations = [
        """
        CREATE TABLE jobs (
            id text PRIMARY KEY,
            owner text NOT NULL,
            idempotency_key text,
            status integer NOT NULL,
            created_ms bigint NOT NULL,
            updated_ms bigint NOT NULL,
            version bigint NOT NULL,
            data bytea NOT NULL,
            lease_owner text,
            lease_until timestamptz,
            lease_epoch bigint NOT NULL DEFAULT 0
        );
        CREATE UNIQUE INDEX jobs_idempotency ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
        CREATE INDEX jobs_owner_newest ON jobs(owner, created_ms DESC, id DESC);
        CREATE INDEX jobs_unfinished ON jobs(created_ms) WHERE status IN (1, 2);
        CREATE INDEX jobs_lease_owner ON jobs(lease_owner) WHERE lease_owner IS NOT NULL;
        CREATE FUNCTION talkmesh_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('talkmesh_jobs', NEW.id || ' ' || NEW.version);
            RETURN NULL;
        END $$;
        CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE OF version ON jobs
            FOR EACH ROW EXECUTE FUNCTION talkmesh_job_changed();
        CREATE TABLE runpod_slots (
            slot integer PRIMARY KEY,
            job_id text,
            chunk integer,
            holder text,
            taken_at timestamptz
        );
        CREATE UNIQUE INDEX runpod_slots_chunk ON runpod_slots(job_id, chunk) WHERE job_id IS NOT NULL;
        CREATE TABLE runpod_budget (
            route text PRIMARY KEY,
            tokens double precision NOT NULL,
            updated timestamptz NOT NULL
        );
        """,
        // Retention: when a job ended, whether its blobs are deleted, what is kept of deleted jobs,
        // and who sweeps.
        """
        ALTER TABLE jobs ADD COLUMN ended_ms bigint, ADD COLUMN blobs_deleted boolean NOT NULL DEFAULT false,
            ADD COLUMN image_key text, ADD COLUMN audio_key text;
        UPDATE jobs SET ended_ms = updated_ms WHERE status IN (3, 4, 5, 6);
        CREATE INDEX jobs_ended ON jobs(ended_ms) WHERE ended_ms IS NOT NULL;
        CREATE INDEX jobs_image_key ON jobs(image_key) WHERE NOT blobs_deleted;
        CREATE INDEX jobs_audio_key ON jobs(audio_key) WHERE NOT blobs_deleted;
        CREATE TABLE expired_jobs (
            id text PRIMARY KEY,
            expired_ms bigint NOT NULL,
            data bytea NOT NULL
        );
        CREATE INDEX expired_jobs_age ON expired_jobs(expired_ms);
        CREATE TABLE talkmesh_sweeps (
            name text PRIMARY KEY,
            holder text NOT NULL,
            until timestamptz NOT NULL
        );
        """,
        // Outgoing webhooks: when a job's pending delivery is due.
        """
        ALTER TABLE jobs ADD COLUMN webhook_due_ms bigint;
        CREATE INDEX jobs_webhook_due ON jobs(webhook_due_ms) WHERE webhook_due_ms IS NOT NULL;
        """,
    ]

    /// Connects (`connections` statements at once), migrates and starts listening for changes.
    /// With `workflow`, the statements its thread queues go out when it runs out of work.
    public init(url: String, leaseSeconds: Double = 30, connections: Int = 4, clock: any WallClock = SystemWallClock(),
                workflow: WorkflowExecutor? = nil) throws {
        pool = try PostgresPool(url: url, size: connections)
        batcher = try PostgresBatcher(pool: pool, workflow: workflow)
        var random = SystemRandomNumberGenerator()
        replica = "\(ProcessInfo.processInfo.hostName)/\(getpid())/\(String(random.next() % 0xFFFFFF, radix: 16))"
        lease = max(0.3, leaseSeconds)
        self.leaseSeconds = lease
        self.clock = clock
        listener = try PostgresListener(url: url, channels: ["talkmesh_jobs", "talkmesh_slots", "talkmesh_claimable"], executor: batcher.executor)
        let connection = try PostgresConnection(url: url)
        try Self.migrate(connection)
    }

    deinit { listener.stop() }

    static func migrate(_ connection: PostgresConnection) throws {
        try connection.transaction {
            try connection.execute("SELECT pg_advisory_xact_lock(7361426)")
            try connection.execute("CREATE TABLE IF NOT EXISTS talkmesh_schema (version integer NOT NULL)")
            let read = try connection.execute("SELECT coalesce(max(version), 0) FROM talkmesh_schema")
            let current = Int(read.int64(0, 0))
            guard current <= migrations.count else {
                throw ServiceError(.storeUnavailable, "the job store's schema (version \(current)) is newer than this Dispatcher knows (\(migrations.count))")
            }
            for version in current..<migrations.count {
                try connection.execute(migrations[version])
                try connection.execute("INSERT INTO talkmesh_schema (version) VALUES ($1)", [.int(version + 1)])
            }
        }
    }

    private var leaseInterval: PGValue { .text("\(lease) seconds") }

    // MARK: Jobs

    public func create(_ record: JobRecord) async throws -> (record: JobRecord, created: Bool) {
        var record = record
        record.stamp(version: 1, at: clock.nowUnixMs())
        let stamped = record, replica = self.replica, lease = leaseInterval
        // Its notice is this replica's own (as for `update`): marked before the insert is sent.
        ownWrites.withLock { $0[stamped.id] = 1 }
        let result: (JobRecord, Bool)
        do {
            result = try await insert(stamped, replica: replica, lease: lease)
        } catch {
            ownWrites.withLock { $0[stamped.id] = nil }
            throw error
        }
        if result.1 { held.withLock { $0[stamped.id] = 1 } } else { ownWrites.withLock { $0[stamped.id] = nil } }
        return result
    }

    private func insert(_ stamped: JobRecord, replica: String, lease: PGValue) async throws -> (JobRecord, Bool) {
        try await pool.with { db -> (JobRecord, Bool) in
            let job = stamped.job
            let key: PGValue = job.idempotencyKey.isEmpty ? .null : .text(job.idempotencyKey)
            let inserted = try db.execute("""
                INSERT INTO jobs (id, owner, idempotency_key, status, created_ms, updated_ms, version, data, lease_owner, lease_until, lease_epoch,
                                  image_key, audio_key)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + $10::interval, 1, $11, $12)
                ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id
                """, [.text(job.id), .text(job.owner), key, .int(job.status.rawValue), .int(job.createdAtUnixMs),
                      .int(job.updatedAtUnixMs), .int(job.version), .bytes(job.serializedBytes()), .text(replica), lease,
                      .text(job.imageKey), .text(job.audioKey)])
            if inserted.rows == 1 { return (stamped, true) }
            let existing = try db.execute("SELECT data FROM jobs WHERE owner = $1 AND idempotency_key = $2", [.text(job.owner), key])
            guard existing.rows == 1 else { throw ServiceError(.storeConflict, "the idempotency key's job changed while it was read") }
            return (JobRecord(stored: try Job(serializedBytes: existing.bytes(0, 0))), false)
        }
    }

    public func get(_ id: String) async throws -> JobRecord? {
        try await pool.with { db in
            let result = try db.execute("SELECT data FROM jobs WHERE id = $1 UNION ALL SELECT data FROM expired_jobs WHERE id = $1 LIMIT 1", [.text(id)])
            return result.rows == 1 ? JobRecord(stored: try Job(serializedBytes: result.bytes(0, 0))) : nil
        }
    }

    /// A held job's write is fenced by the claim's epoch (and extends the lease); a write of a job
    /// this replica does not hold (a cancel) is a compare-and-swap on the version alone.
    public func update(_ record: JobRecord, asHolder: Bool) async throws -> JobRecord {
        let expected = record.job.version
        var record = record
        record.stamp(version: expected + 1, at: clock.nowUnixMs())
        let stamped = record, replica = self.replica, lease = leaseInterval
        let epoch = held.withLock { $0[stamped.id] }
        if asHolder && epoch == nil {
            throw ServiceError(.leaseLost, "job \(record.id) is not held by this replica")
        }
        // Marked as this replica's before it is sent: the notice of the commit often reaches the
        // listener before the answer reaches this call, and, unmarked, cost a read of the job it
        // had just written (about two reads per chunk). Should the write fail, the mark goes back;
        // a notice of another writer's same version that the mark hid meanwhile is not lost: the
        // writer that conflicted re-reads the job and publishes it (JobRunner.save).
        let previous = ownWrites.withLock { writes -> Int64? in
            let previous = writes[stamped.id]
            if asHolder { writes[stamped.id] = max(previous ?? 0, stamped.job.version) }
            return previous
        }
        do {
            let job = stamped.job
            let values: [PGValue] = [.int(job.status.rawValue), .int(job.updatedAtUnixMs), .int(job.version),
                                     .bytes(job.serializedBytes()), .text(job.id), .int(expected),
                                     job.completedAtUnixMs > 0 ? .int(job.completedAtUnixMs) : .null,
                                     .text(job.blobsDeletedAtUnixMs > 0 ? "true" : "false"),
                                     stamped.webhookDueUnixMs.map { .int($0) } ?? .null]
            let set = "status = $1, updated_ms = $2, version = $3, data = $4, ended_ms = $7, blobs_deleted = $8::boolean, webhook_due_ms = $9"
            // In the next batch (a group commit with other jobs' writes and slot changes).
            let affected: Int
            if let epoch {
                affected = try await batcher.execute("""
                    UPDATE jobs SET \(set), lease_until = now() + $12::interval
                    WHERE id = $5 AND version = $6 AND lease_owner = $10 AND lease_epoch = $11
                    """, values + [.text(replica), .int(epoch), lease]) { $0.affected }
            } else {
                affected = try await batcher.execute("UPDATE jobs SET \(set) WHERE id = $5 AND version = $6", values) { $0.affected }
            }
            if affected != 1 {
                try await pool.with { db in
                    let now = try db.execute("SELECT lease_owner, lease_epoch FROM jobs WHERE id = $1", [.text(job.id)])
                    if let epoch, now.rows == 1, now.isNull(0, 0) || now.text(0, 0) != replica || now.int64(0, 1) != epoch {
                        throw ServiceError(.leaseLost, "job \(job.id) was claimed by another replica")
                    }
                    throw ServiceError(.storeConflict, "job \(job.id) changed since version \(expected)")
                }
            }
        } catch let error as ServiceError where error.code == .leaseLost {
            held.withLock { $0[stamped.id] = nil }
            ownWrites.withLock { $0[stamped.id] = nil }
            throw error
        } catch {
            if asHolder { ownWrites.withLock { $0[stamped.id] = previous } }
            throw error
        }
        ownWrites.withLock { $0[stamped.id] = stamped.isTerminal ? nil : max($0[stamped.id] ?? 0, stamped.job.version) }
        return stamped
    }

    public func list(_ query: JobQuery) async throws -> (jobs: [Job], nextPageToken: String) {
        try await pool.with { db in
            var sql = "SELECT data FROM jobs WHERE owner = $1"
            var values: [PGValue] = [.text(query.owner)]
            if let status = query.status {
                values.append(.int(status.rawValue))
                sql += " AND status = $\(values.count)"
            }
            if let after = query.after {
                values += [.int(after.createdAtUnixMs), .text(after.id)]
                sql += " AND (created_ms, id) < ($\(values.count - 1), $\(values.count))"
            }
            values.append(.int(query.pageSize + 1))
            sql += " ORDER BY created_ms DESC, id DESC LIMIT $\(values.count)"
            let result = try db.execute(sql, values)
            var jobs: [Job] = []
            for row in 0..<result.rows { jobs.append(try Job(serializedBytes: result.bytes(row, 0))) }
            guard jobs.count > query.pageSize else { return (jobs, "") }
            jobs.removeLast()
            let last = jobs[jobs.count - 1]
            return (jobs, PageToken(createdAtUnixMs: last.createdAtUnixMs, id: last.id).text)
        }
    }

    // MARK: Retention

    public func jobsWithBlobs(endedBefore: Int64, limit: Int) async throws -> [JobRecord] {
        try await pool.with { db in
            let result = try db.execute("SELECT data FROM jobs WHERE ended_ms < $1 AND NOT blobs_deleted ORDER BY ended_ms LIMIT $2",
                                        [.int(endedBefore), .int(limit)])
            return try (0..<result.rows).map { JobRecord(stored: try Job(serializedBytes: result.bytes($0, 0))) }
        }
    }

    public func webhooksDue(at now: Int64, limit: Int) async throws -> [JobRecord] {
        try await pool.with { db in
            let result = try db.execute("SELECT data FROM jobs WHERE webhook_due_ms <= $1 ORDER BY webhook_due_ms LIMIT $2",
                                        [.int(now), .int(limit)])
            return try (0..<result.rows).map { JobRecord(stored: try Job(serializedBytes: result.bytes($0, 0))) }
        }
    }

    /// One transaction: the rows deleted are locked (SKIP LOCKED: a sweep that overlaps another's
    /// takes other rows), their tombstones written, the old tombstones dropped.
    public func expireJobs(endedBefore: Int64, tombstonesBefore: Int64, limit: Int) async throws -> Int {
        let now = clock.nowUnixMs()
        return try await pool.with { db in
            try db.transaction {
                _ = try db.execute("DELETE FROM expired_jobs WHERE expired_ms < $1", [.int(tombstonesBefore)])
                let due = try db.execute("""
                    SELECT data FROM jobs WHERE ended_ms < $1 AND blobs_deleted ORDER BY ended_ms LIMIT $2 FOR UPDATE SKIP LOCKED
                    """, [.int(endedBefore), .int(limit)])
                for row in 0..<due.rows {
                    let record = JobRecord(stored: try Job(serializedBytes: due.bytes(row, 0)))
                    _ = try db.execute("""
                        INSERT INTO expired_jobs (id, expired_ms, data) VALUES ($1, $2, $3)
                        ON CONFLICT (id) DO UPDATE SET expired_ms = excluded.expired_ms, data = excluded.data
                        """, [.text(record.id), .int(now), .bytes(record.tombstone(at: now).serializedBytes())])
                    _ = try db.execute("DELETE FROM jobs WHERE id = $1", [.text(record.id)])
                }
                return due.rows
            }
        }
    }

    public func inputInUse(_ key: String, except id: String) async throws -> Bool {
        try await pool.with { db in
            let result = try db.execute("""
                SELECT 1 FROM jobs WHERE id <> $1 AND NOT blobs_deleted AND (image_key = $2 OR audio_key = $2 OR image_key IS NULL) LIMIT 1
                """, [.text(id), .text(key)])
            return result.rows > 0
        }
    }

    /// A lease on the row `retention` of `talkmesh_sweeps`, in the database's time: the holder
    /// keeps it by sweeping again before it runs out; another replica takes it only once it has.
    public func claimSweep(seconds: Double) async throws -> Bool {
        let replica = self.replica
        return try await pool.with { db in
            let result = try db.execute("""
                INSERT INTO talkmesh_sweeps (name, holder, until) VALUES ('retention', $1, now() + $2::interval)
                ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                WHERE talkmesh_sweeps.until < now() OR talkmesh_sweeps.holder = excluded.holder
                RETURNING holder
                """, [.text(replica), .text("\(max(0.1, seconds)) seconds")])
            return result.rows == 1
        }
    }

    // MARK: Leases

    /// Claims unfinished jobs nobody holds (never leased, released, or whose lease expired),
    /// oldest first. `running` needs no filter here: the jobs this replica drives carry its own
    /// lease, which the claim never takes.
    public func claimUnfinished(limit: Int, running: Set<String>) async throws -> [String] {
        guard limit > 0 else { return [] }
        let replica = self.replica, lease = leaseInterval
        let claimed = try await pool.with { db -> [(String, Int64)] in
            let result = try db.execute("""
                UPDATE jobs SET lease_owner = $1, lease_until = now() + $2::interval, lease_epoch = lease_epoch + 1
                WHERE id IN (
                    SELECT id FROM jobs
                    WHERE status IN (1, 2) AND (lease_until IS NULL OR lease_until < now()) AND lease_owner IS DISTINCT FROM $1
                    ORDER BY created_ms LIMIT $3 FOR UPDATE SKIP LOCKED)
                RETURNING id, lease_epoch
                """, [.text(replica), lease, .int(limit)])
            return (0..<result.rows).map { (result.text($0, 0), result.int64($0, 1)) }
        }
        held.withLock { held in for (id, epoch) in claimed { held[id] = epoch } }
        return claimed.map(\.0)
    }

    public func release(_ id: String) async throws {
        ownWrites.withLock { $0[id] = nil }
        guard let epoch = held.withLock({ $0.removeValue(forKey: id) }) else { return }
        try await releaseLease(id, epoch: epoch)
    }

    /// Gives up the lease of `id` if it is still this replica's at `epoch`. Terminal jobs are
    /// released too (else every heartbeat would renew them); only an unfinished one is worth
    /// telling the other replicas about.
    private func releaseLease(_ id: String, epoch: Int64) async throws {
        let replica = self.replica
        try await pool.with { db in
            _ = try db.execute("""
                WITH released AS (UPDATE jobs SET lease_owner = NULL, lease_until = NULL
                                  WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3 RETURNING status)
                SELECT pg_notify('talkmesh_claimable', '') FROM released WHERE status IN (1, 2)
                """, [.text(id), .text(replica), .int(epoch)])
        }
    }

    /// Renews this replica's leases and returns the held jobs whose lease is gone (another replica
    /// claimed them). Only what was held when the renewal began is judged: a job created or claimed
    /// while it ran is not in its answer and is not lost. A row leased to this replica that no
    /// runner here holds (two heartbeats running) is released, so no job stays leased to nobody.
    public func heartbeat() async throws -> [String] {
        let replica = self.replica, lease = leaseInterval
        let before = held.withLock { $0 }
        let renewed = try await pool.with { db -> [String: Int64] in
            let result = try db.execute("UPDATE jobs SET lease_until = now() + $2::interval WHERE lease_owner = $1 RETURNING id, lease_epoch",
                                        [.text(replica), lease])
            var renewed: [String: Int64] = [:]
            for row in 0..<result.rows { renewed[result.text(row, 0)] = result.int64(row, 1) }
            return renewed
        }
        let (lost, orphans) = held.withLock { held -> ([String], [String: Int64]) in
            let lost = before.filter { id, epoch in held[id] == epoch && renewed[id] != epoch }.map(\.key)
            for id in lost { held[id] = nil }
            return (lost, renewed.filter { held[$0.key] == nil })
        }
        ownWrites.withLock { writes in for id in lost { writes[id] = nil } }
        let stale = unheldLeases.withLock { previous -> [String: Int64] in
            defer { previous = orphans }
            return orphans.filter { previous[$0.key] == $0.value }
        }
        for (id, epoch) in stale { try await releaseLease(id, epoch: epoch) }
        return lost
    }

    /// Jobs this replica holds now.
    public var holding: Set<String> { held.withLock { Set($0.keys) } }

    public func releaseAll() async throws {
        let replica = self.replica
        held.withLock { $0.removeAll() }
        ownWrites.withLock { $0.removeAll() }
        try await pool.with { db in
            _ = try db.execute("""
                WITH released AS (UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1 RETURNING status)
                SELECT pg_notify('talkmesh_claimable', '') FROM released WHERE status IN (1, 2)
                """, [.text(replica)])
        }
    }

    public func unfinishedCounts() async throws -> [JobStatus: Int] {
        try await pool.with { db in
            let result = try db.execute("SELECT status, count(*) FROM jobs WHERE status IN (1, 2) GROUP BY status")
            var counts: [JobStatus: Int] = [:]
            for row in 0..<result.rows { counts[JobStatus(rawValue: Int32(result.int64(row, 0)))] = Int(result.int64(row, 1)) }
            return counts
        }
    }


    public var metricsText: String {
        let (batches, statements) = batcher.totals
        return """
            # HELP talkmesh_dispatcher_postgres_batches_total Group-committed batches sent to PostgreSQL (one round trip each).
            # TYPE talkmesh_dispatcher_postgres_batches_total counter
            talkmesh_dispatcher_postgres_batches_total \(batches)
            # HELP talkmesh_dispatcher_postgres_batched_statements_total Statements sent in those batches.
            # TYPE talkmesh_dispatcher_postgres_batched_statements_total counter
            talkmesh_dispatcher_postgres_batched_statements_total \(statements)

            """
    }

    // MARK: Sharing

    public func inFlightSlots(capacity: Int, executor: (any TaskExecutor)?) throws -> any InFlightSlots {
        let slots = try PostgresInFlightSlots(pool: pool, batcher: batcher, replica: replica, capacity: capacity, executor: executor)
        listener.add { change in if change == .slotsFreed || change == .resynchronize { slots.wake() } }
        return slots
    }

    public func requestGate(route: String, limit: Int, window: Double, executor: (any TaskExecutor)?) throws -> any RequestGate {
        try PostgresRequestGate(pool: pool, route: route, limit: limit, window: window, executor: executor)
    }

    /// Leaves out the notices of this replica's own writes (five or so per chunk, each of which
    /// cost a task and two actor hops to be told apart by version) and of freed slots (the slots
    /// have their own handler).
    public func observe(_ handler: @escaping @Sendable (StoreChange) -> Void) {
        listener.add { [ownWrites] change in
            switch change {
            case .slotsFreed:
                return
            case .job(let id, let version):
                if let written = ownWrites.withLock({ $0[id] }), written >= version { return }
            default:
                break
            }
            handler(change)
        }
    }
}
