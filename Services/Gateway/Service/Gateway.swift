import Foundation
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// The Gateway's settings.
public struct GatewayConfiguration: Sendable {
    public var uploads = UploadLimits()
    /// Longest audio accepted (MAX_AUDIO_SEC).
    public var maxAudioSeconds = 1800.0
    /// Origins allowed by CORS (CORS_ORIGINS, comma-separated; none by default).
    public var corsOrigins: Set<String> = []
    /// SSE keep-alive comment period.
    public var keepAliveNanoseconds: Int64 = 15_000_000_000
    /// Largest video sent inline for `?include=video_base64`.
    public var maxInlineVideoBytes = 64 << 20
    /// How long a `GET /v1/jobs/{id}` answer is reused (JOB_CACHE_TTL; 0: never).
    public var jobCacheTTLNanoseconds: Int64 = 500_000_000
    /// How long a presigned video URL stays valid (VIDEO_URL_TTL; S3 stores only).
    public var videoURLSeconds = 6 * 3600
    /// Threads for blob calls (uploads moved in, downloads, inline videos).
    public var blobThreads = 4
    public init() {}
}

/// The Gateway's refusals, for Prometheus: authentication failures by reason, and rate-limit
/// refusals by key id (bounded by the key file) and reason.
public final class GatewayMetrics: Sendable {
    public let authFailures = CounterFamily("talkmesh_gateway_auth_failures_total", help: "Requests and calls refused for their API key, by reason.",
                                            labels: ["reason"], seeded: [["missing"], ["invalid"]])
    public let rateLimited = CounterFamily("talkmesh_gateway_rate_limited_total",
                                           help: "Requests refused by a limit, by key id and reason (requests, jobs, active_jobs).",
                                           labels: ["key_id", "reason"])

    public func render() -> String { authFailures.render() + rateLimited.render() }
}

/// What one request carries through the interceptor chain: its id, and the key once known.
final class RequestInfo: @unchecked Sendable {
    let id: String
    var keyID = "-"
    init(id: String) { self.id = id }
}

/// The public REST API: every route passes one interceptor chain (request id and access log,
/// CORS, API-key auth, the per-key request limit), then its handler, which speaks to the
/// Dispatcher over gRPC and to the BlobStore.
public final class Gateway: Sendable {
    @TaskLocal static var key: APIKey?
    @TaskLocal static var info: RequestInfo?
    /// The deadline of the gRPC call being served (monotonic nanoseconds), for the calls it makes.
    @TaskLocal static var callerDeadline: Int64?

    let configuration: GatewayConfiguration
    let keys: KeyRing
    let limiter: any RateLimiter
    let blobs: any BlobStore
    /// Blob calls block (S3 is a network call): they run here, never on an event loop.
    let blobIO: BlockingWorkPool
    let dispatcher: RPCClient
    let logger: Logger
    let jobCache: JobCache
    /// A completed job's presigned video URL when the store has them (S3).
    let videoURL: JobJSON.VideoURL
    /// Refusals by reason: authentication failures, and rate limits by key id.
    public let metrics = GatewayMetrics()

    /// Where RunPod posts chunk completions (`RUNPOD_WEBHOOK_BASE_URL` at the Dispatcher).
    static let runpodWebhookPrefix = "/v1/runpod-webhook/"

    /// Paths served without a key.
    static let openPaths: Set<String> = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/health"]

    public init(configuration: GatewayConfiguration, keys: KeyRing, limiter: any RateLimiter, blobs: any BlobStore,
                dispatcher: RPCClient, logger: Logger) {
        self.configuration = configuration
        self.keys = keys
        self.limiter = limiter
        self.blobs = blobs
        blobIO = BlockingWorkPool(threads: configuration.blobThreads, name: "blob-io")
        self.dispatcher = dispatcher
        self.logger = logger
        videoURL = JobJSON.presignedVideoURL(seconds: configuration.videoURLSeconds) { key, seconds in
            (try? BlobKey(key)).flatMap { blobs.presignedURL($0, expiresSeconds: seconds) }
        }
        jobCache = JobCache(ttlNanoseconds: configuration.jobCacheTTLNanoseconds, videoURL: videoURL)
    }

    /// Adds the routes and the interceptor chain.
    public func install(into router: inout HTTPRouter) {
        router.errorResponse = { status, code, message in JobJSON.error(status, code, message) }
        router.thrownResponse = { [self] error in routerResponse(error) }
        router.interceptors = [
            { [self] request, route, next in try await logged(request, route, next) },
            { [self] request, route, next in try await seedErrors(request, route, next) },
        ]
        // Every request passes each layer: CORS is one only when origins are configured.
        if !configuration.corsOrigins.isEmpty {
            router.interceptors.append { [self] request, _, next in try await cors(request, next) }
        }
        router.interceptors.append { [self] request, _, next in try await authenticated(request, next) }
        installJobRoutes(into: &router)
        installSeedRoutes(into: &router)
        installDownloadRoutes(into: &router)
        router.add("GET", "/openapi.json") { _ in
            HTTPResponse(status: 200, headers: [("content-type", "application/json")], body: Array(OpenAPIDocument.json.utf8))
        }
    }

    /// A thrown error as the API reports it (a 429 with its rate-limit headers; 500s logged).
    func routerResponse(_ error: any Error) -> HTTPResponse {
        if let refusal = error as? RateLimitRefusal {
            var response = JobJSON.error(429, "RATE_LIMITED", refusal.message)
            response.headers += refusal.decision.headers
            return response
        }
        let response = JobJSON.error(for: error)
        if response.status == 500 { logger.error("request failed", metadata: ["error": "\(error)"]) }
        return response
    }

    // MARK: Interceptors

    /// Accepts or makes the request id, echoes it, and writes one JSON access-log line (never a
    /// key or an Authorization header).
    private func logged(_ request: HTTPRequest, _ route: String,
                        _ next: @Sendable (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse {
        let started = MonotonicClock.nanoseconds()
        let given = request.header("x-request-id") ?? ""
        let id = Self.validRequestID(given) ? given : Self.newRequestID()
        let info = RequestInfo(id: id)
        var response: HTTPResponse
        do {
            response = try await Self.$info.withValue(info) { try await next(request) }
        } catch {
            response = routerResponse(error)
        }
        response.headers.append(("x-request-id", id))
        // The metadata is built only when the line is logged (LOG_LEVEL).
        logger.info("request", metadata: [
            "request_id": "\(id)", "key_id": "\(info.keyID)", "method": "\(request.method)", "route": "\(route)",
            "status": "\(response.status)", "bytes": "\(Self.bodyBytes(response))", "trace_id": "\(TraceContext.current?.traceID ?? "-")",
            "duration_ms": "\(Double((MonotonicClock.nanoseconds() - started) / 10_000) / 100)",
        ])
        return response
    }

    /// The body's size for the access log: a streamed body's declared length ("-" when it has none,
    /// as an event stream).
    static func bodyBytes(_ response: HTTPResponse) -> String {
        guard response.streamBody != nil else { return String(response.body.count) }
        return response.headers.first { $0.name.lowercased() == "content-length" }?.value ?? "-"
    }

    /// A request id a caller may choose: 1–128 visible ASCII characters.
    static func validRequestID(_ given: String) -> Bool {
        (1...128).contains(given.utf8.count) && given.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }
    }

    /// A request id (or an upload's folder): unique, not secret.
    static func newRequestID() -> String {
        TraceContext.randomHex(bytes: 8)
    }

    /// CORS for the configured origins: preflights answered here, headers added to the rest.
    private func cors(_ request: HTTPRequest, _ next: @Sendable (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse {
        guard let origin = request.header("origin"), configuration.corsOrigins.contains(origin) || configuration.corsOrigins.contains("*") else {
            return try await next(request)
        }
        let allow: [(name: String, value: String)] = [("access-control-allow-origin", origin), ("vary", "Origin")]
        if request.method == "OPTIONS", request.header("access-control-request-method") != nil {
            return HTTPResponse(status: 204, headers: allow + [
                ("access-control-allow-methods", "GET, POST, DELETE, OPTIONS"),
                ("access-control-allow-headers", "Authorization, X-API-Key, Content-Type, Idempotency-Key, Last-Event-ID, X-Request-Id, Range, If-None-Match"),
                ("access-control-max-age", "600"),
            ])
        }
        var response = try await next(request)
        response.headers += allow + [("access-control-expose-headers", "X-Request-Id, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After, ETag, Location")]
        return response
    }

    /// The key from `Authorization: Bearer …` or `X-API-Key`, then the key's request budget.
    private func authenticated(_ request: HTTPRequest, _ next: @Sendable (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse {
        // RunPod's webhooks carry no key: the job's secret in the path authenticates them (at the Dispatcher).
        if Self.openPaths.contains(request.path) || request.path.hasPrefix(Self.runpodWebhookPrefix) { return try await next(request) }
        let secret = Self.secret(authorization: request.header("authorization"), apiKey: request.header("x-api-key"))
        let challenge: [(name: String, value: String)] = [("www-authenticate", "Bearer")]
        guard let secret, !secret.isEmpty else {
            metrics.authFailures.increment(["missing"])
            var response = JobJSON.error(401, "UNAUTHORIZED", "an API key is required (Authorization: Bearer KEY or X-API-Key: KEY)")
            response.headers += challenge
            return response
        }
        guard let key = keys.authenticate(secret) else {
            metrics.authFailures.increment(["invalid"])
            var response = JobJSON.error(401, "UNAUTHORIZED", "the API key is not valid")
            response.headers += challenge
            return response
        }
        Self.info?.keyID = key.id
        // In-process buckets answer at once; only Redis needs to suspend.
        let decision = if let local = limiter as? LocalRateLimiter {
            local.takeNow("req:" + key.id, rate: key.rate, burst: key.burst)
        } else {
            await limiter.take("req:" + key.id, rate: key.rate, burst: key.burst)
        }
        guard decision.allowed else {
            metrics.rateLimited.increment([key.id, "requests"])
            var response = JobJSON.error(429, "RATE_LIMITED", "request rate limit exceeded; retry after \(decision.retryAfterSeconds) s")
            response.headers += decision.headers
            return response
        }
        var response = try await Self.$key.withValue(key) { try await next(request) }
        response.headers += decision.headers
        return response
    }

    /// The key a request or call presents: `Authorization: Bearer KEY` wins over `X-API-Key: KEY`.
    static func secret(authorization: String?, apiKey: String?) -> String? {
        // Byte by byte: every request passes here (Foundation's trimming costs microseconds).
        if var authorization {
            let token: String? = authorization.withUTF8 { bytes in
                // "Bearer " in any case, then the token without surrounding blanks.
                guard bytes.count > 7, bytes[6] == 0x20, zip(bytes.prefix(6), "bearer".utf8).allSatisfy({ $0 | 0x20 == $1 }) else { return nil }
                let isSpace: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 }
                var start = 7, end = bytes.count
                while start < end, isSpace(bytes[start]) { start += 1 }
                while end > start, isSpace(bytes[end - 1]) { end -= 1 }
                return String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<end]), as: UTF8.self)
            }
            if let token { return token }
        }
        return apiKey
    }

    /// Watches the Dispatcher (gRPC health, every 2 s): /readyz and the gRPC health status say
    /// whether job calls can succeed.
    public func probeDispatcher(health: HealthService) async {
        var serving = true
        while !Task.isCancelled {
            let reachable: Bool
            do {
                let answer = try await dispatcher.unary(Health.check, HealthCheckRequest(), options: CallOptions(timeoutNanoseconds: 2_000_000_000))
                reachable = answer.status == .serving
            } catch {
                reachable = false
            }
            if reachable != serving {
                serving = reachable
                health.setStatus(serving ? .serving : .notServing)
                if !serving { logger.warning("the Dispatcher is unreachable; not ready") }
            }
            try? await Task.sleep(nanoseconds: 2_000_000_000)
        }
    }

    /// The key the request was authenticated with (inside the chain).
    static func caller() throws -> APIKey {
        guard let key else { throw ServiceError(.unauthorized, "an API key is required") }
        return key
    }

    /// The caller's job, or NOT_FOUND — also for another key's job (never 403: ids are not confirmed);
    /// EXPIRED once retention deleted it.
    func ownJob(_ id: String, includingTimeline: Bool = false) async throws -> Job {
        let key = try Self.caller()
        let job = try await fetchJob(id, includingTimeline: includingTimeline)
        guard job.owner == key.id else { throw ServiceError(.jobNotFound, "no job \(id)") }
        try Self.requireStored(job)
        return job
    }

    /// EXPIRED for what is left of a job retention deleted (JOB_RETENTION after it ended).
    static func requireStored(_ job: Job) throws(ServiceError) {
        guard job.expiredAtUnixMs == 0 else {
            throw ServiceError(.expired, "job \(job.id) ended \(JobJSON.time(job.completedAtUnixMs)) and was deleted \(JobJSON.time(job.expiredAtUnixMs))")
        }
    }

    /// EXPIRED once retention deleted the job's video (VIDEO_RETENTION after it ended).
    static func requireVideo(_ job: Job) throws(ServiceError) {
        guard job.blobsDeletedAtUnixMs == 0 else {
            throw ServiceError(.expired, "the video of job \(job.id) was deleted \(JobJSON.time(job.blobsDeletedAtUnixMs)), after the retention period")
        }
    }

    /// The caller's job `id` as `GET /v1/jobs/{id}` answers it, from the cache while fresh.
    func ownJobAnswer(_ id: String) async throws -> JobCache.Answer {
        let key = try Self.caller()
        let answer: JobCache.Answer
        if let cached = jobCache.answer(id) { answer = cached } else { answer = jobCache.store(try await fetchJob(id)) }
        guard answer.job.owner == key.id else { throw ServiceError(.jobNotFound, "no job \(id)") }
        try Self.requireStored(answer.job)
        return answer
    }

    /// `GetJob`, whoever owns the job.
    private func fetchJob(_ id: String, includingTimeline: Bool = false) async throws -> Job {
        var request = GetJobRequest()
        request.id = id
        request.includeTimeline = includingTimeline
        let job: Job
        do {
            job = try await dispatcher.unary(DispatcherService.getJob, request, options: CallOptions(timeoutNanoseconds: 10_000_000_000))
        } catch let error as RPCError where error.code == .notFound || error.code == .invalidArgument {
            throw ServiceError(.jobNotFound, "no job \(id)")
        }
        return job
    }
}
