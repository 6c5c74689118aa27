import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC

/// RunPod Serverless over libcurl: submit, status, cancel, retry, health, with retries (429 honouring
/// Retry-After, 5xx and transport errors with jittered exponential backoff), 401 never retried,
/// a request budget per route, and results decoded straight into the blob store.
public struct RunPodClient: Sendable {
    public struct Configuration: Sendable {
        public var baseURL = "https://api.runpod.ai/v2"
        public var endpointID: String
        public var apiKey: String?
        public var maxAttempts = 5
        public var backoffInitial = 0.5
        public var backoffMax = 8.0
        public var requestTimeoutMs = 60_000
        public var maxBodyBytes = 10 * 1024 * 1024
        public var volumePath: String?
        /// Per 10 s, a margin under RunPod's documented limits.
        public var runPerWindow = 900
        public var statusPerWindow = 1800
        public var budgetWindow = 10.0

        public init(endpointID: String) {
            self.endpointID = endpointID
        }

        /// From RUNPOD_BASE_URL (default https://api.runpod.ai/v2), RUNPOD_ENDPOINT_ID (required)
        /// and RUNPOD_API_KEY (sent as `Authorization: Bearer`).
        public static func fromEnvironment(_ environment: [String: String]) throws(ServiceError) -> Configuration {
            guard let endpoint = environment["RUNPOD_ENDPOINT_ID"], !endpoint.isEmpty else {
                throw ServiceError(.invalidArgument, "RUNPOD_ENDPOINT_ID is required")
            }
            var configuration = Configuration(endpointID: endpoint)
            if let base = environment["RUNPOD_BASE_URL"], !base.isEmpty {
                guard base.hasPrefix("http://") || base.hasPrefix("https://") else {
                    throw ServiceError(.invalidArgument, "RUNPOD_BASE_URL=\(base): expected an http(s) URL")
                }
                configuration.baseURL = base.hasSuffix("/") ? String(base.dropLast()) : base
            }
            configuration.apiKey = environment["RUNPOD_API_KEY"].flatMap { $0.isEmpty ? nil : $0 }
            configuration.volumePath = environment["RUNPOD_VOLUME_PATH"].flatMap { $0.isEmpty ? nil : $0 }
            return configuration
        }
    }

    public let configuration: Configuration
    let engine: CurlEngine
    /// RunPod requests by route and answer, and their durations.
    public let metrics = RunPodMetrics()
    let runBudget: any RequestGate
    let statusBudget: any RequestGate

    /// `budgets` (for `/run` and `/retry`; for `/status`, `/cancel` and `/health`): this process's
    /// own sliding windows unless given (a store shares them between replicas).
    public init(configuration: Configuration, engine: CurlEngine = CurlEngine(), budgets: (run: any RequestGate, status: any RequestGate)? = nil) {
        self.configuration = configuration
        self.engine = engine
        runBudget = budgets?.run ?? RequestBudget(limit: configuration.runPerWindow, window: configuration.budgetWindow)
        statusBudget = budgets?.status ?? RequestBudget(limit: configuration.statusPerWindow, window: configuration.budgetWindow)
    }

    private var base: String { "\(configuration.baseURL)/\(configuration.endpointID)" }

    /// POST /run. A body over RunPod's 10 MB is refused before sending.
    public func submit(_ input: InfiniteTalkInput, executionTimeoutMs: Int = 600_000, ttlMs: Int = 86_400_000, webhook: String? = nil) async throws -> RunPodJob {
        let body = input.runBody(executionTimeoutMs: executionTimeoutMs, ttlMs: ttlMs, webhook: webhook)
        guard body.count <= configuration.maxBodyBytes else {
            throw ServiceError(.runpodPayloadTooLarge, "the /run body would be \(body.count) bytes; RunPod takes at most \(configuration.maxBodyBytes)")
        }
        return try RunPodJob.parse(try await send("POST", "/run", body: body, budget: runBudget).body)
    }

    /// GET /status/{id}; 404 is RUNPOD_JOB_EXPIRED.
    public func status(_ id: String) async throws -> RunPodJob {
        try RunPodJob.parse(try await send("GET", "/status/\(id)", budget: statusBudget).body)
    }

    /// POST /cancel/{id}.
    public func cancel(_ id: String) async throws -> RunPodJob {
        try RunPodJob.parse(try await send("POST", "/cancel/\(id)", budget: statusBudget).body)
    }

    /// POST /retry/{id} (FAILED or TIMED_OUT jobs, same id).
    public func retry(_ id: String) async throws -> RunPodJob {
        try RunPodJob.parse(try await send("POST", "/retry/\(id)", budget: runBudget).body)
    }

    /// GET /health, as JSON.
    public func health() async throws -> [String: Any] {
        let exchange = try await send("GET", "/health", budget: statusBudget)
        return ((try? JSONSerialization.jsonObject(with: Data(exchange.body))) as? [String: Any]) ?? [:]
    }

    /// Stores a COMPLETED job's video under `key`: base64 decoded in slices into a scratch file (the
    /// decoded video is never whole in memory), a URL downloaded, a volume path read. The blob is
    /// moved in on `io` when given, unless the store is a local directory (a rename).
    public func storeVideo(of job: RunPodJob, in store: any BlobStore, as key: BlobKey, io: BlockingWorkPool? = nil) async throws {
        if let failure = job.failure { throw failure }
        guard let video = job.video else { throw ServiceError(.runpodResultMissing, "job \(job.id) has no video") }
        let scratch = try store.reusableScratchPath(suffix: ".mp4")
        defer { unlink(scratch) }
        switch video {
        case .base64(let text):
            let handle = try FileHandleWriter(path: scratch)
            var decoder = Base64Stream()
            var decoded: [UInt8] = []
            do {
                try text.withUnsafeBufferPointer { (text) throws(Base64Stream.Failure) in
                    var start = 0
                    while start < text.count {
                        let end = min(text.count, start + (1 << 20))
                        decoded.removeAll(keepingCapacity: true)
                        try decoder.feed(UnsafeBufferPointer(rebasing: text[start..<end]), into: &decoded)
                        try? handle.write(decoded)
                        start = end
                    }
                }
                decoded.removeAll(keepingCapacity: true)
                try decoder.finish(into: &decoded)
            } catch {
                throw ServiceError(.runpodBadResponse, "output.video is not valid base64")
            }
            try handle.write(decoded)  // throws the first failed write, if one failed in the loop
            try handle.finish()
        case .url(let url):
            let exchange = try await engine.perform(method: "GET", url: url, timeoutMilliseconds: configuration.requestTimeoutMs, bodyLimit: 2 << 30)
            guard exchange.status == 200 else { throw ServiceError(.runpodResultMissing, "downloading \(url) answered \(exchange.status)") }
            try FileBlobStore.writeAll(scratch, exchange.body)
        case .volumePath(let path):
            guard let volume = configuration.volumePath else {
                throw ServiceError(.runpodResultMissing, "the worker wrote its video to a network volume (\(path)), and none is configured")
            }
            let local = volume + "/" + path.split(separator: "/").dropFirst(path.hasPrefix("/runpod-volume") ? 1 : 0).joined(separator: "/")
            try FileBlobStore.writeAll(scratch, try FileBlobStore.readAll(local))
        }
        if let io, !store.isLocal {
            try await io.run { _ in try store.store(key, fromFile: scratch) }
        } else {
            try store.store(key, fromFile: scratch)
        }
    }

    // MARK: Transport

    private func send(_ method: String, _ path: String, body: (any RequestBytes)? = nil, budget: any RequestGate) async throws -> HTTPExchange {
        var headers = ["Content-Type: application/json", "Accept: application/json"]
        if let key = configuration.apiKey { headers.append("Authorization: Bearer \(key)") }
        var attempt = 0
        while true {
            attempt += 1
            try await budget.acquire()
            let delay: Double
            // A client span per HTTP request, named by the route without the job id.
            let template = ["/status/", "/cancel/", "/retry/"].first(where: path.hasPrefix).map { $0 + "{id}" } ?? path
            let span = TalkMeshTracer.shared.start("runpod \(method) \(template)", ofKind: .client)
            if span.isRecording {
                span.set("http.request.method", method)
                span.set("url.template", template)
                span.set("runpod.endpoint_id", configuration.endpointID)
                span.set("talkmesh.attempt", Int64(attempt))
            }
            do {
                let exchange: HTTPExchange
                let route = String(template.dropFirst().prefix { $0 != "/" })
                let started = MonotonicClock.nanoseconds()
                do {
                    let url = base + path, timeout = configuration.requestTimeoutMs
                    if let body {
                        exchange = try await engine.perform(method: method, url: url, headers: headers, borrowing: body, timeoutMilliseconds: timeout)
                    } else {
                        exchange = try await engine.perform(method: method, url: url, headers: headers, timeoutMilliseconds: timeout)
                    }
                    metrics.record(route: route, code: String(exchange.status), nanoseconds: MonotonicClock.nanoseconds() - started)
                    span.set("http.response.status_code", Int64(exchange.status))
                    if exchange.status >= 400 { span.fail("HTTP \(exchange.status)") } else { span.end() }
                } catch {
                    metrics.record(route: route, code: error is CancellationError ? "cancelled" : "transport_error",
                                   nanoseconds: MonotonicClock.nanoseconds() - started)
                    span.fail("\(error)")
                    throw error
                }
                switch exchange.status {
                case 200...299:
                    return exchange
                case 401, 403:
                    throw ServiceError(.runpodUnauthorized, "RunPod refused the API key (HTTP \(exchange.status))")
                case 404 where path.hasPrefix("/status") || path.hasPrefix("/cancel") || path.hasPrefix("/retry"):
                    throw ServiceError(.runpodJobExpired, "RunPod no longer knows this job (expired or unknown)")
                case 413:
                    throw ServiceError(.runpodPayloadTooLarge, "RunPod refused the request body as too large")
                case 429:
                    let retryAfter = RetryAfter.seconds(exchange.headers["retry-after"]) ?? backoff(attempt)
                    guard attempt < configuration.maxAttempts else {
                        throw ServiceError(.runpodUnavailable, "RunPod kept answering 429 (rate limited)")
                    }
                    delay = max(retryAfter, backoff(attempt))
                case 500...599:
                    guard attempt < configuration.maxAttempts else {
                        throw ServiceError(.runpodUnavailable, "RunPod answered HTTP \(exchange.status)", cause: String(decoding: exchange.body.prefix(200), as: UTF8.self))
                    }
                    delay = backoff(attempt)
                default:
                    throw ServiceError(.runpodBadResponse, "RunPod answered HTTP \(exchange.status) to \(method) \(path)",
                                       cause: String(decoding: exchange.body.prefix(200), as: UTF8.self))
                }
            } catch let error as CurlError {
                guard attempt < configuration.maxAttempts else {
                    throw ServiceError(.runpodUnavailable, "cannot reach RunPod", cause: error.message)
                }
                delay = backoff(attempt)
            }
            try await Task.sleep(nanoseconds: UInt64(min(max(delay, 0), RetryAfter.longestSeconds) * 1e9))
        }
    }

    /// Exponential backoff with full jitter.
    func backoff(_ attempt: Int) -> Double {
        let cap = min(configuration.backoffMax, configuration.backoffInitial * pow(2, Double(attempt - 1)))
        return Double.random(in: (cap / 2)...cap)
    }
}

/// RunPod's answers, for Prometheus: requests by route (`run`, `status`, `cancel`, `retry`,
/// `health`) and HTTP code (or `transport_error`), and request durations by route.
public final class RunPodMetrics: Sendable {
    let requests = CounterFamily("talkmesh_runpod_requests_total", help: "Requests to RunPod, by route and HTTP code (transport_error: no answer).",
                                 labels: ["route", "code"])
    let durations = HistogramFamily("talkmesh_runpod_request_duration_seconds", help: "Time of each RunPod request, by route.",
                                    labels: ["route"], bounds: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

    func record(route: String, code: String, nanoseconds: Int64) {
        requests.increment([route, code])
        durations.observe([route], Double(nanoseconds) / 1e9)
    }

    public func render() -> String { requests.render() + durations.render() }
}
