import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC

/// The Dispatcher's settings.
public struct DispatcherConfiguration: Sendable {
    /// Chunks of one job on RunPod at once (`MAX_CONCURRENT_CHUNKS`), unless the job asks fewer or more.
    public var maxConcurrentChunks = 3
    /// RunPod jobs in flight for the whole deployment (`MAX_RUNPOD_JOBS_IN_FLIGHT`).
    public var maxRunPodJobsInFlight = 50
    /// Attempts per chunk before the job fails (`CHUNK_MAX_ATTEMPTS`).
    public var chunkMaxAttempts = 3
    /// A job's whole budget (`JOB_TIMEOUT`), milliseconds.
    public var jobTimeoutMs: Int64 = 3_600_000
    /// Default chunk length asked of the Audio service, seconds.
    public var chunkTargetSec = 45.0
    /// How long Media or Audio may be unavailable before the job fails, seconds.
    public var serviceRetrySeconds = 60.0
    /// RunPod's executionTimeout per chunk, milliseconds.
    public var runpodExecutionTimeoutMs = 600_000
    /// Jobs a replica drives at once; more wait in the store.
    public var maxActiveJobs = 10_000
    /// Jobs' webhooks may target private addresses (`WEBHOOK_ALLOW_PRIVATE`).
    public var webhookAllowPrivate = false
    /// Where RunPod's completion webhooks go (`RUNPOD_WEBHOOK_BASE_URL`, the Gateway's
    /// `/v1/runpod-webhook` as RunPod reaches it): each chunk's `/run` names
    /// `<base>/<job id>/<chunk>/<job secret>`. Nil: polling alone.
    public var runpodWebhookBaseURL: String?
    /// With webhooks, the safety-net poll of a chunk (`RUNPOD_WEBHOOK_POLL`), seconds.
    public var runpodWebhookPollSeconds = 30.0
    /// Chunks go to RunPod as presigned `image_url`/`wav_url` when the blob store presigns (S3)
    /// (`RUNPOD_INPUTS=auto`); false: always base64 (`RUNPOD_INPUTS=base64`).
    public var runpodInputURLs = true
    /// How long those URLs stay valid, seconds: RunPod's default job TTL (24 h).
    public var runpodInputURLSeconds = 86_400
    /// Polls due within this long of each other go out together (`RUNPOD_POLL_BATCH`), seconds:
    /// a poll is at most this late, and the Dispatcher wakes once for the batch (`PollTimer`).
    public var pollBatchSeconds = 0.1

    public init() {}
}

/// Everything a job's workflow talks to.
public struct DispatcherContext: Sendable {
    public var configuration: DispatcherConfiguration
    public var store: any JobStore
    public var blobs: any BlobStore
    /// Blob calls block (S3 is a network call): they run on these threads, off Swift's pool.
    public var blobIO = BlockingWorkPool(threads: 4, name: "blob-io")
    public var media: RPCClient
    public var audio: RPCClient
    public var runpod: RunPodClient
    public var clock: any WallClock
    public var events = JobEvents()
    /// The deployment-wide cap on RunPod jobs in flight.
    public var slots: any InFlightSlots
    public var throughput = Throughput()
    public var planner = PollPlanner()
    /// The waits between polls (one thread), batched by `pollBatchSeconds`.
    let pollTimer: PollTimer
    /// The thread every job's workflow runs on, and the Dispatcher's own tasks (timers, notices).
    public let workflowExecutor: WorkflowExecutor
    public var counters = DispatcherCounters()
    public var logger: Logger

    /// Runs a blob call: in place for a local directory (reading a chunk's audio from the page
    /// cache or renaming a video in takes microseconds, less than the hop to a pool thread and
    /// back), on `blobIO` for a network store.
    func blobCall<T: Sendable>(_ body: @escaping @Sendable (any BlobStore) throws -> T) async throws -> T {
        if blobs.isLocal { return try body(blobs) }
        return try await blobIO.run { [blobs] _ in try body(blobs) }
    }

    public init(configuration: DispatcherConfiguration, store: any JobStore, blobs: any BlobStore, media: RPCClient, audio: RPCClient,
                runpod: RunPodClient, slots: (any InFlightSlots)? = nil, workflowExecutor: WorkflowExecutor = WorkflowExecutor(),
                clock: any WallClock = SystemWallClock(), logger: Logger) {
        self.workflowExecutor = workflowExecutor
        self.configuration = configuration
        self.store = store
        self.blobs = blobs
        self.media = media
        self.audio = audio
        self.runpod = runpod
        self.clock = clock
        self.logger = logger
        self.slots = slots ?? LocalInFlightSlots(capacity: configuration.maxRunPodJobsInFlight)
        pollTimer = PollTimer(batchNanoseconds: Int64(configuration.pollBatchSeconds * 1e9))
    }
}
