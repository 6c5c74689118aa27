import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC

/// RunPod's `/v2/{endpoint}/…` REST API on the Shared HTTP runtime (HTTP/1.1 and h2c).
struct EmulatorAPI: Sendable {
    struct Faults: Sendable {
        var http429Rate = 0.0
        var http500Rate = 0.0
        var slowStatusSeconds = 0.0
    }

    let board: JobBoard
    let apiKey: String?
    let faults: Faults
    let log = RequestLog()
    static let maxBody = 10 * 1024 * 1024
    static let sevenDaysMs = 7 * 86_400_000

    func register(into router: inout HTTPRouter) {
        let api = self
        // Up to twice RunPod's limit reaches the handler, which answers RunPod's JSON 413; the runtime refuses more.
        router.add("POST", "/v2/{endpoint}/run", maxBodyBytes: 2 * Self.maxBody) { try await api.guarded($0) { try await api.run($0, sync: false) } }
        router.add("POST", "/v2/{endpoint}/runsync", maxBodyBytes: 2 * Self.maxBody) { try await api.guarded($0) { try await api.run($0, sync: true) } }
        router.add("GET", "/v2/{endpoint}/status/{id}") { try await api.guarded($0) { try await api.status($0) } }
        router.add("POST", "/v2/{endpoint}/cancel/{id}", maxBodyBytes: 64 << 10) { try await api.guarded($0) { await api.cancel($0) } }
        router.add("POST", "/v2/{endpoint}/retry/{id}", maxBodyBytes: 64 << 10) { try await api.guarded($0) { await api.retry($0) } }
        router.add("GET", "/v2/{endpoint}/health") { try await api.guarded($0) { _ in .json(200, await api.board.health()) } }
        router.add("POST", "/v2/{endpoint}/purge-queue", maxBodyBytes: 64 << 10) { try await api.guarded($0) { _ in
            .json(200, "{\"removed\":\(await api.board.purge()),\"status\":\"completed\"}")
        } }
        router.add("GET", "/_emulator/stats") { _ in .json(200, await api.board.stats()) }
        router.add("GET", "/_emulator/requests") { _ in .json(200, await api.log.json()) }
    }

    /// Authentication and injected HTTP faults, before any route.
    private func guarded(_ request: HTTPRequest, _ handler: (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse {
        let parts = request.path.split(separator: "/")
        await log.record(parts.count >= 3 ? String(parts[2]) : request.path)
        if let apiKey, request.header("authorization") != "Bearer \(apiKey)" {
            return .json(401, "{\"error\":\"Unauthorized\"}")
        }
        let draw = Double.random(in: 0..<1)
        if draw < faults.http429Rate {
            var response = HTTPResponse.json(429, "{\"error\":\"Too Many Requests\"}")
            response.headers.append(("retry-after", "1"))
            return response
        }
        if draw < faults.http429Rate + faults.http500Rate { return .json(500, "{\"error\":\"Internal Server Error\"}") }
        return try await handler(request)
    }

    private func run(_ request: HTTPRequest, sync: Bool) async throws -> HTTPResponse {
        guard request.body.count <= Self.maxBody else {
            return .json(413, "{\"error\":\"request body of \(request.body.count) bytes exceeds the 10 MB limit\"}")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(request.body)) as? [String: Any],
              let input = object["input"] as? [String: Any] else {
            return .json(400, "{\"error\":\"the body must be a JSON object with an input field\"}")
        }
        // Each medium inline (raw base64) or as a URL the worker downloads, as the InfiniteTalk workers take them.
        func medium(_ name: String) -> (bytes: Data, url: String?, identity: String)? {
            if let text = input["\(name)_base64"] as? String, let bytes = Data(base64Encoded: text) { return (bytes, nil, text) }
            if let url = input["\(name)_url"] as? String, url.hasPrefix("http://") || url.hasPrefix("https://") {
                // A presigned URL's signature changes per submission: the same object is the same input.
                return (Data(), url, String(url.prefix { $0 != "?" }))
            }
            return nil
        }
        guard let image = medium("image"), let wav = medium("wav") else {
            return .json(400, "{\"error\":\"input needs image_base64 or image_url, and wav_base64 or wav_url (raw base64, no data: prefix)\"}")
        }
        let imageText = image.identity, wavText = wav.identity
        var webhook: String?
        if let value = object["webhook"] {
            guard let url = value as? String, url.hasPrefix("http://") || url.hasPrefix("https://") else {
                return .json(400, "{\"error\":\"webhook must be an http(s) URL\"}")
            }
            webhook = url
        }
        // Numbers are range-checked before any conversion: a JSON number can be anything.
        // A present field must be an integer: 1e30 or 5.5 is refused, not replaced by the default.
        func integer(_ object: [String: Any]?, _ key: String, _ fallback: Int) -> Int? {
            guard let raw = object?[key] else { return fallback }
            return raw as? Int
        }
        guard let requestedWidth = integer(input, "width", 512), let requestedHeight = integer(input, "height", 512),
              (64...4096).contains(requestedWidth), (64...4096).contains(requestedHeight) else {
            return .json(400, "{\"error\":\"width and height must be 64–4096\"}")
        }
        let width = Int32(requestedWidth), height = Int32(requestedHeight)
        let policy = object["policy"] as? [String: Any]
        // RunPod's own floor is 5 s; the emulator takes shorter ones so tests run fast.
        guard let timeoutMs = integer(policy, "executionTimeout", 600_000), let ttlMs = integer(policy, "ttl", 86_400_000),
              (1...Self.sevenDaysMs).contains(timeoutMs), (1...Self.sevenDaysMs).contains(ttlMs) else {
            return .json(400, "{\"error\":\"policy.executionTimeout and policy.ttl must be 1 ms–7 d, in milliseconds\"}")
        }
        let timeout = Double(timeoutMs) / 1000, ttl = Double(ttlMs) / 1000
        var hasher = Hasher()
        hasher.combine(imageText)
        hasher.combine(wavText)
        hasher.combine(width)
        hasher.combine(height)
        let hash = String(UInt64(bitPattern: Int64(hasher.finalize())), radix: 16)
        let job = await board.submit(JobBoard.JobInput(image: [UInt8](image.bytes), wav: [UInt8](wav.bytes), imageURL: image.url, wavURL: wav.url,
                                                       width: width, height: height, hash: hash),
                                     executionTimeout: timeout, ttl: ttl, webhook: webhook)
        if sync {
            for _ in 0..<600 {
                if let current = await board.job(job.id), !["IN_QUEUE", "IN_PROGRESS"].contains(current.status) {
                    return .json(200, Self.describe(current))
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            if let current = await board.job(job.id) { return .json(200, Self.describe(current)) }
        }
        return .json(200, "{\"id\":\"\(job.id)\",\"status\":\"IN_QUEUE\"}")
    }

    private func status(_ request: HTTPRequest) async throws -> HTTPResponse {
        if faults.slowStatusSeconds > 0 { try await Task.sleep(for: .milliseconds(Int(faults.slowStatusSeconds * 1000))) }
        guard let job = await board.job(request.pathParameters["id"] ?? "") else {
            return .json(404, "{\"error\":\"request does not exist\"}")
        }
        return .json(200, Self.describe(job))
    }

    private func cancel(_ request: HTTPRequest) async -> HTTPResponse {
        guard let job = await board.cancel(request.pathParameters["id"] ?? "") else { return .json(404, "{\"error\":\"request does not exist\"}") }
        return .json(200, "{\"id\":\"\(job.id)\",\"status\":\"\(job.status)\"}")
    }

    private func retry(_ request: HTTPRequest) async -> HTTPResponse {
        guard let job = await board.retry(request.pathParameters["id"] ?? "") else {
            return .json(404, "{\"error\":\"request does not exist or is not FAILED/TIMED_OUT\"}")
        }
        return .json(200, "{\"id\":\"\(job.id)\",\"status\":\"IN_QUEUE\"}")
    }

    /// RunPod's status shape.
    static func describe(_ job: JobBoard.Job) -> String {
        let now = MonotonicClock.seconds()
        let delay = Int(((job.startedAt ?? now) - job.submittedAt) * 1000)
        var text = "{\"id\":\"\(job.id)\",\"status\":\"\(job.status)\",\"delayTime\":\(delay)"
        if let started = job.startedAt { text += ",\"executionTime\":\(Int(((job.finishedAt ?? now) - started) * 1000))" }
        if let worker = job.workerID { text += ",\"workerId\":\"\(worker)\"" }
        if let output = job.outputJSON { text += ",\"output\":\(output)" }
        if let error = job.errorText { text += ",\"error\":\(JSONText.quote(error))" }
        return text + "}"
    }
}

/// The simulated workers: cold start, processing time proportional to the audio, real rendering,
/// faults, executionTimeout.
struct EmulatedWorkers: Sendable {
    let board: JobBoard
    let renderer: StillVideoRenderer
    let pool: BlockingWorkPool
    let engine = CurlEngine()
    var webhookRetrySeconds = 10.0

    func start() {
        for index in 0..<board.settings.workers {
            let name = "emulated-worker-\(index)"
            Task.detached { await work(name) }
        }
    }

    private func work(_ name: String) async {
        var cold = true
        while true {
            let id = await board.next()
            guard let job = await board.start(id, worker: name) else { continue }
            await run(job, id: id, name: name, cold: &cold)
            await notify(id)
        }
    }

    /// Downloads URL inputs as a worker does when it starts; nil (the job FAILED) when one fails.
    private func fetchInputs(_ job: JobBoard.Job) async -> JobBoard.JobInput? {
        var input = job.input
        for (url, isImage) in [(input.imageURL, true), (input.wavURL, false)] {
            guard let url else { continue }
            do {
                let exchange = try await engine.perform(method: "GET", url: url, timeoutMilliseconds: 60_000, bodyLimit: 256 << 20)
                guard exchange.status == 200 else { throw ServiceError(.runpodResultMissing, "HTTP \(exchange.status)") }
                if isImage { input.image = exchange.body } else { input.wav = exchange.body }
            } catch {
                let message = "{\"error_type\": \"<class 'RuntimeError'>\", \"error_message\": \"cannot download \(url.prefix { $0 != "?" }): \(error)\"}"
                await board.finish(job.id, status: "FAILED", outputJSON: nil, error: message)
                return nil
            }
        }
        return input
    }

    /// POSTs the job's end to its webhook: RunPod's body (the status response), tried three times
    /// `webhookRetrySeconds` apart, as RunPod does.
    private func notify(_ id: String) async {
        guard let job = await board.job(id), let webhook = job.webhook,
              !["IN_QUEUE", "IN_PROGRESS"].contains(job.status) else { return }
        let body = Array(EmulatorAPI.describe(job).utf8)
        for attempt in 0..<3 {
            if attempt > 0 { try? await Task.sleep(for: .milliseconds(Int(webhookRetrySeconds * 1000))) }
            if let exchange = try? await engine.perform(method: "POST", url: webhook, headers: ["Content-Type: application/json"], body: body),
               (200...299).contains(exchange.status) {
                await board.count("webhooks_sent")
                return
            }
            await board.count("webhooks_failed")
        }
    }

    /// One job on one worker: cold start, faults, downloads, processing time, rendering.
    private func run(_ job: JobBoard.Job, id: String, name: String, cold: inout Bool) async {
        let settings = board.settings
        if cold && settings.coldStartSeconds > 0 { try? await Task.sleep(for: .milliseconds(Int(settings.coldStartSeconds * 1000))) }
        cold = false
        let fault = await board.drawFault()
        if fault == .hang {
            await board.releaseWorker()
            return  // stays IN_PROGRESS until its ttl
        }
        guard let input = await fetchInputs(job) else { return }
        let audioSeconds = Double(max(0, input.wav.count - 44)) / 32_000  // 16 kHz mono 16-bit, RunPod's usual
        let work = audioSeconds * settings.speed
        if work > job.executionTimeout {
            try? await Task.sleep(for: .milliseconds(Int(job.executionTimeout * 1000)))
            await board.finish(id, status: "TIMED_OUT", outputJSON: nil, error: "execution timeout exceeded")
            return
        }
        if work > 0 { try? await Task.sleep(for: .milliseconds(Int(work * 1000))) }
        switch fault {
        case .fail:
            let error = "{\"error_type\": \"<class 'RuntimeError'>\", \"error_message\": \"CUDA out of memory (injected)\", "
                + "\"error_traceback\": \"Traceback ...\", \"hostname\": \"\(name)\", \"worker_id\": \"\(name)\", \"runpod_version\": \"1.7.0\"}"
            await board.finish(id, status: "FAILED", outputJSON: nil, error: error)
        case .missingOutput:
            await board.finish(id, status: "COMPLETED", outputJSON: nil, error: nil)
        default:
            do {
                let renderer = self.renderer
                let video = try await pool.run { flag in
                    try renderer.render(image: input.image, wav: input.wav, width: input.width, height: input.height, flag: flag)
                }
                await board.finish(id, status: "COMPLETED", outputJSON: "{\"video\":\"\(Data(video).base64EncodedString())\"}", error: nil)
            } catch {
                await board.finish(id, status: "COMPLETED", outputJSON: "{\"error\":\(JSONText.quote(String(describing: error)))}", error: nil)
            }
        }
    }
}
