import TalkMeshCore
import TalkMeshMessages

/// The one place job and chunk states change. `IN_QUEUE → RUNNING → COMPLETED | FAILED |
/// CANCELLED | TIMED_OUT`, and `IN_QUEUE` may end at once as `FAILED` or `CANCELLED`.
public enum JobStateMachine {
    /// The states a job may move to from `status`.
    public static func successors(of status: JobStatus) -> Set<JobStatus> {
        switch status {
        case .inQueue: return [.running, .failed, .cancelled]
        case .running: return [.completed, .failed, .cancelled, .timedOut]
        default: return []
        }
    }

    /// True when nothing may follow.
    public static func isTerminal(_ status: JobStatus) -> Bool {
        [.completed, .failed, .cancelled, .timedOut].contains(status)
    }

    /// The states a chunk may move to. A chunk is retried from FAILED (a new attempt), resubmitted
    /// from SUBMITTING or SUBMITTED (the crash window, or RunPod forgot the job), and may be
    /// cancelled from anything but COMPLETED.
    public static func successors(of status: ChunkStatus) -> Set<ChunkStatus> {
        switch status {
        case .chunkPending: return [.chunkSubmitting, .chunkCancelled]
        case .chunkSubmitting: return [.chunkSubmitted, .chunkSubmitting, .chunkFailed, .chunkCancelled]
        case .chunkSubmitted: return [.chunkRunning, .chunkCompleted, .chunkFailed, .chunkCancelled, .chunkSubmitting, .chunkSubmitted]
        case .chunkRunning: return [.chunkCompleted, .chunkFailed, .chunkCancelled, .chunkSubmitting, .chunkSubmitted]
        case .chunkFailed: return [.chunkSubmitting, .chunkSubmitted, .chunkCancelled]
        default: return []
        }
    }

    /// True when a chunk's RunPod job can still be running.
    public static func isInFlight(_ status: ChunkStatus) -> Bool {
        [.chunkSubmitting, .chunkSubmitted, .chunkRunning].contains(status)
    }
}

/// A job as the Dispatcher holds it. Its status and its chunks' statuses can only change through
/// `move(to:)` and `moveChunk(_:to:)`, which refuse what the state machine does not allow: an
/// illegal transition cannot be written.
public struct JobRecord: Sendable, Equatable {
    /// The job as the API shows it.
    public private(set) var job: Job

    /// A new job, `IN_QUEUE`.
    public init(new job: Job) {
        var job = job
        job.status = .inQueue
        job.stage = .stageUnspecified
        job.etaSeconds = -1
        for index in job.chunks.indices { job.chunks[index].status = .chunkPending }
        self.job = job
    }

    /// A job read back from the store (its states were checked when it was written).
    public init(stored job: Job) {
        self.job = job
    }

    public var id: String { job.id }
    public var status: JobStatus { job.status }
    public var isTerminal: Bool { JobStateMachine.isTerminal(job.status) }
    public var chunks: [JobChunk] { job.chunks }

    /// Moves the job; ILLEGAL_TRANSITION when the state machine forbids it.
    public mutating func move(to status: JobStatus, error: JobError? = nil, at now: Int64) throws(ServiceError) {
        guard JobStateMachine.successors(of: job.status).contains(status) else {
            throw ServiceError(.illegalTransition, "job \(job.id): \(job.status) → \(status) is not a legal transition")
        }
        record(TimelineEvent(at: now, chunk: -1, from: JobJSON.status(job.status), to: JobJSON.status(status), errorCode: error?.code ?? ""))
        job.status = status
        if let error { job.error = error }
        if JobStateMachine.isTerminal(status) {
            job.completedAtUnixMs = now
            job.stage = .stageDone
            job.etaSeconds = status == .completed ? 0 : -1
        }
        if JobStateMachine.isTerminal(status) { queueWebhook(JobRecord.event(status), at: now) }
    }

    /// Moves one chunk; ILLEGAL_TRANSITION when the state machine forbids it or the job has ended
    /// (a terminal job's chunks may only be cancelled).
    public mutating func moveChunk(_ index: Int, to status: ChunkStatus, _ update: (inout ChunkFields) -> Void = { _ in }) throws(ServiceError) {
        guard job.chunks.indices.contains(index) else {
            throw ServiceError(.illegalTransition, "job \(job.id) has no chunk \(index)")
        }
        let current = job.chunks[index].status
        guard JobStateMachine.successors(of: current).contains(status), !isTerminal || status == .chunkCancelled else {
            throw ServiceError(.illegalTransition, "job \(job.id) chunk \(index): \(current) → \(status) is not a legal transition")
        }
        var fields = ChunkFields(chunk: job.chunks[index])
        update(&fields)
        job.chunks[index] = fields.chunk
        job.chunks[index].status = status
    }

    /// Sets the plan once: the chunks from the split (only while preparing).
    public mutating func setPlan(_ chunks: [JobChunk], audioDurationSec: Double) throws(ServiceError) {
        guard job.status == .running, job.chunks.isEmpty else {
            throw ServiceError(.illegalTransition, "job \(job.id): the plan is set once, while running")
        }
        job.chunks = chunks.map { var chunk = $0; chunk.status = .chunkPending; return chunk }
        job.audioDurationSec = audioDurationSec
    }

    /// Fields that are not states: free to change while the job is not terminal.
    public mutating func update(_ body: (inout JobFields) -> Void) {
        var fields = JobFields(job: job)
        body(&fields)
        let status = job.status, chunks = job.chunks
        job = fields.job
        job.status = status
        job.chunks = chunks
    }

    /// The longest timeline kept.
    public static let timelineLength = 2000

    /// Appends to the job's timeline; past `timelineLength` the oldest chunk event goes.
    mutating func record(_ event: TimelineEvent) {
        job.timeline.append(event)
        if job.timeline.count > Self.timelineLength, let oldest = job.timeline.firstIndex(where: { $0.chunk >= 0 }) {
            job.timeline.remove(at: oldest)
        }
    }

    /// Records in the timeline how each chunk's state changed from `previous` (a write's diff).
    public mutating func recordChunkChanges(since previous: JobRecord, at now: Int64) {
        guard previous.chunks.count == job.chunks.count else {
            // The plan was just set: every chunk starts pending.
            return
        }
        for (before, after) in zip(previous.chunks, job.chunks) where before.status != after.status || before.attempts != after.attempts {
            record(TimelineEvent(at: now, chunk: after.index, from: Self.chunkState(before.status), to: Self.chunkState(after.status),
                                 attempt: after.attempts, runpodJobID: after.runpodJobId,
                                 // A failed attempt: the chunk FAILED, or retried in place (RunPod's /retry) with the error it had.
                                 errorCode: after.status == .chunkFailed || (after.attempts > before.attempts && after.error != before.error)
                                     ? after.error?.code ?? "" : ""))
        }
    }

    /// `pending`, `submitting`, `submitted`, `running`, `completed`, `failed`, `cancelled`.
    public static func chunkState(_ status: ChunkStatus) -> String {
        status == .chunkSubmitting ? "submitting" : JobJSON.chunkStatus(status)
    }

    /// Queues the job's webhook (when it has one) for `event`, due at once. An event not yet
    /// delivered is replaced: the receiver gets the job as it is now, not every state it passed.
    /// A terminal event is never replaced by progress.
    public mutating func queueWebhook(_ event: String, at now: Int64) {
        guard var webhook = job.webhook, !webhook.url.isEmpty else { return }
        if event == Self.progressEvent && !webhook.pendingEvent.isEmpty && webhook.pendingEvent != Self.progressEvent { return }
        if webhook.pendingEvent.isEmpty || webhook.pendingEvent != event {
            webhook.pendingAttempts = 0
            webhook.pendingSinceUnixMs = now
        }
        webhook.pendingEvent = event
        webhook.dueUnixMs = webhook.pendingAttempts == 0 ? now : max(webhook.dueUnixMs, now)
        job.webhook = webhook
    }

    /// The webhook's delivery state (what the sender writes); allowed in any state.
    public mutating func updateWebhook(_ body: (inout JobWebhook) -> Void) {
        guard var webhook = job.webhook else { return }
        body(&webhook)
        job.webhook = webhook
    }

    public static let progressEvent = "job.progress"

    /// When the pending webhook delivery is due (the store indexes it); nil when none waits.
    public var webhookDueUnixMs: Int64? {
        guard let webhook = job.webhook, !webhook.pendingEvent.isEmpty else { return nil }
        return webhook.dueUnixMs
    }

    /// `job.completed`, `job.failed`, `job.cancelled`, `job.timed_out`.
    public static func event(_ status: JobStatus) -> String {
        switch status {
        case .completed: return "job.completed"
        case .failed: return "job.failed"
        case .cancelled: return "job.cancelled"
        case .timedOut: return "job.timed_out"
        default: return progressEvent
        }
    }

    /// Records that retention deleted the job's blobs; ILLEGAL_TRANSITION unless the job has ended.
    public mutating func markBlobsDeleted(at now: Int64) throws(ServiceError) {
        guard isTerminal else { throw ServiceError(.illegalTransition, "job \(job.id) is \(job.status): its blobs are in use") }
        job.blobsDeletedAtUnixMs = now
    }

    /// What is kept of a job that retention deleted: who owns it, how it ended and when — enough to
    /// answer EXPIRED to its owner (and NOT_FOUND to anyone else), nothing of its content.
    public func tombstone(at now: Int64) -> Job {
        var kept = Job()
        kept.id = job.id
        kept.owner = job.owner
        kept.status = job.status
        kept.createdAtUnixMs = job.createdAtUnixMs
        kept.updatedAtUnixMs = job.updatedAtUnixMs
        kept.completedAtUnixMs = job.completedAtUnixMs
        kept.blobsDeletedAtUnixMs = job.blobsDeletedAtUnixMs
        kept.version = job.version
        kept.expiredAtUnixMs = now
        return kept
    }

    /// Stamps a stored write (version and time); the store calls this.
    public mutating func stamp(version: Int64, at now: Int64) {
        job.version = version
        job.updatedAtUnixMs = now
    }
}

/// A chunk's non-state fields, editable inside `JobRecord.moveChunk`.
public struct ChunkFields {
    var chunk: JobChunk
    public var runpodJobID: String { get { chunk.runpodJobId } set { chunk.runpodJobId = newValue } }
    public var videoKey: String { get { chunk.videoKey } set { chunk.videoKey = newValue } }
    public var attempts: Int32 { get { chunk.attempts } set { chunk.attempts = newValue } }
    public var error: JobError? { get { chunk.error } set { chunk.error = newValue } }
    public var submittedAtUnixMs: Int64 { get { chunk.submittedAtUnixMs } set { chunk.submittedAtUnixMs = newValue } }
    public var finishedAtUnixMs: Int64 { get { chunk.finishedAtUnixMs } set { chunk.finishedAtUnixMs = newValue } }
    public var queueDelayMs: Int64 { get { chunk.queueDelayMs } set { chunk.queueDelayMs = newValue } }
    public var executionMs: Int64 { get { chunk.executionMs } set { chunk.executionMs = newValue } }
}

/// A job's non-state fields, editable inside `JobRecord.update`.
public struct JobFields {
    var job: Job
    public var progress: Double { get { job.progress } set { job.progress = newValue } }
    public var etaSeconds: Double { get { job.etaSeconds } set { job.etaSeconds = newValue } }
    public var stage: JobStage { get { job.stage } set { job.stage = newValue } }
    public var resizedImageKey: String { get { job.resizedImageKey } set { job.resizedImageKey = newValue } }
    public var encodedAudioKey: String { get { job.encodedAudioKey } set { job.encodedAudioKey = newValue } }
    public var videoKey: String { get { job.videoKey } set { job.videoKey = newValue } }
    public var durationSec: Double { get { job.durationSec } set { job.durationSec = newValue } }
    public var runpodWebhookSecret: String { get { job.runpodWebhookSecret } set { job.runpodWebhookSecret = newValue } }
}

extension TimelineEvent {
    init(at: Int64, chunk: Int32, from: String, to: String, attempt: Int32 = 0, runpodJobID: String = "", errorCode: String = "") {
        self.init()
        atUnixMs = at
        self.chunk = chunk
        self.from = from
        self.to = to
        self.attempt = attempt
        runpodJobId = runpodJobID
        self.errorCode = errorCode
    }
}
