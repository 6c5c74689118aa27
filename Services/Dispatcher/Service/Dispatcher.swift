import Logging
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// Owns the jobs this replica drives: one `JobRunner` per unfinished job (a task and its timers,
/// not a thread), resumed from the store at start, started on `CreateJob`, stopped on `CancelJob`.
public actor Dispatcher {
    public let context: DispatcherContext
    private var runners: [String: JobRunner] = [:]

    public init(context: DispatcherContext) {
        self.context = context
    }

    private var maintenance: Task<Void, Never>?
    private var stopping = false

    /// A clean stop (SIGTERM, after the server drained): with leases, every job driven here is
    /// handed over — its workflow stops where its stored state is, nothing is cancelled on RunPod
    /// — and the leases are released so another replica continues at once, not after they expire.
    /// The SQLite store's single replica has nothing to hand over: its jobs resume at the next start.
    public func shutdown() async {
        guard context.store.leaseSeconds != nil else { return }
        stopping = true
        maintenance?.cancel()
        await maintenance?.value  // no heartbeat or claim of its may land after the release below
        let driven = Array(runners.values)
        for runner in driven { await runner.handOver() }
        for runner in driven { _ = await runner.ended() }
        do { try await context.store.releaseAll() } catch {
            context.logger.warning("could not release leases; other replicas take over when they expire", metadata: ["error": "\(error)"])
        }
        context.logger.info("jobs handed over", metadata: ["jobs": "\(driven.count)"])
    }

    /// Resumes every job the store says is unfinished (up to `maxActiveJobs`). With leases
    /// (PostgreSQL), it also keeps them alive, gives up the ones another replica took, claims
    /// jobs whose owner died, and follows other replicas' changes.
    public func start() async throws {
        // The Dispatcher's own tasks run on the workflow thread, where the jobs they touch run.
        let executor = context.workflowExecutor
        context.store.observe { change in Task(executorPreference: executor) { await self.noticed(change) } }
        try await fill()
        if let lease = context.store.leaseSeconds, maintenance == nil {
            maintenance = Task(executorPreference: executor) { await self.maintain(every: min(lease / 3, 5)) }
        }
    }

    private func maintain(every interval: Double) async {
        while true {
            // A cancelled sleep ends the loop: a claim after shutdown's release would keep a job
            // leased to a replica that is gone.
            guard (try? await Task.sleep(nanoseconds: UInt64(interval * 1e9))) != nil else { return }
            do {
                for id in try await context.store.heartbeat() {
                    context.logger.warning("lease lost; another replica drives the job now", metadata: ["job_id": "\(id)"])
                    await runners[id]?.handOver()
                }
                try await fill()
            } catch {
                context.logger.error("cannot renew leases or claim jobs", metadata: ["error": "\(error)"])
            }
        }
    }

    /// A change stored by anyone: watchers here see it; a job driven here that another replica
    /// ended (a cancel) stops.
    private func noticed(_ change: StoreChange) async {
        switch change {
        case .job(let id, let version):
            let runner = runners[id]
            if let runner, await runner.record.job.version >= version { return }
            guard runner != nil || context.events.isWatched(id) else { return }
            guard let stored = try? await context.store.get(id), stored.job.version >= version else { return }
            context.events.publish(stored.job)
            if let runner, stored.isTerminal {
                context.logger.info("job ended by another replica", metadata: ["job_id": "\(id)", "status": "\(stored.status)"])
                _ = await runner.stop(.cancelled)
            }
        case .resynchronize:
            for id in context.events.watched {
                if let stored = try? await context.store.get(id) { context.events.publish(stored.job) }
            }
        case .claimable:
            if !stopping { try? await fill() }
        case .slotsFreed:
            break
        }
    }

    /// Jobs being driven here.
    public var activeJobs: Int { runners.count }

    /// Claims unfinished jobs while there is room and starts their runners.
    /// Nothing is claimed once shutdown began: what a claim in flight took then is released again.
    private func fill() async throws {
        let room = context.configuration.maxActiveJobs - runners.count
        guard room > 0, !stopping else { return }
        let ids = try await context.store.claimUnfinished(limit: room, running: Set(runners.keys))
        for id in ids {
            let record = try await context.store.get(id)
            guard !stopping, let record, !record.isTerminal, runners[id] == nil,
                  runners.count < context.configuration.maxActiveJobs else {
                if runners[id] == nil { try? await context.store.release(id) }  // for a replica that can drive it
                continue
            }
            let resumed = !record.chunks.isEmpty || record.status == .running
            if resumed {
                context.logger.info("resuming job", metadata: ["job_id": "\(id)", "status": "\(record.status)"])
            }
            launch(record, resumed: resumed)
        }
    }

    private func launch(_ record: JobRecord, resumed: Bool = false) {
        let runner = JobRunner(record: record, context: context)
        runners[record.id] = runner
        context.counters.set(driven: runners.count)
        Task(executorPreference: context.workflowExecutor) { await runner.start(resumed: resumed) { id in await self.ended(id) } }
    }

    private func ended(_ id: String) async {
        runners[id] = nil
        context.counters.set(driven: runners.count)
        if stopping { return }
        try? await context.store.release(id)
        do { try await fill() } catch {
            context.logger.error("cannot claim jobs", metadata: ["error": "\(error)"])
        }
    }

    // MARK: API

    /// Stores a new job (or finds the one with the same idempotency key) and starts it.
    public func create(_ request: CreateJobRequest, traceparent: String, tracestate: String? = nil, requestID: String? = nil) async throws -> Job {
        try Self.validate(request)
        let webhookURL = request.options?.webhookUrl ?? ""
        if !webhookURL.isEmpty {
            let allowPrivate = context.configuration.webhookAllowPrivate
            try await context.blobIO.run { _ in try WebhookURL.validate(webhookURL, allowPrivate: allowPrivate) }
        }
        for key in [request.imageKey, request.audioKey] {
            let blob = try BlobKey(key)
            guard try await context.blobCall({ try $0.exists(blob) }) else {
                throw ServiceError(.notFound, "no blob \(key)")
            }
        }
        let now = context.clock.nowUnixMs()
        var job = Job()
        job.id = JobID.make()
        job.imageKey = request.imageKey
        job.audioKey = request.audioKey
        job.prompt = request.prompt
        job.width = request.width
        job.height = request.height
        job.owner = request.owner
        job.idempotencyKey = request.idempotencyKey
        job.options = request.options ?? JobOptions()
        job.createdAtUnixMs = now
        job.deadlineUnixMs = now + context.configuration.jobTimeoutMs
        job.traceparent = traceparent
        job.tracestate = tracestate ?? ""
        if !webhookURL.isEmpty {
            var webhook = JobWebhook()
            webhook.url = webhookURL
            webhook.progress = request.options?.webhookProgress ?? false
            webhook.secret = request.webhookSecret
            job.webhook = webhook
        }
        if context.configuration.runpodWebhookBaseURL != nil { job.runpodWebhookSecret = TraceContext.randomHex(bytes: 16) }
        let (record, created) = try await context.store.create(JobRecord(new: job))
        if created {
            context.counters.count(job: .inQueue)
            var metadata: Logger.Metadata = ["job_id": "\(record.id)", "owner": "\(record.job.owner)"]
            if let trace = TraceContext.parse(traceparent: traceparent) { metadata["trace_id"] = "\(trace.traceID)" }
            if let requestID { metadata["request_id"] = "\(requestID)" }
            context.logger.info("job created", metadata: metadata)
            if runners.count < context.configuration.maxActiveJobs {
                launch(record)
            } else {
                try? await context.store.release(record.id)  // for a replica with room to claim
            }
        }
        return record.job
    }

    /// The job as stored.
    public func get(_ id: String) async throws -> Job {
        guard JobID.isValid(id), let record = try await context.store.get(id) else {
            throw ServiceError(.jobNotFound, "no job \(id)")
        }
        return record.job
    }

    /// Cancels a job: CANCELLED with its RunPod jobs cancelled; JOB_TERMINAL when it already ended.
    public func cancel(_ id: String) async throws -> Job {
        guard JobID.isValid(id), var record = try await context.store.get(id) else {
            throw ServiceError(.jobNotFound, "no job \(id)")
        }
        guard !record.isTerminal else { throw ServiceError(.jobTerminal, "job \(id) already ended \(record.status)") }
        if let runner = runners[id] {
            let ended = await runner.stop(.cancelled)
            if ended.isTerminal {
                record = ended
            } else {
                guard let stored = try await context.store.get(id) else { throw ServiceError(.jobNotFound, "no job \(id)") }
                record = stored
            }
        }
        // Not driven here (another replica's, or waiting for room): the stored state changes and
        // the owner's next write sees it and stops.
        while !record.isTerminal {
            do {
                try record.move(to: .cancelled, error: JobError(code: ErrorCode.cancelled.rawValue, message: "the job was cancelled"),
                                at: context.clock.nowUnixMs())
                record = try await context.store.update(record)
                context.events.publish(record.job)
            } catch let error as ServiceError where error.code == .storeConflict {
                guard let stored = try await context.store.get(id) else { throw ServiceError(.jobNotFound, "no job \(id)") }
                record = stored
            }
        }
        // The job may have ended on its own while the cancel was on its way (it completed, failed
        // or timed out first): that is JOB_TERMINAL, as if the cancel had come a moment later.
        guard record.status == .cancelled else { throw ServiceError(.jobTerminal, "job \(id) already ended \(record.status)") }
        return record.job
    }

    /// RunPod's completion webhook for chunk `request.chunk` of a job: the chunk's driver, when it
    /// runs here, asks RunPod for the status at once. NOT_FOUND for an unknown job, a wrong secret
    /// or a job without one (the two are not told apart); false when the job is not driven here
    /// (its driver's slow poll sees the result).
    public func runPodWebhook(_ request: RunPodWebhookRequest) async throws -> Bool {
        guard JobID.isValid(request.jobId), let record = try await context.store.get(request.jobId),
              !record.job.runpodWebhookSecret.isEmpty,
              Digest.constantTimeEqual(Array(record.job.runpodWebhookSecret.utf8), Array(request.secret.utf8)) else {
            throw ServiceError(.jobNotFound, "no such job or webhook")
        }
        context.counters.count(event: "runpod_webhooks")
        guard let runner = runners[request.jobId] else { return false }
        return await runner.ring(chunk: Int(request.chunk))
    }

    /// One page of an owner's jobs, newest first.
    public func list(_ request: ListJobsRequest) async throws -> ListJobsResponse {
        guard (0...1000).contains(request.pageSize) else {
            throw ServiceError(.invalidArgument, "page_size must be 0–1000 (0: 50)")
        }
        let status: JobStatus? = request.status == .jobStatusUnspecified ? nil : request.status
        if let status, !(1...6).contains(status.rawValue) { throw ServiceError(.invalidArgument, "unknown status \(status.rawValue)") }
        let token = request.pageToken.isEmpty ? nil : try PageToken(parsing: request.pageToken)
        let query = JobQuery(owner: request.owner, status: status, pageSize: request.pageSize == 0 ? 50 : Int(request.pageSize), after: token)
        let (jobs, next) = try await context.store.list(query)
        var response = ListJobsResponse()
        response.jobs = jobs
        response.nextPageToken = next
        return response
    }

    /// Sends the job now and on every stored change until it is terminal.
    public nonisolated func watch(_ id: String, send: (Job) async throws -> Void) async throws {
        guard JobID.isValid(id) else { throw ServiceError(.jobNotFound, "no job \(id)") }
        let changes = context.events.subscribe(id)
        guard let current = try await context.store.get(id) else { throw ServiceError(.jobNotFound, "no job \(id)") }
        try await send(current.job)
        if current.isTerminal { return }
        var last = current.job.version
        for await job in changes where job.version > last {
            try await send(job)
            last = job.version
            if JobStateMachine.isTerminal(job.status) { return }
        }
    }

    static func validate(_ request: CreateJobRequest) throws(ServiceError) {
        func invalid(_ message: String) -> ServiceError { ServiceError(.invalidArgument, message) }
        guard !request.imageKey.isEmpty else { throw invalid("image_key is required") }
        guard !request.audioKey.isEmpty else { throw invalid("audio_key is required") }
        guard (64...4096).contains(request.width), (64...4096).contains(request.height) else {
            throw invalid("width and height must be 64–4096")
        }
        guard request.prompt.utf8.count <= 4000 else { throw invalid("prompt must be at most 4000 bytes") }
        guard request.owner.utf8.count <= 200, request.idempotencyKey.utf8.count <= 200 else {
            throw invalid("owner and idempotency_key must be at most 200 bytes")
        }
        guard request.webhookSecret.utf8.count <= 256 else { throw invalid("webhook_secret must be at most 256 bytes") }
        if let options = request.options {
            guard options.webhookUrl.isEmpty || !request.webhookSecret.isEmpty else {
                throw invalid("webhook_secret is required with options.webhook_url: it signs the webhooks")
            }
            guard options.chunkTargetSec == 0 || (5...60).contains(options.chunkTargetSec) else {
                throw invalid("options.chunk_target_sec must be 5–60 (0: the default)")
            }
            guard (0...64).contains(options.maxConcurrentChunks) else {
                throw invalid("options.max_concurrent_chunks must be 0–64 (0: the default)")
            }
        }
    }
}

extension Job {
    /// The job without its secrets, and without its timeline unless asked: what leaves the Dispatcher.
    public func redacted(keepingTimeline: Bool = false) -> Job {
        var job = self
        job.runpodWebhookSecret = ""
        if job.webhook != nil { job.webhook!.secret = "" }
        if !keepingTimeline { job.timeline = [] }
        return job
    }

    public var redacted: Job { redacted() }
}

/// `talkmesh.v1.DispatcherService` on the RPC runtime.
public struct DispatcherHandlers: Sendable {
    public let dispatcher: Dispatcher

    public init(dispatcher: Dispatcher) {
        self.dispatcher = dispatcher
    }

    public func register(into registry: inout RPCServiceRegistry) {
        let dispatcher = self.dispatcher
        registry.register(DispatcherService.createJob) { request, context in
            var response = CreateJobResponse()
            let trace = context.trace ?? TraceContext.root()
            // The Gateway's request id comes along as metadata (its client interceptor adds it).
            response.job = try await dispatcher.create(request, traceparent: trace.traceparent, tracestate: trace.traceState,
                                                       requestID: context.metadata.first("x-request-id")).redacted
            return response
        }
        // Every job leaves with its secrets removed (the webhook key, the RunPod webhook path's secret).
        registry.register(DispatcherService.getJob) { request, _ in
            try await dispatcher.get(request.id).redacted(keepingTimeline: request.includeTimeline)
        }
        registry.register(DispatcherService.listJobs) { request, _ in
            var page = try await dispatcher.list(request)
            page.jobs = page.jobs.map(\.redacted)
            return page
        }
        registry.register(DispatcherService.cancelJob) { request, _ in try await dispatcher.cancel(request.id).redacted }
        registry.register(DispatcherService.watchJob) { request, _, writer in
            try await dispatcher.watch(request.id) { job in try await writer.write(job.redacted) }
        }
        registry.register(DispatcherService.runPodWebhook) { request, _ in
            var response = RunPodWebhookResponse()
            response.accepted = try await dispatcher.runPodWebhook(request)
            return response
        }
    }
}
