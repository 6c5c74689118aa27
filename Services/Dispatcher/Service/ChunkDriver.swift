import Foundation
import Logging
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// One chunk through RunPod: submit (the decision committed first), poll by the throughput
/// RunPod shows, store the partial video, retry what failed. It holds one deployment-wide
/// in-flight slot from before its submission until the chunk ends.
struct ChunkDriver {
    let runner: JobRunner
    let index: Int
    /// The span of the attempt in flight (`runpod.chunk`): from its `/run` to its end, with the
    /// RunPod job id, queue delay, execution time and worker; its RunPod requests are its children.
    private let attempt = AttemptSpan()

    init(runner: JobRunner, index: Int) {
        self.runner = runner
        self.index = index
    }

    private var context: DispatcherContext { runner.context }

    /// The slot is given back when the chunk completes. A chunk that stops otherwise keeps it
    /// until its job's end has cancelled what RunPod still runs (`JobRunner`), or — handed over
    /// to another replica — for the new owner.
    func run() async throws {
        // An attempt still open when the driver stops (the job ended, or was handed over) ends here.
        defer { attempt.finish(nil, error: "the chunk's driver stopped (the job ended or another replica took it)") }
        var holdsSlot = false
        let job = await runner.record.id
        var wait = 0.0
        var transientFailures = 0
        var submitRefused = false
        while true {
            try Task.checkCancellation()
            let record = await runner.record
            let chunk = record.chunks[index]
            if !holdsSlot && chunk.status != .chunkCompleted {
                try await context.slots.acquire(job: job, chunk: index)
                holdsSlot = true
            }
            switch chunk.status {
            case .chunkCompleted:
                if holdsSlot { await context.slots.release(job: job, chunk: index) }
                return
            case .chunkPending, .chunkFailed, .chunkSubmitting:
                submitRefused = try await submit(chunk, job: record.job, again: submitRefused)
                // The /run answer said IN_QUEUE: the first poll is planned like any queued one.
                wait = webhook(for: record.job) != nil ? context.configuration.runpodWebhookPollSeconds
                    : submitRefused ? 0
                    : context.planner.next(running: false, executionMs: nil, audioSeconds: chunk.durationSec,
                                           estimate: context.throughput.estimate, previous: 0)
            case .chunkSubmitted, .chunkRunning:
                if webhook(for: record.job) != nil {
                    try await runner.wait(chunk: index, seconds: wait)
                } else {
                    try await context.pollTimer.sleep(seconds: wait)
                }
                let status: RunPodJob
                if attempt.span == nil { attempt.begin(index: index, number: chunk.attempts, runpodJobID: chunk.runpodJobId, resumed: true) }
                do {
                    status = try await TalkMeshTracer.shared.within(attempt.span) { try await context.runpod.status(chunk.runpodJobId) }
                    transientFailures = 0
                } catch let error as ServiceError where error.code == .runpodJobExpired {
                    // RunPod says the job is gone: the only case in which a chunk is submitted again.
                    try await failOrRetry(chunk, JobError(code: error.code.rawValue, message: error.message), canRetryInPlace: false)
                    continue
                } catch let error as ServiceError where error.code == .runpodUnavailable {
                    transientFailures += 1
                    runner.logger.warning("RunPod status unavailable; polling on", metadata: ["chunk": "\(index)", "error": "\(error)"])
                    wait = min(10, 0.5 * Double(transientFailures))
                    continue
                }
                wait = try await handle(status, chunk: chunk, previousWait: wait)
            default:
                throw ServiceError(.illegalTransition, "chunk \(index) is \(chunk.status)")
            }
        }
    }

    /// Commits SUBMITTING, calls `/run`, commits the RunPod id. A chunk found SUBMITTING again
    /// (the process died between `/run` and the commit) is the one case that may pay twice; it is
    /// logged and counted.
    /// Returns true when RunPod was unavailable (the chunk stays SUBMITTING, to be sent again).
    private func submit(_ chunk: JobChunk, job: Job, again: Bool) async throws -> Bool {
        let attempts = context.configuration.chunkMaxAttempts
        if chunk.status == .chunkSubmitting && again {
            // The last /run never got an answer from RunPod; no attempt is counted for it.
        } else if chunk.status == .chunkSubmitting {
            context.counters.count(event: "chunk_resubmitted_after_crash")
            runner.logger.warning("chunk was being submitted when the Dispatcher stopped; submitting again", metadata: ["chunk": "\(index)"])
        } else {
            if chunk.status == .chunkFailed && chunk.attempts >= attempts {
                throw ChunkExhausted(error: chunk.error ?? JobError(code: ErrorCode.runpodJobFailed.rawValue, message: "chunk \(index) failed"))
            }
            try await runner.save { record, _ in
                try record.moveChunk(index, to: .chunkSubmitting) { $0.attempts += 1; $0.runpodJobID = "" }
            }
        }
        var input = try await readInput(chunk, job: job)
        input.forceOffload = job.options?.forceOffload ?? false
        let submitted: RunPodJob
        if attempt.span == nil { attempt.begin(index: index, number: (await runner.record).chunks[index].attempts, runpodJobID: nil, resumed: false) }
        do {
            submitted = try await TalkMeshTracer.shared.within(attempt.span) {
                try await context.runpod.submit(input, executionTimeoutMs: context.configuration.runpodExecutionTimeoutMs, webhook: webhook(for: job))
            }
            attempt.span?.set("runpod.job_id", submitted.id)
        } catch let error as ServiceError where error.code == .runpodUnavailable {
            // Still SUBMITTING: the next turn submits again without counting an attempt.
            runner.logger.warning("RunPod /run unavailable; trying again", metadata: ["chunk": "\(index)", "error": "\(error)"])
            try await Task.sleep(nanoseconds: 1_000_000_000)
            return true
        }
        context.counters.count(event: "runpod_submissions")
        try await runner.save { record, now in
            try record.moveChunk(index, to: .chunkSubmitted) {
                $0.runpodJobID = submitted.id
                $0.submittedAtUnixMs = now
            }
        }
        runner.logger.debug("chunk submitted", metadata: ["chunk": "\(index)", "runpod_job_id": "\(submitted.id)"])
        return false
    }

    /// Where RunPod posts this chunk's completion: `<RUNPOD_WEBHOOK_BASE_URL>/<job>/<chunk>/<secret>`;
    /// nil without a base URL (or for a job created before one was set).
    private func webhook(for job: Job) -> String? {
        guard let base = context.configuration.runpodWebhookBaseURL, !job.runpodWebhookSecret.isEmpty else { return nil }
        return "\(base)/\(job.id)/\(index)/\(job.runpodWebhookSecret)"
    }

    /// The resized image and the chunk's audio, as RunPod's worker takes them: presigned URLs when
    /// the store has them (S3; no 10 MB body ceiling, a request of a few hundred bytes), else base64.
    private func readInput(_ chunk: JobChunk, job: Job) async throws -> InfiniteTalkInput {
        if context.configuration.runpodInputURLs {
            let seconds = context.configuration.runpodInputURLSeconds
            if let image = context.blobs.presignedURL(try BlobKey(job.resizedImageKey), expiresSeconds: seconds),
               let wav = context.blobs.presignedURL(try BlobKey(chunk.audioKey), expiresSeconds: seconds) {
                context.counters.count(event: "runpod_inputs_by_url")
                return InfiniteTalkInput(prompt: job.prompt, imageURL: image, wavURL: wav, width: Int(job.width), height: Int(job.height))
            }
        }
        let image = try await runner.imageBase64()
        let key = try BlobKey(chunk.audioKey)
        let wav = try await context.blobCall { try $0.get(key) }
        return InfiniteTalkInput(prompt: job.prompt, imageBase64: image, wav: wav, width: Int(job.width), height: Int(job.height))
    }

    /// Acts on one status answer; returns the wait before the next poll.
    private func handle(_ status: RunPodJob, chunk: JobChunk, previousWait: Double) async throws -> Double {
        context.counters.count(event: status.status.pollEvent)
        switch status.status {
        case .inQueue, .inProgress, .running:
            let running = status.status != .inQueue
            if running && chunk.status == .chunkSubmitted {
                try await runner.save { record, _ in
                    try record.moveChunk(index, to: .chunkRunning) { $0.queueDelayMs = Int64(status.delayTimeMs ?? 0) }
                }
            }
            // With RunPod's webhook the poll is only the safety net.
            if webhook(for: await runner.record.job) != nil { return context.configuration.runpodWebhookPollSeconds }
            let queued = chunk.submittedAtUnixMs > 0 ? Double(context.clock.nowUnixMs() - chunk.submittedAtUnixMs) / 1000 : 0
            return context.planner.next(running: running, executionMs: status.executionTimeMs.map(Int64.init),
                                        audioSeconds: chunk.durationSec, estimate: context.throughput.estimate, previous: previousWait,
                                        queuedSeconds: max(0, queued))
        case .completed where status.failure == nil:
            let key = "jobs/\((await runner.record).id)/parts/\(String(format: "%04d", index)).mp4"
            try await context.runpod.storeVideo(of: status, in: context.blobs, as: try BlobKey(key), io: context.blobIO)
            let delay = Int64(status.delayTimeMs ?? 0), execution = Int64(status.executionTimeMs ?? 0)
            context.throughput.record(audioSeconds: chunk.durationSec, queueDelayMs: delay, executionMs: execution)
            context.counters.count(event: "chunks_completed")
            attempt.finish(status, error: nil)
            context.counters.observe("runpod_queue_delay", seconds: Double(delay) / 1000)
            context.counters.observe("runpod_execution", seconds: Double(execution) / 1000)
            try await runner.save { record, now in
                try record.moveChunk(index, to: .chunkCompleted) {
                    $0.videoKey = key
                    $0.finishedAtUnixMs = now
                    $0.queueDelayMs = delay
                    $0.executionMs = execution
                    $0.error = nil
                }
            }
            // A completed chunk is never submitted again: its audio goes now (the job's end would
            // delete it), and in a local store its file becomes the next partial video's.
            if let audio = try? BlobKey(chunk.audioKey) {
                do { try await context.blobCall { try $0.retire(audio) } } catch {
                    runner.logger.debug("could not delete a rendered chunk's audio yet", metadata: ["chunk": "\(index)", "error": "\(error)"])
                }
            }
            return 0
        default:
            let failure = status.failure ?? ServiceError(.runpodJobFailed, "RunPod ended the job \(status.status.rawValue)")
            let inPlace = status.status == .failed || status.status == .timedOut
            try await failOrRetry(chunk, JobError(code: failure.code.rawValue, message: failure.message), canRetryInPlace: inPlace)
            return 0
        }
    }

    /// Another attempt while attempts remain: RunPod's `/retry` (same id) for FAILED/TIMED_OUT,
    /// else a new submission; out of attempts, the chunk fails and takes the job with it.
    private func failOrRetry(_ chunk: JobChunk, _ error: JobError, canRetryInPlace: Bool) async throws {
        context.counters.count(event: "chunks_failed_attempts")
        attempt.finish(nil, error: "\(error.code): \(error.message)")
        runner.logger.warning("chunk attempt failed", metadata: ["chunk": "\(index)", "attempt": "\(chunk.attempts)", "code": "\(error.code)"])
        guard chunk.attempts < context.configuration.chunkMaxAttempts else {
            try await runner.save { record, now in
                try record.moveChunk(index, to: .chunkFailed) { $0.error = error; $0.finishedAtUnixMs = now }
            }
            throw ChunkExhausted(error: JobError(code: error.code, message: "chunk \(index) failed \(chunk.attempts) times: \(error.message)"))
        }
        if canRetryInPlace {
            do {
                _ = try await context.runpod.retry(chunk.runpodJobId)
                try await runner.save { record, now in
                    try record.moveChunk(index, to: .chunkSubmitted) { $0.attempts += 1; $0.error = error; $0.submittedAtUnixMs = now }
                }
                return
            } catch let retryError as ServiceError where retryError.code == .runpodJobExpired || retryError.code == .runpodBadResponse {
                // Not retryable in place any more: a new submission below.
            }
        }
        try await runner.save { record, _ in
            try record.moveChunk(index, to: .chunkFailed) { $0.error = error }
        }
    }
}

/// The span of a chunk's attempt in flight, across the driver's turns.
final class AttemptSpan: @unchecked Sendable {
    private(set) var span: TalkMeshSpan?

    func begin(index: Int, number: Int32, runpodJobID: String?, resumed: Bool) {
        let span = TalkMeshTracer.shared.start("runpod.chunk")
        if span.isRecording {
            span.set("talkmesh.chunk", Int64(index))
            span.set("talkmesh.attempt", Int64(number))
            if let runpodJobID, !runpodJobID.isEmpty { span.set("runpod.job_id", runpodJobID) }
            if resumed { span.set("talkmesh.resumed", true) }
        }
        self.span = span
    }

    /// Ends the attempt: with RunPod's timings when it completed, as failed otherwise.
    func finish(_ status: RunPodJob?, error: String?) {
        guard let span else { return }
        self.span = nil
        if let status, span.isRecording {
            span.set("runpod.job_id", status.id)
            span.set("runpod.queue_delay_ms", Int64(status.delayTimeMs ?? 0))
            span.set("runpod.execution_ms", Int64(status.executionTimeMs ?? 0))
            if let worker = status.workerID { span.set("runpod.worker_id", worker) }
        }
        if let error { span.fail(error) } else { span.end() }
    }
}
