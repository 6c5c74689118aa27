import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshDispatcherService
import TalkMeshRPC
import TalkMeshService

extension Setting {
    static let jobStore = Setting("JOB_STORE", default: "sqlite:///var/lib/talkmesh/jobs.db",
                                  help: "`sqlite://PATH` (one replica) or `postgres://USER:PASS@HOST:PORT/DB` (any number)")
    static let leaseTTL = Setting("LEASE_TTL", .duration(.milliseconds(300) ... .seconds(86_400)), default: "30s",
                                  help: "PostgreSQL: how long a claim on a job lasts unrenewed")
    static let mediaAddr = Setting("MEDIA_ADDR", default: "127.0.0.1:50051",
                                   help: "the Media service: `host:port`, `dns:///name:port`, `ipv4:a:p,b:p`")
    static let audioAddr = Setting("AUDIO_ADDR", default: "127.0.0.1:50052", help: "the Audio service, the same forms")
    static let maxConcurrentChunks = Setting("MAX_CONCURRENT_CHUNKS", .integer(1...64), default: "3",
                                             help: "chunks of one job on RunPod at once (a job may ask otherwise)")
    static let maxRunPodJobsInFlight = Setting("MAX_RUNPOD_JOBS_IN_FLIGHT", .integer(1...10_000), default: "50",
                                               help: "RunPod jobs in flight, all jobs and replicas together")
    static let chunkMaxAttempts = Setting("CHUNK_MAX_ATTEMPTS", .integer(1...20), default: "3", help: "attempts per chunk before the job fails")
    static let jobTimeout = Setting("JOB_TIMEOUT", .duration(.milliseconds(1) ... .seconds(30 * 86_400)), default: "1h",
                                    help: "a job's deadline, from its creation")
    static let chunkTargetSec = Setting("CHUNK_TARGET_SEC", .integer(5...60), default: "45", help: "chunk length asked of Audio, seconds")
    static let videoRetention = Setting("VIDEO_RETENTION", .duration(.seconds(1) ... Setting.longest), default: "6h",
                                        help: "after a job ended, its video and uploads are deleted")
    static let jobRetention = Setting("JOB_RETENTION", .duration(.seconds(1) ... Setting.longest), default: "7d",
                                      help: "after a job ended, the job is deleted (EXPIRED for as long again); at least VIDEO_RETENTION")
    static let webhookAllowPrivate = Setting("WEBHOOK_ALLOW_PRIVATE", .choice(["false", "true"]), default: "false",
                                             help: "jobs' webhooks may target private, loopback and link-local addresses")
    static let webhookBackoffInitial = Setting("WEBHOOK_BACKOFF_INITIAL", .duration(.milliseconds(10) ... .seconds(3600)), default: "10s",
                                               help: "wait after a webhook's first failed attempt; doubles per attempt up to 1 h")
    static let webhookMaxAge = Setting("WEBHOOK_MAX_AGE", .duration(.seconds(1) ... .seconds(7 * 86_400)), default: "24h",
                                       help: "how long a webhook event is retried after its first attempt")
    static let webhookTimeout = Setting("WEBHOOK_TIMEOUT", .duration(.milliseconds(100) ... .seconds(120)), default: "10s",
                                        help: "one webhook attempt's budget")
    static let runpodWebhookBaseURL = Setting("RUNPOD_WEBHOOK_BASE_URL", shown: "— (polling alone)",
                                              help: "the Gateway's `/v1/runpod-webhook` as RunPod reaches it: chunks end on RunPod's webhook, polls slow down")
    static let runpodWebhookPoll = Setting("RUNPOD_WEBHOOK_POLL", .duration(.seconds(1) ... .seconds(600)), default: "30s",
                                           help: "with RunPod webhooks, the safety-net poll of each chunk")
    static let runpodPollBatch = Setting("RUNPOD_POLL_BATCH", .duration(.zero ... .seconds(1)), default: "100ms",
                                         help: "polls due within this long of each other go out together (a poll is at most this late; 0: each on its own)")
    static let runpodInputs = Setting("RUNPOD_INPUTS", .choice(["auto", "base64"]), default: "auto",
                                      help: "`auto`: presigned `image_url`/`wav_url` when the blob store is S3, else base64")
    static let retentionSweepInterval = Setting("RETENTION_SWEEP_INTERVAL", .duration(.milliseconds(100) ... .seconds(86_400)), default: "1m",
                                                help: "how often one replica sweeps for what retention deletes")
}

/// `talkmesh-dispatcher`: TalkMesh dispatcher: owns every job and drives it through RunPod.
@main
enum DispatcherCommand {
    static let settings: [Setting] = BlobSettings.table + [
        .jobStore, .leaseTTL, .mediaAddr, .audioAddr, .maxConcurrentChunks, .maxRunPodJobsInFlight, .chunkMaxAttempts, .jobTimeout,
        .chunkTargetSec, .videoRetention, .jobRetention, .retentionSweepInterval, .webhookAllowPrivate, .webhookBackoffInitial,
        .webhookMaxAge, .webhookTimeout, .runpodWebhookBaseURL, .runpodWebhookPoll, .runpodPollBatch, .runpodInputs,
    ] + Setting.runPod

    static func main() {
        ServiceRunner.run(name: "talkmesh-dispatcher", abstract: "TalkMesh dispatcher: owns every job and drives it through RunPod.",
                          defaultPort: 50053, settings: settings) { setup, settings in
            var configuration = DispatcherConfiguration()
            configuration.maxConcurrentChunks = try settings.integer(.maxConcurrentChunks)
            configuration.maxRunPodJobsInFlight = try settings.integer(.maxRunPodJobsInFlight)
            configuration.chunkMaxAttempts = try settings.integer(.chunkMaxAttempts)
            configuration.jobTimeoutMs = try settings.duration(.jobTimeout).nanosecondsClamped / 1_000_000
            configuration.chunkTargetSec = Double(try settings.integer(.chunkTargetSec))
            configuration.webhookAllowPrivate = try settings.string(.webhookAllowPrivate) == "true"
            if let base = try settings.string(.runpodWebhookBaseURL), !base.isEmpty {
                guard base.hasPrefix("http://") || base.hasPrefix("https://") else {
                    throw InvalidSetting(description: "RUNPOD_WEBHOOK_BASE_URL=\(base): expected an http(s) URL")
                }
                configuration.runpodWebhookBaseURL = base.hasSuffix("/") ? String(base.dropLast()) : base
            }
            configuration.runpodWebhookPollSeconds = Double(try settings.duration(.runpodWebhookPoll).nanosecondsClamped) / 1e9
            configuration.runpodInputURLs = try settings.string(.runpodInputs) != "base64"
            configuration.pollBatchSeconds = Double(try settings.duration(.runpodPollBatch).nanosecondsClamped) / 1e9
            var webhooks = WebhookConfiguration()
            webhooks.allowPrivate = configuration.webhookAllowPrivate
            webhooks.backoffInitialSeconds = Double(try settings.duration(.webhookBackoffInitial).nanosecondsClamped) / 1e9
            webhooks.maxAgeSeconds = Double(try settings.duration(.webhookMaxAge).nanosecondsClamped) / 1e9
            webhooks.timeoutMs = Int(try settings.duration(.webhookTimeout).nanosecondsClamped / 1_000_000)
            var retention = RetentionConfiguration()
            retention.blobsMs = try settings.duration(.videoRetention).nanosecondsClamped / 1_000_000
            retention.jobsMs = try settings.duration(.jobRetention).nanosecondsClamped / 1_000_000
            retention.intervalSeconds = Double(try settings.duration(.retentionSweepInterval).nanosecondsClamped) / 1e9
            guard retention.jobsMs >= retention.blobsMs else {
                throw InvalidSetting(description: "JOB_RETENTION must be at least VIDEO_RETENTION: a job is deleted only after its blobs")
            }
            let runpodConfiguration: RunPodClient.Configuration
            do { runpodConfiguration = try RunPodClient.Configuration.fromEnvironment(settings.environment) } catch let error as ServiceError {
                throw InvalidSetting(description: error.message)
            }
            let leaseNanoseconds = try settings.duration(.leaseTTL).nanosecondsClamped
            // The thread every job's workflow runs on; the store's and the shared limits' own work
            // runs there too, beside the chunks that wait on it.
            let workflow = WorkflowExecutor()
            let store = try JobStores.open(try settings.string(.jobStore) ?? "sqlite:///var/lib/talkmesh/jobs.db",
                                           leaseSeconds: Double(leaseNanoseconds) / 1e9, workflow: workflow)
            // The in-flight cap and RunPod's request budget hold for the deployment: the store
            // shares them between replicas (SQLite: this process's own).
            let slots = try store.inFlightSlots(capacity: configuration.maxRunPodJobsInFlight, executor: workflow)
            let budgets = (run: try store.requestGate(route: "run", limit: runpodConfiguration.runPerWindow,
                                                      window: runpodConfiguration.budgetWindow, executor: workflow),
                           status: try store.requestGate(route: "status", limit: runpodConfiguration.statusPerWindow,
                                                         window: runpodConfiguration.budgetWindow, executor: workflow))
            let blobs = try BlobSettings.makeStore(settings)
            let media = try RPCClient(configuration: .init(target: try settings.string(.mediaAddr) ?? "127.0.0.1:50051"))
            let audio = try RPCClient(configuration: .init(target: try settings.string(.audioAddr) ?? "127.0.0.1:50052"))
            let context = DispatcherContext(configuration: configuration, store: store, blobs: blobs, media: media, audio: audio,
                                            runpod: RunPodClient(configuration: runpodConfiguration, budgets: budgets), slots: slots,
                                            workflowExecutor: workflow,
                                            logger: setup.logger)
            let dispatcher = Dispatcher(context: context)
            DispatcherHandlers(dispatcher: dispatcher).register(into: &setup.services)
            setup.metricsSources.append { [counters = context.counters, runpod = context.runpod] in
                counters.render() + runpod.metrics.render() + store.metricsText
            }
            webhooks.videoURLSeconds = Int(min(retention.blobsMs / 1000, 7 * 86_400))
            let sweeper = Task { await RetentionSweeper(context: context, configuration: retention).run() }
            let sender = Task { await WebhookSender(context: context, configuration: webhooks).run() }
            setup.onStop.append {
                sweeper.cancel()
                sender.cancel()
                await dispatcher.shutdown()
            }
            let health = setup.health, logger = setup.logger
            Task {
                do { try await dispatcher.start() } catch { logger.error("cannot resume jobs", metadata: ["error": "\(error)"]) }
                await StoreProbe(store: store, health: health, counters: context.counters, logger: logger).run()
            }
        }
    }
}
