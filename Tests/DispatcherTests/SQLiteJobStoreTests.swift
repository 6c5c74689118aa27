import Foundation
import TalkMeshBase
import Testing
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshDispatcherService

/// A clock the test moves.
final class ManualClock: WallClock, @unchecked Sendable {
    var now: Int64 = 1_000
    func nowUnixMs() -> Int64 { now }
}

@Suite struct SQLiteJobStoreTests {
    let directory: String
    let clock = ManualClock()

    init() {
        directory = NSTemporaryDirectory() + "talkmesh-jobstore-\(UUID().uuidString)"
    }

    func store() throws -> SQLiteJobStore { try SQLiteJobStore(path: directory + "/nested/jobs.db", clock: clock) }

    func newJob(owner: String = "o", key: String = "", created: Int64 = 1) -> JobRecord {
        newJobRecord(owner: owner, key: key, created: created)
    }

    @Test func writesAreCompareAndSwapOnTheVersion() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let (created, isNew) = try await store.create(newJob(created: 1))
        #expect(isNew && created.job.version == 1)
        var first = created, second = created
        try first.move(to: .running, at: 2)
        let stored = try await store.update(first)
        #expect(stored.job.version == 2)
        try second.move(to: .cancelled, at: 3)
        await #expect(throws: ServiceError.self) { _ = try await store.update(second) }
        #expect(try await store.get(created.id)?.status == .running)
    }

    @Test func writesLandInTheWALAndTheBackgroundCheckpointMovesThemIntoTheFile() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        func size(_ suffix: String) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: directory + "/nested/jobs.db" + suffix))?[.size] as? Int) ?? 0
        }
        let before = size("")
        for index in 0..<200 {
            var record = try await store.create(newJob(created: Int64(index))).record
            try record.move(to: .running, at: 2)
            _ = try await store.update(record)
        }
        // The writer never checkpoints: right after the writes, the rows are in the WAL only
        // (a checkpoint may have started, but 200 rows of several pages are not copied yet).
        #expect(size("-wal") > 200 * 1024)
        var grown = false
        for _ in 0..<100 where !grown {
            try await Task.sleep(nanoseconds: 50_000_000)
            grown = size("") > before + 32 * 1024
        }
        #expect(grown)
        #expect(try await store.list(JobQuery(owner: "o", status: .running, pageSize: 500)).jobs.count == 200)
    }

    @Test func theFileIsHeldByOneStoreAtATime() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var first: SQLiteJobStore? = try store()
        let created = try await first!.create(newJob()).record
        // A second Dispatcher on the same file is refused (after SQLite's busy wait) …
        #expect(throws: ServiceError.self) { _ = try self.store() }
        // … and takes it over once the first closed it, finding what the first wrote.
        first = nil
        #expect(try await store().get(created.id)?.id == created.id)
    }

    @Test func pendingWebhooksAreFoundWhenDue() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await checkWebhookQueue(try store())
    }

    @Test func retentionDeletesBlobsThenJobsAndKeepsTombstones() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        clock.now = 9_000
        try await checkRetentionRules(try store(), now: 9_000)
    }

    /// A store written by the first schema: its ended jobs are found by retention after the upgrade.
    @Test func theRetentionMigrationDatesJobsThatEndedBefore() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var record = newJob(created: 1)
        try record.move(to: .failed, at: 2)
        record.stamp(version: 3, at: 40)
        let job = record.job
        do {  // closed before the store opens the file (it holds it exclusively)
            let db = try SQLiteDatabase(path: directory + "/old.db")
            try db.execute(SQLiteJobStore.migrations[0] + "PRAGMA user_version = 1;")
            try db.prepare("INSERT INTO jobs (id, owner, idempotency_key, status, created_ms, updated_ms, version, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
                .run([job.id, job.owner, nil, job.status.rawValue, job.createdAtUnixMs, job.updatedAtUnixMs, job.version, job.serializedBytes()])
        }
        let store = try SQLiteJobStore(path: directory + "/old.db", clock: clock)
        #expect(try await store.jobsWithBlobs(endedBefore: 41, limit: 10).map(\.id) == [job.id])
        #expect(try await store.jobsWithBlobs(endedBefore: 40, limit: 10).isEmpty)
    }

    @Test func anIdempotencyKeyFindsTheFirstJobPerOwner() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        let first = try await store.create(newJob(owner: "a", key: "k", created: 1))
        let again = try await store.create(newJob(owner: "a", key: "k", created: 2))
        let other = try await store.create(newJob(owner: "b", key: "k", created: 3))
        #expect(first.created && !again.created && other.created)
        #expect(again.record.id == first.record.id && other.record.id != first.record.id)
    }

    @Test func listingPagesNewestFirstAndFilters() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try store()
        var ids: [String] = []
        for created in [5, 1, 3, 3, 9] as [Int64] { ids.append(try await store.create(newJob(created: created)).record.id) }
        var record = try #require(try await store.get(ids[4]))
        try record.move(to: .failed, at: 10)
        _ = try await store.update(record)
        var seen: [Job] = []
        var query = JobQuery(owner: "o", pageSize: 2)
        while true {
            let page = try await store.list(query)
            seen += page.jobs
            guard !page.nextPageToken.isEmpty else { break }
            query.after = try PageToken(parsing: page.nextPageToken)
        }
        #expect(seen.map(\.createdAtUnixMs) == [9, 5, 3, 3, 1])
        #expect(Set(seen.map(\.id)).count == 5)
        #expect(try await store.list(JobQuery(owner: "o", status: .failed)).jobs.map(\.id) == [ids[4]])
        #expect(try await store.list(JobQuery(owner: "nobody")).jobs.isEmpty)
        #expect(throws: ServiceError.self) { try PageToken(parsing: "12.x; DROP TABLE jobs") }
    }

    @Test func unfinishedJobsSurviveReopening() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var ids: [String] = []
        do {
            let store = try store()
            for created in 1...3 as ClosedRange<Int64> { ids.append(try await store.create(newJob(created: created)).record.id) }
            var done = try #require(try await store.get(ids[1]))
            try done.move(to: .cancelled, at: 4)
            _ = try await store.update(done)
        }
        let reopened = try store()
        #expect(try await reopened.claimUnfinished(limit: 10, running: []) == [ids[0], ids[2]])
        #expect(try await reopened.claimUnfinished(limit: 10, running: [ids[0]]) == [ids[2]])
        #expect(try await reopened.get(ids[1])?.status == .cancelled)
    }

    @Test func aNewerSchemaIsRefused() async throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try store()
        let db = try SQLiteDatabase(path: directory + "/nested/jobs.db")
        try db.execute("PRAGMA user_version = 99")
        #expect(throws: ServiceError.self) { _ = try store() }
    }
}

/// A monotonic clock the test moves: a sleep advances it by what was asked and returns at once.
final class ManualTicks: TickSource {
    private let now = Locked<Int64>(1_000_000_000)
    let sleeps = Locked(0)

    func nanoseconds() -> Int64 { now.withLock { $0 } }

    func sleep(nanoseconds: Int64) async throws {
        try Task.checkCancellation()
        sleeps.withLock { $0 += 1 }
        now.withLock { $0 += max(0, nanoseconds) }
        await Task.yield()
    }
}
