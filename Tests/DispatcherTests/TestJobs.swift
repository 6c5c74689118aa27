import Testing
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshDispatcherService

/// A new job record as the stores' tests create it.
func newJobRecord(owner: String = "o", key: String = "", created: Int64 = 1) -> JobRecord {
    var job = Job()
    job.id = JobID.make()
    job.owner = owner
    job.idempotencyKey = key
    job.createdAtUnixMs = created
    return JobRecord(new: job)
}

/// The retention rules every `JobStore` keeps. `now` is the store clock's time (a tombstone's
/// `expired_at`); jobs end at 100 and 500 (Unix ms), so the cutoffs below are the store's only input.
func checkRetentionRules(_ store: any JobStore, now: Int64) async throws {
    let open = try await store.create(newJobRecord(owner: "r", created: 1)).record
    func ended(created: Int64, at end: Int64) async throws -> JobRecord {
        var record = try await store.create(newJobRecord(owner: "r", created: created)).record
        try record.move(to: .running, at: created + 1)
        let id = record.id
        record.update { $0.videoKey = "jobs/\(id)/video.mp4" }
        record = try await store.update(record)
        try record.move(to: .completed, at: end)
        return try await store.update(record)
    }
    var early = try await ended(created: 2, at: 100)
    let late = try await ended(created: 3, at: 500)
    // Only ended jobs whose blobs exist, ended before the cutoff, oldest first, `limit` at most.
    #expect(try await store.jobsWithBlobs(endedBefore: 200, limit: 10).map(\.id) == [early.id])
    #expect(try await store.jobsWithBlobs(endedBefore: 1_000, limit: 10).map(\.id) == [early.id, late.id])
    #expect(try await store.jobsWithBlobs(endedBefore: 1_000, limit: 1).map(\.id) == [early.id])
    // A job is deleted only after its blobs.
    #expect(try await store.expireJobs(endedBefore: 1_000, tombstonesBefore: 0, limit: 10) == 0)
    var unfinished = open
    #expect(throws: ServiceError.self) { try unfinished.markBlobsDeleted(at: 150) }
    try early.markBlobsDeleted(at: 150)
    early = try await store.update(early)
    #expect(try await store.jobsWithBlobs(endedBefore: 1_000, limit: 10).map(\.id) == [late.id])
    #expect(try await store.expireJobs(endedBefore: 200, tombstonesBefore: 0, limit: 10) == 1)
    #expect(try await store.expireJobs(endedBefore: 1_000, tombstonesBefore: 0, limit: 10) == 0)
    // What is kept: owner, status and times, nothing of the content; listing no longer shows it.
    let kept = try #require(try await store.get(early.id))
    #expect(kept.job.expiredAtUnixMs == now && kept.job.owner == "r" && kept.status == .completed)
    #expect(kept.job.completedAtUnixMs == 100 && kept.job.blobsDeletedAtUnixMs == 150 && kept.job.videoKey.isEmpty)
    #expect(try await store.list(JobQuery(owner: "r")).jobs.map(\.id) == [late.id, open.id])
    #expect(try await store.get(late.id)?.job.expiredAtUnixMs == 0)
    // An upload two jobs name stays until neither needs it.
    func sharing(_ image: String) async throws -> JobRecord {
        var job = newJobRecord(owner: "s", created: 7).job
        job.imageKey = image
        job.audioKey = "uploads/k/audio.wav"
        return try await store.create(JobRecord(new: job)).record
    }
    let first = try await sharing("uploads/k/image.png"), second = try await sharing("uploads/k/other.png")
    #expect(try await store.inputInUse("uploads/k/image.png", except: first.id) == false)
    #expect(try await store.inputInUse("uploads/k/audio.wav", except: first.id))
    #expect(try await store.inputInUse("uploads/k/audio.wav", except: second.id))
    var cancelled = second
    try cancelled.move(to: .cancelled, at: 8)
    try cancelled.markBlobsDeleted(at: 9)
    _ = try await store.update(cancelled)
    #expect(try await store.inputInUse("uploads/k/audio.wav", except: first.id) == false)
    // Tombstones go in their turn.
    #expect(try await store.expireJobs(endedBefore: 0, tombstonesBefore: now, limit: 10) == 0)
    #expect(try await store.get(early.id) != nil)
    _ = try await store.expireJobs(endedBefore: 0, tombstonesBefore: now + 1, limit: 10)
    #expect(try await store.get(early.id) == nil)
}

/// The webhook queue every `JobStore` keeps: a job's pending delivery is found when due, in due
/// order, and no longer once it is cleared.
func checkWebhookQueue(_ store: any JobStore) async throws {
    func withWebhook(_ created: Int64) -> JobRecord {
        var record = newJobRecord(owner: "w", created: created)
        var job = record.job
        job.webhook = JobWebhook()
        job.webhook!.url = "https://example.com/hook"
        record = JobRecord(new: job)
        return record
    }
    var first = try await store.create(withWebhook(1)).record
    var second = try await store.create(withWebhook(2)).record
    _ = try await store.create(newJobRecord(owner: "w", created: 3))  // no webhook: never due
    #expect(try await store.webhooksDue(at: 10_000, limit: 10).isEmpty)
    try first.move(to: .running, at: 10)
    try first.move(to: .completed, at: 500)
    first = try await store.update(first)
    try second.move(to: .running, at: 10)
    try second.move(to: .failed, at: 300)
    second = try await store.update(second)
    #expect(try await store.webhooksDue(at: 299, limit: 10).isEmpty)
    #expect(try await store.webhooksDue(at: 10_000, limit: 10).map(\.id) == [second.id, first.id])
    #expect(try await store.webhooksDue(at: 400, limit: 10).map(\.id) == [second.id])
    #expect(try await store.webhooksDue(at: 10_000, limit: 1).map(\.id) == [second.id])
    #expect(second.job.webhook?.pendingEvent == "job.failed")
    second.updateWebhook { $0.pendingEvent = ""; $0.dueUnixMs = 0 }
    second = try await store.update(second)
    first.updateWebhook { $0.dueUnixMs = 20_000 }  // a claim or a backoff moves it later
    first = try await store.update(first)
    #expect(try await store.webhooksDue(at: 10_000, limit: 10).isEmpty)
    #expect(try await store.webhooksDue(at: 20_000, limit: 10).map(\.id) == [first.id])
}
