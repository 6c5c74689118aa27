import ArgumentParser
import Logging
import TalkMeshCore
import TalkMeshDispatcherService
import TalkMeshRPC
import TalkMeshService

/// `talkmesh-dispatcher`: TalkMesh dispatcher: owns every job and drives it through RunPod.
@main
struct DispatcherCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-dispatcher",
        abstract: "TalkMesh dispatcher: owns every job and drives it through RunPod.",
        discussion: settingsDiscussion + BlobStoreOptions.discussion + """

              JOB_STORE                  --job-store                  where jobs live: sqlite://PATH (one replica; default sqlite:///var/lib/talkmesh/jobs.db)
                                                                      or postgres://USER:PASS@HOST:PORT/DB (any number of replicas)
              LEASE_TTL                  --lease-ttl                  PostgreSQL: how long a replica's claim on a job lasts unrenewed (default 30s)
              MEDIA_ADDR                 --media-addr                 the Media service (default 127.0.0.1:50051)
              AUDIO_ADDR                 --audio-addr                 the Audio service (default 127.0.0.1:50052)
              MAX_CONCURRENT_CHUNKS      --max-concurrent-chunks      chunks of one job on RunPod at once (default 3)
              MAX_RUNPOD_JOBS_IN_FLIGHT  --max-runpod-jobs-in-flight  RunPod jobs in flight, all jobs and replicas together (default 50)
              CHUNK_MAX_ATTEMPTS         --chunk-max-attempts         attempts per chunk before the job fails (default 3)
              JOB_TIMEOUT                --job-timeout                a job's deadline from its creation (default 1h)
              CHUNK_TARGET_SEC           --chunk-target-sec           chunk length asked of Audio, seconds (default 45)
              RUNPOD_BASE_URL                                         RunPod's API (default https://api.runpod.ai/v2)
              RUNPOD_ENDPOINT_ID                                      the InfiniteTalk endpoint (required)
              RUNPOD_API_KEY                                          sent as Authorization: Bearer
            """)

    @OptionGroup var options: ServiceOptions
    @Option(help: "Job store URL (env JOB_STORE, default sqlite:///var/lib/talkmesh/jobs.db).") var jobStore: String?
    @Option(help: "PostgreSQL: how long a claim on a job lasts unrenewed (env LEASE_TTL, default 30s).") var leaseTtl: String?
    @OptionGroup var blobOptions: BlobStoreOptions
    @Option(help: "Media service address (env MEDIA_ADDR, default 127.0.0.1:50051).") var mediaAddr: String?
    @Option(help: "Audio service address (env AUDIO_ADDR, default 127.0.0.1:50052).") var audioAddr: String?
    @Option(help: "Chunks of one job on RunPod at once (env MAX_CONCURRENT_CHUNKS, default 3).") var maxConcurrentChunks: String?
    @Option(help: "RunPod jobs in flight for all jobs (env MAX_RUNPOD_JOBS_IN_FLIGHT, default 50).") var maxRunpodJobsInFlight: String?
    @Option(help: "Attempts per chunk (env CHUNK_MAX_ATTEMPTS, default 3).") var chunkMaxAttempts: String?
    @Option(help: "A job's deadline (env JOB_TIMEOUT, default 1h).") var jobTimeout: String?
    @Option(help: "Chunk length asked of Audio, seconds (env CHUNK_TARGET_SEC, default 45).") var chunkTargetSec: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-dispatcher", defaultPort: 50053, options: options) { setup in
            let settings = SettingsReader()
            var configuration = DispatcherConfiguration()
            configuration.maxConcurrentChunks = try settings.integer(maxConcurrentChunks, "MAX_CONCURRENT_CHUNKS", 3, 1...64)
            configuration.maxRunPodJobsInFlight = try settings.integer(maxRunpodJobsInFlight, "MAX_RUNPOD_JOBS_IN_FLIGHT", 50, 1...10_000)
            configuration.chunkMaxAttempts = try settings.integer(chunkMaxAttempts, "CHUNK_MAX_ATTEMPTS", 3, 1...20)
            configuration.jobTimeoutMs = try settings.duration(jobTimeout, "JOB_TIMEOUT", 3_600_000_000_000) / 1_000_000
            configuration.chunkTargetSec = Double(try settings.integer(chunkTargetSec, "CHUNK_TARGET_SEC", 45, 5...60))
            guard configuration.jobTimeoutMs >= 1 else {
                throw ServiceOptions.InvalidSetting(description: "JOB_TIMEOUT must be at least 1ms")
            }
            let runpodConfiguration: RunPodClient.Configuration
            do { runpodConfiguration = try RunPodClient.Configuration.fromEnvironment(settings.environment) } catch let error as ServiceError {
                throw ServiceOptions.InvalidSetting(description: error.message)
            }
            let leaseNanoseconds = try settings.duration(leaseTtl, "LEASE_TTL", 30_000_000_000)
            guard leaseNanoseconds >= 300_000_000 else { throw ServiceOptions.InvalidSetting(description: "LEASE_TTL must be at least 300ms") }
            let store = try JobStores.open(settings.string(jobStore, "JOB_STORE") ?? "sqlite:///var/lib/talkmesh/jobs.db",
                                           leaseSeconds: Double(leaseNanoseconds) / 1e9)
            // The in-flight cap and RunPod's request budget hold for the deployment: the store
            // shares them between replicas (SQLite: this process's own).
            let slots = try store.inFlightSlots(capacity: configuration.maxRunPodJobsInFlight)
            let budgets = (run: try store.requestGate(route: "run", limit: runpodConfiguration.runPerWindow, window: runpodConfiguration.budgetWindow),
                           status: try store.requestGate(route: "status", limit: runpodConfiguration.statusPerWindow, window: runpodConfiguration.budgetWindow))
            let blobs = try blobOptions.makeStore(settings)
            let media = try RPCClient(configuration: .init(target: settings.string(mediaAddr, "MEDIA_ADDR") ?? "127.0.0.1:50051"))
            let audio = try RPCClient(configuration: .init(target: settings.string(audioAddr, "AUDIO_ADDR") ?? "127.0.0.1:50052"))
            let context = DispatcherContext(configuration: configuration, store: store, blobs: blobs, media: media, audio: audio,
                                            runpod: RunPodClient(configuration: runpodConfiguration, budgets: budgets), slots: slots,
                                            logger: setup.logger)
            let dispatcher = Dispatcher(context: context)
            DispatcherHandlers(dispatcher: dispatcher).register(into: &setup.services)
            setup.metricsSources.append { [counters = context.counters] in counters.render() }
            setup.onStop.append { await dispatcher.shutdown() }
            let health = setup.health, logger = setup.logger
            Task {
                do { try await dispatcher.start() } catch { logger.error("cannot resume jobs", metadata: ["error": "\(error)"]) }
                await StoreProbe(store: store, health: health, counters: context.counters, logger: logger).run()
            }
        }
    }
}
