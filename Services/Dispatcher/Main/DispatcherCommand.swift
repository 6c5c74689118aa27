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
    static let retentionSweepInterval = Setting("RETENTION_SWEEP_INTERVAL", .duration(.milliseconds(100) ... .seconds(86_400)), default: "1m",
                                                help: "how often one replica sweeps for what retention deletes")
}

/// `talkmesh-dispatcher`: TalkMesh dispatcher: owns every job and drives it through RunPod.
@main
enum DispatcherCommand {
    static let settings: [Setting] = BlobSettings.table + [
        .jobStore, .leaseTTL, .mediaAddr, .audioAddr, .maxConcurrentChunks, .maxRunPodJobsInFlight, .chunkMaxAttempts, .jobTimeout,
        .chunkTargetSec, .videoRetention, .jobRetention, .retentionSweepInterval,
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
            let store = try JobStores.open(try settings.string(.jobStore) ?? "sqlite:///var/lib/talkmesh/jobs.db",
                                           leaseSeconds: Double(leaseNanoseconds) / 1e9)
            // The in-flight cap and RunPod's request budget hold for the deployment: the store
            // shares them between replicas (SQLite: this process's own).
            let slots = try store.inFlightSlots(capacity: configuration.maxRunPodJobsInFlight)
            let budgets = (run: try store.requestGate(route: "run", limit: runpodConfiguration.runPerWindow, window: runpodConfiguration.budgetWindow),
                           status: try store.requestGate(route: "status", limit: runpodConfiguration.statusPerWindow, window: runpodConfiguration.budgetWindow))
            let blobs = try BlobSettings.makeStore(settings)
            let media = try RPCClient(configuration: .init(target: try settings.string(.mediaAddr) ?? "127.0.0.1:50051"))
            let audio = try RPCClient(configuration: .init(target: try settings.string(.audioAddr) ?? "127.0.0.1:50052"))
            let context = DispatcherContext(configuration: configuration, store: store, blobs: blobs, media: media, audio: audio,
                                            runpod: RunPodClient(configuration: runpodConfiguration, budgets: budgets), slots: slots,
                                            logger: setup.logger)
            let dispatcher = Dispatcher(context: context)
            DispatcherHandlers(dispatcher: dispatcher).register(into: &setup.services)
            setup.metricsSources.append { [counters = context.counters] in counters.render() }
            let sweeper = Task { await RetentionSweeper(context: context, configuration: retention).run() }
            setup.onStop.append {
                sweeper.cancel()
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
