import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages

/// The embedded `JobStore`: one SQLite file in WAL mode, one connection used by one caller at a
/// time (no SQLITE_BUSY between our own writers), versioned migrations in `PRAGMA user_version`.
/// One replica owns the file, so there are no leases: every unfinished job is this replica's.
///
/// Calls run on the caller's thread under a mutex: a write is tens of microseconds of CPU, and
/// handing it to a thread of its own and back cost two context switches per write, more than the
/// write (bench/dispatcher). The connection holds the file exclusively (no other process or
/// connection opens it; a second Dispatcher on the same file is refused as STORE_UNAVAILABLE).
/// The WAL checkpoint, which can wait on the disk, runs on `thread` twice a second, under the
/// mutex; a write never checkpoints.
public final class SQLiteJobStore: JobStore {
    /// The connection, used only under `lock`; nil once the store is gone (closed at once, so the
    /// file it held exclusively is free for the next store).
    private final class Connection: @unchecked Sendable {
        var db: SQLiteDatabase?
        init(_ db: SQLiteDatabase) { self.db = db }
    }

    private let connection: Connection
    private let lock = PThreadMutex()
    private let thread = BlockingWorkPool(threads: 1, name: "sqlite-wal")
    private let clock: any WallClock
    private let checkpoints: Task<Void, Never>

    /// The schema, one migration per version; each runs in its own transaction.
    static let migrations = [
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            idempotency_key TEXT,
            status INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            version INTEGER NOT NULL,
            data BLOB NOT NULL
        ) STRICT;
        CREATE UNIQUE INDEX jobs_idempotency ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
        CREATE INDEX jobs_owner_newest ON jobs(owner, created_ms DESC, id DESC);
        CREATE INDEX jobs_unfinished ON jobs(created_ms) WHERE status IN (1, 2);
        """,
        // Retention: when a job ended, whether its blobs are deleted, and what is kept of deleted jobs.
        """
        ALTER TABLE jobs ADD COLUMN ended_ms INTEGER;
        ALTER TABLE jobs ADD COLUMN blobs_deleted INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN image_key TEXT;
        ALTER TABLE jobs ADD COLUMN audio_key TEXT;
        UPDATE jobs SET ended_ms = updated_ms WHERE status IN (3, 4, 5, 6);
        CREATE INDEX jobs_ended ON jobs(ended_ms) WHERE ended_ms IS NOT NULL;
        CREATE INDEX jobs_image_key ON jobs(image_key) WHERE blobs_deleted = 0;
        CREATE INDEX jobs_audio_key ON jobs(audio_key) WHERE blobs_deleted = 0;
        CREATE TABLE expired_jobs (
            id TEXT PRIMARY KEY,
            expired_ms INTEGER NOT NULL,
            data BLOB NOT NULL
        ) STRICT;
        CREATE INDEX expired_jobs_age ON expired_jobs(expired_ms);
        """,
        // Outgoing webhooks: when a job's pending delivery is due.
        """
        ALTER TABLE jobs ADD COLUMN webhook_due_ms INTEGER;
        CREATE INDEX jobs_webhook_due ON jobs(webhook_due_ms) WHERE webhook_due_ms IS NOT NULL;
        """,
    ]

    /// Opens (creating and migrating) the store at `path`.
    public init(path: String, clock: any WallClock = SystemWallClock()) throws {
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            let directory = String(path[..<slash])
            do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
                throw ServiceError(.storeUnavailable, "cannot create the job store's directory", cause: "\(directory): \(error)")
            }
        }
        let db = try SQLiteDatabase(path: path, exclusive: true)
        try Self.migrate(db)
        try db.execute("PRAGMA wal_autocheckpoint=0")
        let connection = Connection(db)
        self.connection = connection
        self.clock = clock
        checkpoints = Task.detached { [thread, lock] in
            while (try? await Task.sleep(nanoseconds: 500_000_000)) != nil {
                _ = try? await thread.run { _ in
                    lock.lock()
                    defer { lock.unlock() }
                    try connection.db?.execute("PRAGMA wal_checkpoint(PASSIVE)")
                }
            }
        }
    }

    deinit {
        checkpoints.cancel()
        lock.lock()
        connection.db = nil
        lock.unlock()
    }

    static func migrate(_ db: SQLiteDatabase) throws {
        let read = try db.prepare("PRAGMA user_version")
        _ = try read.step()
        let current = Int(read.int64(0))
        guard current <= migrations.count else {
            throw ServiceError(.storeUnavailable, "the job store's schema (version \(current)) is newer than this Dispatcher knows (\(migrations.count))")
        }
        for version in current..<migrations.count {
            try db.transaction {
                try db.execute(migrations[version])
                try db.execute("PRAGMA user_version = \(version + 1)")
            }
        }
    }

    private func withDatabase<T>(_ body: (SQLiteDatabase) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        guard let db = connection.db else { throw ServiceError(.storeUnavailable, "the job store is closed") }
        return try body(db)
    }

    public func create(_ record: JobRecord) async throws -> (record: JobRecord, created: Bool) {
        let now = clock.nowUnixMs()
        var record = record
        record.stamp(version: 1, at: now)
        let stamped = record
        return try withDatabase { db in
            try db.transaction {
                let job = stamped.job
                let key: String? = job.idempotencyKey.isEmpty ? nil : job.idempotencyKey
                if let key {
                    let existing = try db.prepare("SELECT data FROM jobs WHERE owner = ? AND idempotency_key = ?")
                    try existing.bind([job.owner, key])
                    if try existing.step() { return (JobRecord(stored: try Job(serializedBytes: existing.blob(0))), false) }
                }
                try db.prepare("""
                    INSERT INTO jobs (id, owner, idempotency_key, status, created_ms, updated_ms, version, data, image_key, audio_key)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """).run([job.id, job.owner, key, job.status.rawValue, job.createdAtUnixMs, job.updatedAtUnixMs, job.version,
                              job.serializedBytes(), job.imageKey, job.audioKey])
                return (stamped, true)
            }
        }
    }

    public func get(_ id: String) async throws -> JobRecord? {
        try withDatabase { db in
            let statement = try db.prepare("SELECT data FROM jobs WHERE id = ? UNION ALL SELECT data FROM expired_jobs WHERE id = ? LIMIT 1")
            try statement.bind([id, id])
            return try statement.step() ? JobRecord(stored: try Job(serializedBytes: statement.blob(0))) : nil
        }
    }

    /// One replica holds every job: `asHolder` changes nothing.
    public func update(_ record: JobRecord, asHolder: Bool) async throws -> JobRecord {
        let expected = record.job.version
        var record = record
        record.stamp(version: expected + 1, at: clock.nowUnixMs())
        let stamped = record
        return try withDatabase { db in
            let job = stamped.job
            let data = job.serializedBytes()
            let ended: Int64? = job.completedAtUnixMs > 0 ? job.completedAtUnixMs : nil
            let blobsDeleted = job.blobsDeletedAtUnixMs > 0 ? 1 : 0
            // Most writes (a chunk's progress) change no indexed column: setting only the row's
            // data then leaves every index page alone, and the WAL gets one page instead of five.
            try db.prepare("""
                UPDATE jobs SET updated_ms = ?, version = ?, data = ?
                WHERE id = ? AND version = ? AND status = ? AND ended_ms IS ? AND blobs_deleted = ? AND webhook_due_ms IS ?
                """)
                .run([job.updatedAtUnixMs, job.version, data, job.id, expected, job.status.rawValue, ended, blobsDeleted,
                      stamped.webhookDueUnixMs])
            if db.changes == 1 { return stamped }
            try db.prepare("""
                UPDATE jobs SET status = ?, updated_ms = ?, version = ?, data = ?, ended_ms = ?, blobs_deleted = ?, webhook_due_ms = ?
                WHERE id = ? AND version = ?
                """)
                .run([job.status.rawValue, job.updatedAtUnixMs, job.version, data, ended, blobsDeleted,
                      stamped.webhookDueUnixMs, job.id, expected])
            guard db.changes == 1 else {
                throw ServiceError(.storeConflict, "job \(job.id) changed since version \(expected)")
            }
            return stamped
        }
    }

    public func list(_ query: JobQuery) async throws -> (jobs: [Job], nextPageToken: String) {
        try withDatabase { db in
            var sql = "SELECT data FROM jobs WHERE owner = ?"
            var values: [Any?] = [query.owner]
            if let status = query.status {
                sql += " AND status = ?"
                values.append(status.rawValue)
            }
            if let after = query.after {
                sql += " AND (created_ms < ? OR (created_ms = ? AND id < ?))"
                values += [after.createdAtUnixMs, after.createdAtUnixMs, after.id]
            }
            sql += " ORDER BY created_ms DESC, id DESC LIMIT ?"
            values.append(query.pageSize + 1)
            let statement = try db.prepare(sql)
            try statement.bind(values)
            var jobs: [Job] = []
            while try statement.step() { jobs.append(try Job(serializedBytes: statement.blob(0))) }
            guard jobs.count > query.pageSize else { return (jobs, "") }
            jobs.removeLast()
            let last = jobs[jobs.count - 1]
            return (jobs, PageToken(createdAtUnixMs: last.createdAtUnixMs, id: last.id).text)
        }
    }

    public func claimUnfinished(limit: Int, running: Set<String>) async throws -> [String] {
        try withDatabase { db in
            let statement = try db.prepare("SELECT id FROM jobs WHERE status IN (1, 2) ORDER BY created_ms LIMIT ?")
            try statement.bind([limit + running.count])
            var ids: [String] = []
            while ids.count < limit, try statement.step() {
                let id = statement.text(0) ?? ""
                if !running.contains(id) { ids.append(id) }
            }
            return ids
        }
    }

    public func release(_ id: String) async throws {}

    public func jobsWithBlobs(endedBefore: Int64, limit: Int) async throws -> [JobRecord] {
        try withDatabase { db in
            let statement = try db.prepare("SELECT data FROM jobs WHERE ended_ms < ? AND blobs_deleted = 0 ORDER BY ended_ms LIMIT ?")
            try statement.bind([endedBefore, limit])
            var records: [JobRecord] = []
            while try statement.step() { records.append(JobRecord(stored: try Job(serializedBytes: statement.blob(0)))) }
            return records
        }
    }

    public func webhooksDue(at now: Int64, limit: Int) async throws -> [JobRecord] {
        try withDatabase { db in
            let statement = try db.prepare("SELECT data FROM jobs WHERE webhook_due_ms <= ? ORDER BY webhook_due_ms LIMIT ?")
            try statement.bind([now, limit])
            var records: [JobRecord] = []
            while try statement.step() { records.append(JobRecord(stored: try Job(serializedBytes: statement.blob(0)))) }
            return records
        }
    }

    public func inputInUse(_ key: String, except id: String) async throws -> Bool {
        try withDatabase { db in
            let statement = try db.prepare("""
                SELECT 1 FROM jobs WHERE id <> ?1 AND blobs_deleted = 0 AND (image_key = ?2 OR audio_key = ?2 OR image_key IS NULL) LIMIT 1
                """)
            try statement.bind([id, key])
            return try statement.step()
        }
    }

    public func expireJobs(endedBefore: Int64, tombstonesBefore: Int64, limit: Int) async throws -> Int {
        let now = clock.nowUnixMs()
        return try withDatabase { db in
            try db.transaction {
                try db.prepare("DELETE FROM expired_jobs WHERE expired_ms < ?").run([tombstonesBefore])
                let due = try db.prepare("SELECT data FROM jobs WHERE ended_ms < ? AND blobs_deleted = 1 ORDER BY ended_ms LIMIT ?")
                try due.bind([endedBefore, limit])
                var records: [JobRecord] = []
                while try due.step() { records.append(JobRecord(stored: try Job(serializedBytes: due.blob(0)))) }
                for record in records {
                    try db.prepare("INSERT OR REPLACE INTO expired_jobs (id, expired_ms, data) VALUES (?, ?, ?)")
                        .run([record.id, now, record.tombstone(at: now).serializedBytes()])
                    try db.prepare("DELETE FROM jobs WHERE id = ?").run([record.id])
                }
                return records.count
            }
        }
    }

    public func unfinishedCounts() async throws -> [JobStatus: Int] {
        try withDatabase { db in
            let statement = try db.prepare("SELECT status, count(*) FROM jobs WHERE status IN (1, 2) GROUP BY status")
            var counts: [JobStatus: Int] = [:]
            while try statement.step() { counts[JobStatus(rawValue: Int32(statement.int64(0)))] = Int(statement.int64(1)) }
            return counts
        }
    }

}
