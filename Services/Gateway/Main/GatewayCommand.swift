import Dispatch
import Glibc
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshGatewayService
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

extension Setting {
    static let apiKeysFile = Setting("API_KEYS_FILE", default: "/var/lib/talkmesh/api-keys.json", readBy: "Gateway, `talkmesh keys`",
                                     help: "the key file (hashes and limits); missing: every `/v1` request is 401")
    static let dispatcherAddr = Setting("DISPATCHER_ADDR", default: "127.0.0.1:50053", help: "the Dispatcher's gRPC address (any client target)")
    static let imageMaxBytes = Setting("IMAGE_MAX_BYTES", .integer(1...(1 << 30)), default: "\(10 << 20)", shown: "10 MiB",
                                       help: "largest image upload")
    static let audioMaxBytes = Setting("AUDIO_MAX_BYTES", .integer(1...(1 << 31)), default: "\(50 << 20)", shown: "50 MiB",
                                       help: "largest audio upload")
    static let maxUploadBytes = Setting("MAX_UPLOAD_BYTES", .integer(1024...(1 << 32)), default: "\(80 << 20)", shown: "80 MiB",
                                        help: "largest job-creation body, base64 included")
    static let corsOrigins = Setting("CORS_ORIGINS", shown: "none", help: "origins allowed by CORS, comma-separated")
    static let redisURL = Setting("REDIS_URL", shown: "none (per process)",
                                  help: "`redis://[:password@]host[:port][/db]`: rate limits shared by every replica")
    static let redisTimeoutMs = Setting("REDIS_TIMEOUT_MS", .integer(1...10_000), default: "50",
                                        help: "time box of each Redis call, ms; past it the replica's own limits apply")
    static let jobCacheTTL = Setting("JOB_CACHE_TTL", .duration(.zero ... .seconds(60)), default: "500ms",
                                     help: "how long a `GET /v1/jobs/{id}` answer is reused (what this replica changes shows at once; others' changes within it); `0` = never")
    static let videoURLTTL = Setting("VIDEO_URL_TTL", .duration(.seconds(1) ... .seconds(7 * 86_400)), default: "6h",
                                     help: "how long a presigned video URL works (S3 stores; S3 allows at most 7 days)")
}

/// `talkmesh-gateway`: TalkMesh's public REST API for API-key clients.
@main
enum GatewayCommand {
    static let settings: [Setting] = BlobSettings.table + [
        .apiKeysFile, .dispatcherAddr, .imageMaxBytes, .audioMaxBytes, .maxUploadBytes, .maxAudioSec, .corsOrigins, .redisURL,
        .redisTimeoutMs, .jobCacheTTL, .videoURLTTL,
    ]

    static func main() {
        ServiceRunner.run(name: "talkmesh-gateway", abstract: "TalkMesh's public REST API for API-key clients.", defaultPort: 8080,
                          settings: settings) { setup, settings in
            var configuration = GatewayConfiguration()
            configuration.uploads.imageBytes = try settings.integer(.imageMaxBytes)
            configuration.uploads.audioBytes = try settings.integer(.audioMaxBytes)
            configuration.uploads.requestBytes = try settings.integer(.maxUploadBytes)
            configuration.jobCacheTTLNanoseconds = try settings.duration(.jobCacheTTL).nanosecondsClamped
            configuration.videoURLSeconds = Int(try settings.duration(.videoURLTTL).components.seconds)
            configuration.maxAudioSeconds = Double(try settings.integer(.maxAudioSec))
            configuration.corsOrigins = Set((try settings.string(.corsOrigins) ?? "").split(separator: ",")
                .map { $0.trimmingWhitespace }.filter { !$0.isEmpty })
            // Without a key file no key is valid: every /v1 request is 401 (health still answers).
            let keysPath = try settings.string(.apiKeysFile) ?? "/var/lib/talkmesh/api-keys.json"
            let keys: KeyRing
            do { keys = try KeyRing(path: keysPath) } catch let error as ServiceError {
                throw InvalidSetting(description: error.message)
            }
            var dispatcherClient = RPCClient.Configuration(target: try settings.string(.dispatcherAddr) ?? "127.0.0.1:50053")
            dispatcherClient.interceptors = Gateway.dispatcherInterceptors(logger: setup.logger)
            let dispatcher = try RPCClient(configuration: dispatcherClient)
            let limiter: any RateLimiter
            if let url = try settings.string(.redisURL), !url.isEmpty {
                let endpoint: RedisRateLimiter.Endpoint
                do { endpoint = try RedisRateLimiter.Endpoint(url: url) } catch {
                    throw InvalidSetting(description: "\(error)")
                }
                let redis = RedisRateLimiter(endpoint: endpoint, timeoutMilliseconds: try settings.integer(.redisTimeoutMs),
                                             logger: setup.logger)
                setup.metricsSources.append { redis.renderMetrics() }
                setup.logger.info("rate limits kept in Redis", metadata: ["redis": "\(endpoint.host):\(endpoint.port)"])
                limiter = redis
            } else {
                limiter = LocalRateLimiter()
            }
            let gateway = Gateway(configuration: configuration, keys: keys, limiter: limiter, blobs: try BlobSettings.makeStore(settings),
                                  dispatcher: dispatcher, logger: setup.logger)
            gateway.install(into: &setup.router)
            gateway.installGRPC(into: &setup.services)
            setup.metricsSources.append { gateway.metrics.render() }
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
