import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

// Committing a job's changes one at a time, and calling Media and Audio through their brief outages.
extension JobRunner {
    /// Applies `change` to the current record and commits it; watchers see it once committed.
    /// Writes are one at a time. On a conflict the record is re-read: a job someone else ended
    /// (a cancel from another replica) ends this workflow; otherwise `change` is applied again
    /// when `retrying`.
    @discardableResult
    func save(retrying: Bool = true, _ change: (inout JobRecord, Int64) throws -> Void) async throws -> JobRecord {
        while saving { await withCheckedContinuation { saveWaiters.append($0) } }
        saving = true
        defer {
            saving = false
            if !saveWaiters.isEmpty { saveWaiters.removeFirst().resume() }
        }
        while true {
            var next = record
            let now = context.clock.nowUnixMs()
            try change(&next, now)
            next.recordChunkChanges(since: record, at: now)
            if next.job.webhook?.progress == true, next.status == .running, Self.completedChunks(next) > Self.completedChunks(record) {
                next.queueWebhook(JobRecord.progressEvent, at: now)
            }
            let estimate = context.throughput.estimate
            let concurrency = Int(next.job.options?.maxConcurrentChunks ?? 0)
            next.update { fields in
                fields.progress = JobProgress.progress(of: fields.job)
                fields.etaSeconds = JobProgress.eta(of: fields.job, estimate: estimate,
                                                    concurrency: concurrency > 0 ? concurrency : context.configuration.maxConcurrentChunks)
            }
            do {
                let previous = record.status
                let store = context.store, write = next
                record = try await TalkMeshTracer.shared.withSpan("jobstore.update") { span in
                    span.set("db.operation.name", "update")
                    span.set("talkmesh.job_version", write.job.version)
                    return try await store.update(write, asHolder: true)
                }
                context.events.publish(record.job)
                if record.status != previous {
                    context.counters.count(job: record.status)
                    if record.isTerminal {
                        context.counters.observe("job_duration", seconds: Double(record.job.completedAtUnixMs - record.job.createdAtUnixMs) / 1000)
                    }
                    logger.info("job state", metadata: ["status": "\(record.status)", "from": "\(previous)"])
                }
                return record
            } catch let error as ServiceError where error.code == .storeConflict {
                guard let stored = try await context.store.get(record.id) else { throw WorkflowEnd(reason: "the job is gone from the store") }
                record = stored
                // The other writer's version, for watchers here: its notice may have been taken
                // for this write's (the store marks a write as its own before sending it).
                context.events.publish(stored.job)
                if stored.isTerminal || !retrying {
                    throw WorkflowEnd(reason: "the job was changed elsewhere (\(stored.status))", endedElsewhere: stored.isTerminal)
                }
            } catch let error as ServiceError where error.code == .leaseLost {
                throw WorkflowEnd(reason: "lease lost: another replica holds the job")
            }
        }
    }

    static func completedChunks(_ record: JobRecord) -> Int {
        record.chunks.reduce(0) { $0 + ($1.status == .chunkCompleted ? 1 : 0) }
    }

    /// Media and Audio briefly unavailable are retried with backoff for `serviceRetrySeconds`.
    func callService<T: Sendable>(_ name: String, _ body: @Sendable () async throws -> T) async throws -> T {
        let started = context.clock.nowUnixMs()
        var delay = 0.2
        while true {
            do {
                return try await body()
            } catch let error as RPCError where [.unavailable, .resourceExhausted].contains(error.code)
                && Double(context.clock.nowUnixMs() - started) / 1000 < context.configuration.serviceRetrySeconds {
                logger.warning("service unavailable; retrying", metadata: ["call": "\(name)", "error": "\(error)"])
                try await Task.sleep(nanoseconds: UInt64(delay * 1e9))
                delay = min(delay * 2, 5)
            }
        }
    }
}

/// The workflow ends without a terminal state of its own making (another writer ended the job,
/// or this replica lost it).
struct WorkflowEnd: Error {
    let reason: String
    /// The job reached a terminal state another writer stored.
    var endedElsewhere = false
}

/// A chunk ran out of attempts.
struct ChunkExhausted: Error {
    let error: JobError
}

extension JobError {
    init(code: String, message: String) {
        self.init()
        self.code = code
        self.message = message
    }
}
