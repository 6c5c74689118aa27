import ArgumentParser
import Dispatch
import Glibc
import Logging
import TalkMeshCore
import TalkMeshGatewayService
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

/// `talkmesh-gateway`: TalkMesh's public REST API for API-key clients.
@main
struct GatewayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-gateway",
        abstract: "TalkMesh's public REST API for API-key clients.",
        discussion: settingsDiscussion + BlobStoreOptions.discussion + """

              API_KEYS_FILE              --api-keys-file              the API keys (default /var/lib/talkmesh/api-keys.json; none: every /v1 request is 401)
              DISPATCHER_ADDR            --dispatcher-addr            the Dispatcher (default 127.0.0.1:50053)
              IMAGE_MAX_BYTES            --image-max-bytes            largest image upload (default 10485760)
              AUDIO_MAX_BYTES            --audio-max-bytes            largest audio upload (default 52428800)
              MAX_UPLOAD_BYTES           --max-upload-bytes           largest job-creation body, base64 included (default 83886080)
              MAX_AUDIO_SEC              --max-audio-sec              longest audio accepted, seconds (default 1800)
              CORS_ORIGINS               --cors-origins               origins allowed by CORS, comma-separated (default none)
              REDIS_URL                  --redis-url                  redis://[:password@]host[:port][/db]: rate limits shared by every replica (default none: per process)
              REDIS_TIMEOUT_MS           --redis-timeout-ms           time box of each Redis call; past it this replica's own limits apply (default 50)
              JOB_CACHE_TTL              --job-cache-ttl              how long a GET /v1/jobs/{id} answer is reused; 0 = never (default 500ms)
              VIDEO_URL_TTL              --video-url-ttl              how long a presigned video URL works, S3 stores only (default 6h)
            """)

    @OptionGroup var options: ServiceOptions
    @OptionGroup var blobOptions: BlobStoreOptions
    @Option(help: "API key file (env API_KEYS_FILE).") var apiKeysFile: String?
    @Option(help: "Dispatcher address (env DISPATCHER_ADDR, default 127.0.0.1:50053).") var dispatcherAddr: String?
    @Option(help: "Largest image upload, bytes (env IMAGE_MAX_BYTES, default 10485760).") var imageMaxBytes: String?
    @Option(help: "Largest audio upload, bytes (env AUDIO_MAX_BYTES, default 52428800).") var audioMaxBytes: String?
    @Option(help: "Largest job-creation body, bytes (env MAX_UPLOAD_BYTES, default 83886080).") var maxUploadBytes: String?
    @Option(help: "Longest audio accepted, seconds (env MAX_AUDIO_SEC, default 1800).") var maxAudioSec: String?
    @Option(help: "Origins allowed by CORS, comma-separated (env CORS_ORIGINS).") var corsOrigins: String?
    @Option(help: "Redis for rate limits shared by every replica (env REDIS_URL).") var redisUrl: String?
    @Option(help: "Time box of each Redis call, ms (env REDIS_TIMEOUT_MS, default 50).") var redisTimeoutMs: String?
    @Option(help: "How long a job answer is reused (env JOB_CACHE_TTL, default 500ms; 0 = never).") var jobCacheTtl: String?
    @Option(help: "How long a presigned video URL works (env VIDEO_URL_TTL, default 6h; S3 stores only).") var videoUrlTtl: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-gateway", defaultPort: 8080, options: options) { setup in
            let settings = SettingsReader()
            var configuration = GatewayConfiguration()
            configuration.uploads.imageBytes = try settings.integer(imageMaxBytes, "IMAGE_MAX_BYTES", 10 << 20, 1...(1 << 30))
            configuration.uploads.audioBytes = try settings.integer(audioMaxBytes, "AUDIO_MAX_BYTES", 50 << 20, 1...(1 << 31))
            configuration.uploads.requestBytes = try settings.integer(maxUploadBytes, "MAX_UPLOAD_BYTES", 80 << 20, 1024...(1 << 32))
            configuration.jobCacheTTLNanoseconds = try settings.duration(jobCacheTtl, "JOB_CACHE_TTL", 500_000_000)
            guard configuration.jobCacheTTLNanoseconds <= 60_000_000_000 else {
                throw ServiceOptions.InvalidSetting(description: "JOB_CACHE_TTL: at most 60s")
            }
            let urlTTL = try settings.duration(videoUrlTtl, "VIDEO_URL_TTL", 6 * 3_600_000_000_000)
            guard urlTTL >= 1_000_000_000 && urlTTL <= 7 * 86_400_000_000_000 else {
                throw ServiceOptions.InvalidSetting(description: "VIDEO_URL_TTL: from 1s to 7 days (S3's longest presigned URL)")
            }
            configuration.videoURLSeconds = Int(urlTTL / 1_000_000_000)
            configuration.maxAudioSeconds = Double(try settings.integer(maxAudioSec, "MAX_AUDIO_SEC", 1800, 1...86_400))
            configuration.corsOrigins = Set((settings.string(corsOrigins, "CORS_ORIGINS") ?? "").split(separator: ",")
                .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
            // Without a key file no key is valid: every /v1 request is 401 (health still answers).
            let keysPath = settings.string(apiKeysFile, "API_KEYS_FILE") ?? "/var/lib/talkmesh/api-keys.json"
            let keys: KeyRing
            do { keys = try KeyRing(path: keysPath) } catch let error as ServiceError {
                throw ServiceOptions.InvalidSetting(description: error.message)
            }
            let dispatcher = try RPCClient(configuration: .init(target: settings.string(dispatcherAddr, "DISPATCHER_ADDR") ?? "127.0.0.1:50053"))
            let limiter: any RateLimiter
            if let url = settings.string(redisUrl, "REDIS_URL"), !url.isEmpty {
                let endpoint: RedisRateLimiter.Endpoint
                do { endpoint = try RedisRateLimiter.Endpoint(url: url) } catch {
                    throw ServiceOptions.InvalidSetting(description: "\(error)")
                }
                let redis = RedisRateLimiter(endpoint: endpoint, timeoutMilliseconds: try settings.integer(redisTimeoutMs, "REDIS_TIMEOUT_MS", 50, 1...10_000),
                                             logger: setup.logger)
                setup.metricsSources.append { redis.renderMetrics() }
                setup.logger.info("rate limits kept in Redis", metadata: ["redis": "\(endpoint.host):\(endpoint.port)"])
                limiter = redis
            } else {
                limiter = LocalRateLimiter()
            }
            let gateway = Gateway(configuration: configuration, keys: keys, limiter: limiter, blobs: try blobOptions.makeStore(settings),
                                  dispatcher: dispatcher, logger: setup.logger)
            gateway.install(into: &setup.router)
            gateway.installGRPC(into: &setup.services)
            if keys.count == 0 {
                setup.logger.warning("no API keys: every /v1 request is refused until `talkmesh keys create` adds one", metadata: ["file": "\(keysPath)"])
            } else {
                setup.logger.info("API keys loaded", metadata: ["keys": "\(keys.count)", "file": "\(keysPath)"])
            }
            KeyReloader.start(keys, logger: setup.logger)
            let health = setup.health
            let probe = Task { await gateway.probeDispatcher(health: health) }
            setup.onStop.append { probe.cancel() }
        }
    }
}

/// Reloads the key file on SIGHUP and when it changes (checked each second).
enum KeyReloader {
    nonisolated(unsafe) static var sources: [any DispatchSourceProtocol] = []

    static func start(_ keys: KeyRing, logger: Logger) {
        signal(SIGHUP, SIG_IGN)
        let queue = DispatchQueue(label: "talkmesh.keys")
        let reload: @Sendable (Bool) -> Void = { force in
            do {
                if try keys.reload(force: force) { logger.info("API keys reloaded", metadata: ["keys": "\(keys.count)"]) }
            } catch {
                logger.error("the API key file cannot be read; the keys loaded before stay in use", metadata: ["error": "\(error)"])
            }
        }
        let hangup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: queue)
        hangup.setEventHandler { reload(true) }
        hangup.resume()
        let timer = DispatchSource.makeTimerSource(queue: queue)
        timer.schedule(deadline: .now() + 1, repeating: 1)
        timer.setEventHandler { reload(false) }
        timer.resume()
        sources = [hangup, timer]
    }
}
