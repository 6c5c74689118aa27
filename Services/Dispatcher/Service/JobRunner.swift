import Foundation
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// Drives one job from wherever its stored state says it is to a terminal state: resize, split,
/// chunks on RunPod (bounded, retried), stitch. Every step is committed before the next depends
/// on it, so a new runner on the same record — after a restart or on another replica — carries
/// on without submitting a chunk RunPod still knows.
public actor JobRunner {
    /// Why a job stops before its workflow ends: it ends (`cancelled`, `timedOut`), or another
    /// replica now holds it (`handedOver`: nothing is cancelled, nothing released).
    public enum StopReason: Sendable { case cancelled, timedOut, handedOver }

    let context: DispatcherContext
    var record: JobRecord  // internal: saved in JobRunner+Storing.swift
    private var stopReason: StopReason?
    private var workflow: Task<Void, Never>?
    private var finishedWaiters: [CheckedContinuation<JobRecord, Never>] = []
    private var finished = false
    var saving = false
    var saveWaiters: [CheckedContinuation<Void, Never>] = []
    /// Chunks waiting between polls (RunPod webhooks end the wait), and chunks rung while not waiting.
    private var bells: [Int: CheckedContinuation<Void, Never>] = [:]
    private var rung: Set<Int> = []
    /// The resized image in base64, read and encoded once for all of the job's submissions.
    private var encodedImage: (key: String, base64: String)?
    let logger: Logger

    init(record: JobRecord, context: DispatcherContext) {
        self.record = record
        self.context = context
        var logger = context.logger
        logger[metadataKey: "job_id"] = "\(record.id)"
        if let trace = TraceContext.parse(traceparent: record.job.traceparent) { logger[metadataKey: "trace_id"] = "\(trace.traceID)" }
        self.logger = logger
    }

    /// Starts the workflow; `onEnd` runs once it reached a terminal state or lost the job.
    /// The workflow is a span of the job's trace (a child of the `CreateJob` call that made it), so
    /// one trace holds the job however many replicas and restarts drive it: a job resumed after a
    /// restart or a hand-over gets a `job.resume` span, a child of that call's span (long ended,
    /// in another process) and linked to it.
    func start(resumed: Bool = false, onEnd: @escaping @Sendable (String) async -> Void) {
        var trace = TraceContext.parse(traceparent: record.job.traceparent)
        trace?.traceState = TraceContext.validTraceState(record.job.tracestate)
        let id = record.id
        // On the workflow thread, with its chunk drivers (child tasks keep the preference).
        workflow = Task(executorPreference: context.workflowExecutor) {
            try? await TalkMeshTracer.shared.withSpan(resumed ? "job.resume" : "job.workflow", parent: trace) { span in
                span.set("talkmesh.job_id", id)
                if resumed, let trace { span.addLink(trace, attributes: ["talkmesh.link": "created_by"]) }
                await self.runToEnd()
                span.set("talkmesh.job_status", "\(await self.record.status)")
            }
            await onEnd(id)
        }
    }

    /// Stops the job (`CancelJob`, `JOB_TIMEOUT`) and waits until its final state is stored.
    func stop(_ reason: StopReason) async -> JobRecord {
        if !finished {
            if stopReason == nil { stopReason = reason }
            workflow?.cancel()
        }
        return await ended()
    }

    /// Another replica claimed the job (this one's lease expired): stop driving it, touching
    /// nothing — the new owner carries on from the stored state.
    func handOver() {
        guard !finished, stopReason == nil else { return }
        stopReason = .handedOver
        workflow?.cancel()
    }

    /// Waits until the workflow has ended.
    func ended() async -> JobRecord {
        if finished { return record }
        return await withCheckedContinuation { finishedWaiters.append($0) }
    }

    // MARK: The workflow

    private func runToEnd() async {
        let deadline = record.job.deadlineUnixMs
        // On the poll timer, not `Task.sleep`: no libdispatch timer armed and cancelled per job.
        // A sleep is at most a day; the loop also follows the wall clock the deadline is kept in.
        let watchdog = Task(executorPreference: context.workflowExecutor) { [context] in
            while case let wait = deadline - context.clock.nowUnixMs(), wait > 0 {
                try await context.pollTimer.sleep(seconds: Double(wait) / 1000)
            }
            await self.timeUp()
        }
        defer { watchdog.cancel() }
        do {
            try await runWorkflow()
            await context.slots.releaseAll(job: record.id)
        } catch let error as WorkflowEnd {
            if error.endedElsewhere {
                // Ended by another replica (a cancel), found by this replica's own write before
                // (or instead of) the notice: what RunPod still runs for it is cancelled here.
                logger.info("job ended by another replica", metadata: ["status": "\(record.status)", "reason": "\(error.reason)"])
                await Task(executorPreference: context.workflowExecutor) { await self.cleanUp() }.value
            } else {
                logger.info("job no longer driven here", metadata: ["reason": "\(error.reason)"])
            }
        } catch where stopReason == .handedOver {
            logger.warning("job handed over: another replica holds it now")
        } catch {
            // The workflow's task may be cancelled (that is how it was stopped): the cleanup runs
            // in a task of its own so its RunPod calls and store writes are not cancelled too.
            let failure = Self.jobError(error)
            await Task(executorPreference: context.workflowExecutor) { await self.finish(failure: failure) }.value
        }
        markFinished()
    }

    private func timeUp() {
        guard !finished, stopReason == nil else { return }
        stopReason = .timedOut
        workflow?.cancel()
    }

    private func markFinished() {
        finished = true
        for waiter in finishedWaiters { waiter.resume(returning: record) }
        finishedWaiters.removeAll()
    }

    private func runWorkflow() async throws {
        if record.isTerminal { return }
        if record.status == .inQueue {
            try await save { record, now in
                try record.move(to: .running, at: now)
                record.update { $0.stage = .stagePreparing }
            }
        }
        try await TalkMeshTracer.shared.withSpan("job.prepare") { _ in try await prepare() }
        if record.job.options?.dryRun == true {
            try await save { record, now in try record.move(to: .completed, at: now) }
            await deleteIntermediates()
            return
        }
        try await save { record, _ in record.update { $0.stage = .stageRendering } }
        // The original audio becomes AAC while RunPod works, so the stitch after the last chunk
        // only muxes instead of encoding the whole track on the critical path.
        async let encodedAudio = encodeAudioTrack()
        try await TalkMeshTracer.shared.withSpan("job.render") { span in
            span.set("talkmesh.chunks", Int64(record.chunks.count))
            try await renderChunks()
        }
        let audio = await encodedAudio ?? record.job.audioKey
        try await TalkMeshTracer.shared.withSpan("job.stitch") { _ in try await stitch(audioKey: audio) }
        await deleteIntermediates()
    }

    /// Resize and split, each skipped when its result is already stored.
    private func prepare() async throws {
        let job = record.job
        if job.resizedImageKey.isEmpty {
            var request = ResizeImageRequest()
            request.imageKey = job.imageKey
            request.width = job.width
            request.height = job.height
            request.outputKey = "jobs/\(job.id)/image.png"
            let resize = request
            let response = try await callService("ResizeImage") {
                try await self.context.media.unary(MediaService.resizeImage, resize, options: .timeout(seconds: 120, idempotent: true))
            }
            try await save { record, _ in record.update { $0.resizedImageKey = response.imageKey } }
        }
        if record.chunks.isEmpty {
            var request = SplitAudioRequest()
            request.audioKey = job.audioKey
            let target = (job.options?.chunkTargetSec ?? 0) > 0 ? job.options!.chunkTargetSec : context.configuration.chunkTargetSec
            request.targetSec = target
            request.maxSec = max(target, min(60, target * 1.5))
            request.outputPrefix = "jobs/\(job.id)/chunks/"
            let split = request
            let response = try await callService("SplitAudio") {
                try await self.context.audio.unary(AudioService.splitAudio, split, options: .timeout(seconds: 600, idempotent: true))
            }
            let chunks = response.chunks.map { chunk -> JobChunk in
                var planned = JobChunk()
                planned.index = chunk.index
                planned.audioKey = chunk.key
                planned.startSec = chunk.startSec
                planned.durationSec = chunk.durationSec
                return planned
            }
            try await save { record, _ in try record.setPlan(chunks, audioDurationSec: response.durationSec) }
            context.counters.chunks.observe([], Double(chunks.count))
        }
    }

    /// Every chunk to COMPLETED, at most the job's concurrency at once; the first chunk out of
    /// attempts ends the job (the group cancels the others).
    private func renderChunks() async throws {
        let requested = Int(record.job.options?.maxConcurrentChunks ?? 0)
        let concurrency = max(1, requested > 0 ? requested : context.configuration.maxConcurrentChunks)
        // Chunks RunPod already holds go first: they are paid for.
        let order = record.chunks.indices.sorted {
            let a = JobStateMachine.isInFlight(record.chunks[$0].status), b = JobStateMachine.isInFlight(record.chunks[$1].status)
            return a != b ? a : $0 < $1
        }.filter { record.chunks[$0].status != .chunkCompleted }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = order.makeIterator()
            for _ in 0..<concurrency {
                guard let index = next.next() else { break }
                group.addTask { try await ChunkDriver(runner: self, index: index).run() }
            }
            while try await group.next() != nil {
                if let index = next.next() {
                    group.addTask { try await ChunkDriver(runner: self, index: index).run() }
                }
            }
        }
    }

    /// Media's `EncodeAudio` of the original audio (once: the key is stored); nil when it failed —
    /// the stitch then encodes the original itself.
    private func encodeAudioTrack() async -> String? {
        let job = record.job
        if !job.encodedAudioKey.isEmpty, let key = try? BlobKey(job.encodedAudioKey),
           (try? await context.blobCall({ try $0.exists(key) })) == true {
            return job.encodedAudioKey
        }
        var request = EncodeAudioRequest()
        request.audioKey = job.audioKey
        request.outputKey = "jobs/\(job.id)/audio.m4a"
        let encode = request
        do {
            let response = try await callService("EncodeAudio") {
                try await self.context.media.unary(MediaService.encodeAudio, encode, options: .timeout(seconds: 1800, idempotent: true))
            }
            try await save { record, _ in record.update { $0.encodedAudioKey = response.audioKey } }
            return response.audioKey
        } catch {
            if !Task.isCancelled { logger.warning("could not encode the audio ahead; the stitch will", metadata: ["error": "\(error)"]) }
            return nil
        }
    }

    private func stitch(audioKey: String) async throws {
        try await save { record, _ in record.update { $0.stage = .stageStitching } }
        var request = StitchVideosRequest()
        request.videoKeys = record.chunks.map(\.videoKey)
        request.audioKey = audioKey
        request.outputKey = "jobs/\(record.id)/video.mp4"
        let stitchRequest = request
        let response = try await callService("StitchVideos") {
            try await self.context.media.unary(MediaService.stitchVideos, stitchRequest, options: .timeout(seconds: 1800, idempotent: true))
        }
        try await save { record, now in
            record.update {
                $0.videoKey = response.videoKey
                $0.durationSec = response.durationSec
            }
            try record.move(to: .completed, at: now)
        }
    }

    // MARK: Ending

    /// The workflow stopped early: cancel what RunPod still runs, then store the terminal state.
    private func finish(failure: JobError) async {
        let status: JobStatus
        let jobError: JobError
        switch stopReason {
        case .cancelled:
            status = .cancelled
            jobError = JobError(code: ErrorCode.cancelled.rawValue, message: "the job was cancelled")
        case .timedOut:
            status = .timedOut
            jobError = JobError(code: ErrorCode.jobTimedOut.rawValue, message: "the job did not finish within its deadline")
        case nil, .handedOver:
            status = .failed
            jobError = failure
        }
        await cancelOnRunPod()
        do {
            try await save(retrying: true) { record, now in
                if record.isTerminal { return }
                let attempts = Int32(self.context.configuration.chunkMaxAttempts)
                for index in record.chunks.indices where ![.chunkCompleted, .chunkCancelled].contains(record.chunks[index].status) {
                    // A chunk out of attempts stays FAILED: it is the reason.
                    if record.chunks[index].status == .chunkFailed && record.chunks[index].attempts >= attempts { continue }
                    try record.moveChunk(index, to: .chunkCancelled) { $0.finishedAtUnixMs = now }
                }
                let target = record.status == .inQueue && status == .timedOut ? JobStatus.failed : status
                try record.move(to: target, error: jobError, at: now)
            }
        } catch let error as WorkflowEnd where error.endedElsewhere {
            // Someone else stored its end first.
        } catch {
            logger.error("could not store the job's end", metadata: ["error": "\(error)"])
            return
        }
        await deleteIntermediates()
    }

    /// After another replica ended the job: RunPod's jobs cancelled, slots and blobs freed.
    private func cleanUp() async {
        await cancelOnRunPod()
        await deleteIntermediates()
    }

    /// Cancels every chunk RunPod still runs, then gives the job's in-flight slots back.
    private func cancelOnRunPod() async {
        let inFlight = record.chunks.filter { JobStateMachine.isInFlight($0.status) && !$0.runpodJobId.isEmpty }.map(\.runpodJobId)
        await withTaskGroup(of: Void.self) { group in
            for id in inFlight {
                group.addTask {
                    do { _ = try await self.context.runpod.cancel(id) } catch {
                        self.logger.warning("could not cancel a RunPod job", metadata: ["runpod_job_id": "\(id)", "error": "\(error)"])
                    }
                }
            }
        }
        await context.slots.releaseAll(job: record.id)
    }

    static func jobError(_ error: any Error) -> JobError {
        switch error {
        case let error as ServiceError: return JobError(code: error.code.rawValue, message: error.message)
        case let error as RPCError:
            let received = ServiceError(received: error) ?? ServiceError(.serviceUnavailable, error.message)
            return JobError(code: received.code.rawValue, message: received.message)
        case let error as ChunkExhausted: return error.error
        default: return JobError(code: ErrorCode.internalError.rawValue, message: "\(error)")
        }
    }

    /// Resized image, chunks and partial videos go; the final video stays.
    private func deleteIntermediates() async {
        var keys = record.chunks.flatMap { [$0.audioKey, $0.videoKey] }
        keys += [record.job.resizedImageKey, record.job.encodedAudioKey]
        // In a task of its own: the workflow's task may be cancelled just as the job ends (a
        // timeout, a hand-over at shutdown), and a cancelled wait for a blob thread would leave
        // the blobs behind ("could not delete an intermediate blob: CANCELLED").
        let context = self.context, logger = self.logger
        await Task.detached(executorPreference: context.workflowExecutor) {
            for key in keys where !key.isEmpty {
                do {
                    let blob = try BlobKey(key)
                    // Nobody reads an ended job's intermediates: their files may be reused.
                    try await context.blobCall { try $0.retire(blob) }
                } catch {
                    logger.warning("could not delete an intermediate blob", metadata: ["key": "\(key)", "error": "\(error)"])
                }
            }
        }.value
    }

    // MARK: RunPod webhooks

    /// RunPod says chunk `chunk`'s job ended: its driver polls now instead of at its next turn.
    /// False when the job has no such chunk.
    func ring(chunk: Int) -> Bool {
        guard record.chunks.indices.contains(chunk) else { return false }
        if let waiter = bells.removeValue(forKey: chunk) { waiter.resume() } else { rung.insert(chunk) }
        return true
    }

    /// Waits `seconds`, or less when the chunk's bell rings (also a ring that came before).
    func wait(chunk: Int, seconds: Double) async throws {
        if rung.remove(chunk) == nil {
            let timer = Task(executorPreference: context.workflowExecutor) { [context] in
                try? await context.pollTimer.sleep(seconds: seconds)
                await self.silence(chunk)
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { bells[chunk] = $0 }
            } onCancel: {
                Task(executorPreference: context.workflowExecutor) { await self.silence(chunk) }
            }
            timer.cancel()
        }
        try Task.checkCancellation()
    }

    private func silence(_ chunk: Int) {
        bells.removeValue(forKey: chunk)?.resume()
    }

    /// The resized image as every chunk's `/run` sends it.
    func imageBase64() async throws -> String {
        let key = record.job.resizedImageKey
        if let encodedImage, encodedImage.key == key { return encodedImage.base64 }
        let blob = try BlobKey(key)
        let base64 = try await context.blobCall { Base64.encode(try $0.get(blob)) }
        encodedImage = (key, base64)
        return base64
    }
}
