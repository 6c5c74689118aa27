import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages

/// How long what a job leaves behind is kept.
public struct RetentionConfiguration: Sendable {
    /// After a job ended, its blobs — the video, the uploads, anything left under `jobs/<id>/` —
    /// are deleted (`VIDEO_RETENTION`), milliseconds.
    public var blobsMs: Int64 = 6 * 3_600_000
    /// After a job ended, its row is deleted and a tombstone kept for as long again (`JOB_RETENTION`),
    /// milliseconds; never shorter than `blobsMs` (a row goes only once its blobs have).
    public var jobsMs: Int64 = 7 * 86_400_000
    /// How often a sweep runs (`RETENTION_SWEEP_INTERVAL`), seconds.
    public var intervalSeconds = 60.0
    /// Jobs handled per store call.
    public var batch = 100
    /// Store calls per kind in one sweep: a backlog is worked off over several sweeps.
    public var batchesPerSweep = 20

    public init() {}
}

/// What one sweep did (nothing when another replica holds the sweep).
public struct SweepResult: Sendable, Equatable {
    /// Jobs whose blobs were deleted.
    public var blobsDeleted = 0
    /// Jobs deleted (tombstones kept).
    public var jobsExpired = 0
}

/// The Dispatcher's retention: every `intervalSeconds` the replica that holds the sweep (through
/// the store: one at a time however many replicas run) deletes the blobs of jobs that ended more
/// than `blobsMs` ago and marks them so (watchers see it; the Gateway answers EXPIRED for the
/// video from then on), then deletes the rows of jobs that ended more than `jobsMs` ago, leaving
/// tombstones that `GetJob` answers. Every step is safe to repeat: a sweep cut off by a crash is
/// finished by the next, on this replica or another.
public struct RetentionSweeper: Sendable {
    public let context: DispatcherContext
    public let configuration: RetentionConfiguration

    public init(context: DispatcherContext, configuration: RetentionConfiguration) {
        self.context = context
        self.configuration = configuration
    }

    /// Sweeps until the task is cancelled; a failed sweep is logged and tried again next time.
    public func run() async {
        while !Task.isCancelled {
            do { _ = try await sweep() } catch {
                context.logger.warning("retention sweep failed; trying again", metadata: ["error": "\(error)"])
            }
            guard (try? await Task.sleep(nanoseconds: UInt64(configuration.intervalSeconds * 1e9))) != nil else { return }
        }
    }

    /// One sweep, if this replica holds (or takes) the sweep.
    public func sweep() async throws -> SweepResult {
        var result = SweepResult()
        // The claim outlives a few intervals: the holder renews it each time, a dead one's lapses.
        guard try await context.store.claimSweep(seconds: max(1, configuration.intervalSeconds * 3)) else { return result }
        context.counters.count(event: "retention_sweeps")
        let now = context.clock.nowUnixMs()
        for _ in 0..<configuration.batchesPerSweep {
            let due = try await context.store.jobsWithBlobs(endedBefore: now - configuration.blobsMs, limit: configuration.batch)
            for record in due where try await deleteBlobs(of: record, at: now) { result.blobsDeleted += 1 }
            if due.count < configuration.batch { break }
        }
        for _ in 0..<configuration.batchesPerSweep {
            let expired = try await context.store.expireJobs(endedBefore: now - configuration.jobsMs,
                                                             tombstonesBefore: now - configuration.jobsMs, limit: configuration.batch)
            result.jobsExpired += expired
            if expired < configuration.batch { break }
        }
        if result.blobsDeleted > 0 || result.jobsExpired > 0 {
            context.counters.count(event: "retention_blobs_deleted", by: result.blobsDeleted)
            context.counters.count(event: "retention_jobs_expired", by: result.jobsExpired)
            context.logger.info("retention sweep", metadata: ["blobs_deleted": "\(result.blobsDeleted)", "jobs_expired": "\(result.jobsExpired)"])
        }
        return result
    }

    /// Deletes every blob of an ended job, then records it; false when the record changed meanwhile
    /// (the next sweep sees it again) or a blob could not be deleted.
    private func deleteBlobs(of record: JobRecord, at now: Int64) async throws -> Bool {
        let job = record.job
        let blobs = context.blobs
        do {
            // The uploads, unless another job still uses one (gRPC callers may name an upload twice).
            var inputs: [String] = []
            for key in Set([job.imageKey, job.audioKey]) where !key.isEmpty {
                if try await !context.store.inputInUse(key, except: job.id) { inputs.append(key) }
            }
            try await context.blobIO.run { [inputs] _ in
                var keys = Set([job.videoKey, job.resizedImageKey, job.encodedAudioKey].filter { !$0.isEmpty } + inputs)
                for chunk in job.chunks { keys.formUnion([chunk.audioKey, chunk.videoKey].filter { !$0.isEmpty }) }
                keys.formUnion(try blobs.list(prefix: "jobs/\(job.id)/").map(\.key.rawValue))
                for key in keys.sorted() { try blobs.delete(try BlobKey(key)) }
            }
        } catch {
            context.logger.warning("retention: could not delete a job's blobs", metadata: ["job_id": "\(job.id)", "error": "\(error)"])
            return false
        }
        var marked = record
        try marked.markBlobsDeleted(at: now)
        do {
            let stored = try await context.store.update(marked)
            context.events.publish(stored.job)
            return true
        } catch let error as ServiceError where error.code == .storeConflict {
            return false
        }
    }
}
