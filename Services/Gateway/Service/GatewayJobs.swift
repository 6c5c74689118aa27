import Foundation
import TalkMeshAudioService
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

extension Gateway {
    func installJobRoutes(into router: inout HTTPRouter) {
        router.addStreaming("POST", "/v1/jobs", maxBodyBytes: configuration.uploads.requestBytes) { [self] request in
            let job = try await createJob(request)
            jobCache.store(job)
            return JobJSON.response(202, ["id": job.id, "status": JobJSON.status(job.status), "links": JobJSON.links(job.id)],
                                    headers: [("location", "/v1/jobs/\(job.id)")])
        }
        router.add("GET", "/v1/jobs/{id}") { [self] request in
            let include = request.query.isEmpty ? [] : Self.query(request.query)["include"]?.split(separator: ",") ?? []
            if include.isEmpty {  // what a poll asks: the answer kept for JOB_CACHE_TTL
                let answer = try await ownJobAnswer(request.pathParameters["id"] ?? "")
                return HTTPResponse(status: 200, headers: [("content-type", "application/json")], body: answer.body)
            }
            let job = try await ownJob(request.pathParameters["id"] ?? "")
            var object = JobJSON.object(job, videoURL: videoURL)
            if include.contains("chunks") { object["chunk_list"] = JobJSON.chunkList(job) }
            if include.contains("video_base64"), job.status == .completed {
                object["video_base64"] = try await inlineVideo(job)
            }
            return JobJSON.response(200, object)
        }
        // RunPod's completion webhook for one chunk. Its body (the job's status, possibly the whole
        // video in base64) is read and dropped without being held: the Dispatcher asks RunPod for
        // the status itself, so nothing in the body is trusted.
        router.addStreaming("POST", "/v1/runpod-webhook/{job}/{chunk}/{secret}", maxBodyBytes: 256 << 20) { [self] request in
            while try await request.bodyStream?.next() != nil {}
            var forward = RunPodWebhookRequest()
            forward.jobId = request.pathParameters["job"] ?? ""
            forward.secret = request.pathParameters["secret"] ?? ""
            guard let chunk = Int32(request.pathParameters["chunk"] ?? ""), chunk >= 0 else {
                throw ServiceError(.jobNotFound, "no such job or webhook")
            }
            forward.chunk = chunk
            let answer = try await dispatcher.unary(DispatcherService.runPodWebhook, forward, options: CallOptions(timeoutNanoseconds: 10_000_000_000))
            return JobJSON.response(200, ["accepted": answer.accepted])
        }
        router.add("GET", "/v1/jobs/{id}/timeline") { [self] request in
            JobJSON.response(200, JobJSON.timeline(try await ownJob(request.pathParameters["id"] ?? "", includingTimeline: true)))
        }
        router.add("GET", "/v1/jobs") { [self] request in
            try await listJobs(request)
        }
        router.add("DELETE", "/v1/jobs/{id}") { [self] request in
            let job = try await ownJob(request.pathParameters["id"] ?? "")
            guard !JobJSON.isTerminal(job.status) else {
                throw ServiceError(.jobTerminal, "job \(job.id) is already \(JobJSON.status(job.status))")
            }
            let cancelled = try await dispatcher.unary(DispatcherService.cancelJob, CancelJobRequest.with(id: job.id), options: CallOptions(timeoutNanoseconds: 10_000_000_000))
            return HTTPResponse(status: 202, headers: [("content-type", "application/json")], body: jobCache.store(cancelled).body)
        }
    }

    /// Parses `a=1&b=2` (percent-decoded, `+` as space).
    static func query(_ query: String) -> [String: String] {
        var values: [String: String] = [:]
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map {
                String($0).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String($0)
            }
            if let name = parts.first { values[name] = parts.count > 1 ? parts[1] : "" }
        }
        return values
    }

    // MARK: Create

    /// Checks the caller's job budget, streams the uploads into the BlobStore, validates, and
    /// calls `CreateJob`. Whatever was uploaded is removed when anything fails.
    func createJob(_ request: HTTPRequest, defaultSize: (width: Int, height: Int)? = nil) async throws -> Job {
        let key = try Self.caller()
        try await checkJobBudget(key)
        let form = UploadForm(store: blobs, limits: configuration.uploads)
        do {
            try await read(request, into: form)
            let create = try validated(form, request: request, key: key, defaultSize: defaultSize)
            try await storeUploads(form, image: try BlobKey(create.imageKey), audio: try BlobKey(create.audioKey))
            let deleteUploads = { [blobIO, blobs] in
                _ = try? await blobIO.run { _ in
                    try blobs.delete(try BlobKey(create.imageKey))
                    try blobs.delete(try BlobKey(create.audioKey))
                }
            }
            var response: CreateJobResponse
            do {
                response = try await dispatcher.unary(DispatcherService.createJob, create, options: CallOptions(timeoutNanoseconds: 30_000_000_000))
            } catch {
                await deleteUploads()  // refused (an invalid webhook_url) or the Dispatcher unreachable
                throw error
            }
            guard let job = response.job.take() else { throw ServiceError(.internalError, "CreateJob answered without a job") }
            if job.imageKey != create.imageKey {
                await deleteUploads()  // the idempotency key named an existing job: it keeps its own inputs
            }
            return job
        } catch {
            form.discard()
            throw error
        }
    }

    /// The key that signs a job's webhooks: HMAC-SHA256(API key, "talkmesh-webhook-v1") in hex — one
    /// per API key, which its holder derives alike, and which the key file's hashes cannot give.
    static func webhookSecret(authorization: String?, apiKey: String?) -> String {
        let secret = Self.secret(authorization: authorization, apiKey: apiKey) ?? ""
        return Hex.encode(Digest.hmacSHA256(key: Array(secret.utf8), Array("talkmesh-webhook-v1".utf8)))
    }

    static func webhookSecret(_ request: HTTPRequest) -> String {
        webhookSecret(authorization: request.header("authorization"), apiKey: request.header("x-api-key"))
    }

    /// The key's job-creation rate and its cap on unfinished jobs.
    func checkJobBudget(_ key: APIKey) async throws {
        let decision = await limiter.take("job:" + key.id, rate: key.jobRate, burst: key.jobBurst)
        guard decision.allowed else {
            metrics.rateLimited.increment([key.id, "jobs"])
            throw RateLimitRefusal(decision: decision, message: "job creation rate limit exceeded; retry after \(decision.retryAfterSeconds) s")
        }
        let active = try await activeJobs(of: key.id, atMost: key.maxActiveJobs)
        guard active < key.maxActiveJobs else {
            metrics.rateLimited.increment([key.id, "active_jobs"])
            throw ServiceError(.tooManyActiveJobs, "\(active) jobs are unfinished; this key may have \(key.maxActiveJobs) at once")
        }
    }

    /// Where a key's uploads go: `uploads/<key id>/`, so a job created over gRPC can name only
    /// its own key's files (ids that are not plain become a hash).
    static func uploadFolder(of key: APIKey) -> String {
        let plain = !key.id.isEmpty && key.id.utf8.count <= 64 && key.id.utf8.allSatisfy {
            ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x5F || $0 == 0x2D
        }
        return "uploads/" + (plain ? key.id : String(Digest.sha256Hex(key.id).prefix(32))) + "/"
    }

    /// Unfinished jobs of `owner`, counted up to `limit`.
    private func activeJobs(of owner: String, atMost limit: Int) async throws -> Int {
        var count = 0
        for status in [JobStatus.inQueue, .running] {
            var list = ListJobsRequest()
            list.owner = owner
            list.status = status
            list.pageSize = Int32(min(max(limit, 1), 100))
            count += try await dispatcher.unary(DispatcherService.listJobs, list, options: CallOptions(timeoutNanoseconds: 10_000_000_000)).jobs.count
        }
        return count
    }

    private func read(_ request: HTTPRequest, into form: UploadForm) async throws {
        guard let body = request.bodyStream else { throw ServiceError(.invalidRequest, "no request body") }
        let contentType = request.header("content-type")?.lowercased() ?? ""
        if contentType.hasPrefix("application/json") {
            var reader = JSONUploadReader(form: form)
            while let piece = try await body.next() { try reader.feed(piece) }
            try reader.finish()
        } else if contentType.hasPrefix("multipart/form-data") {
            guard let boundary = MultipartReader.boundary(in: request.header("content-type") ?? "") else {
                throw ServiceError(.invalidRequest, "multipart/form-data needs a boundary parameter")
            }
            var reader = MultipartReader(boundary: boundary, form: form)
            while let piece = try await body.next() { try reader.feed(piece) }
            try reader.finish()
        } else {
            throw ServiceError(.unsupportedMediaType, "send application/json or multipart/form-data")
        }
    }

    /// Moves both uploads into the BlobStore (on the blob threads); if the audio fails, the image
    /// goes too, and no scratch file outlives the call.
    private func storeUploads(_ form: UploadForm, image imageKey: BlobKey, audio audioKey: BlobKey) async throws {
        guard let imagePath = form.image?.handOver(), let audioPath = form.audio?.handOver() else {
            throw ServiceError(.internalError, "the uploads were handed over twice")
        }
        try await blobIO.run { [blobs] _ in
            defer { unlink(imagePath); unlink(audioPath) }  // already gone once stored
            try blobs.store(imageKey, fromFile: imagePath)
            do { try blobs.store(audioKey, fromFile: audioPath) } catch {
                try? blobs.delete(imageKey)
                throw error
            }
        }
    }

    /// The CreateJob request from a complete form (the files are moved into the BlobStore after).
    private func validated(_ form: UploadForm, request: HTTPRequest, key: APIKey, defaultSize: (width: Int, height: Int)?) throws -> CreateJobRequest {
        let fields = FormFields(form.fields)
        var create = CreateJobRequest()
        create.width = Int32(try fields.integer("width", required: defaultSize == nil, in: 64...4096) ?? defaultSize!.width)
        create.height = Int32(try fields.integer("height", required: defaultSize == nil, in: 64...4096) ?? defaultSize!.height)
        create.prompt = try fields.string("prompt", maxBytes: 4000) ?? ""
        var options = JobOptions()
        options.forceOffload = try fields.bool("force_offload") ?? false
        options.dryRun = try fields.bool("dry_run") ?? false
        options.pushToS3 = try fields.bool("push_to_s3") ?? false
        if let target = try fields.number("chunk_target_sec") {
            guard target == 0 || (5...60).contains(target) else { throw ServiceError(.invalidRequest, "chunk_target_sec must be 5–60") }
            options.chunkTargetSec = target
        }
        if let url = try fields.string("webhook_url", maxBytes: 2048), !url.isEmpty {
            options.webhookUrl = url
            options.webhookProgress = try fields.bool("webhook_progress") ?? false
            create.webhookSecret = Self.webhookSecret(request)
        }
        create.options = options
        guard let image = form.image else { throw ServiceError(.invalidRequest, "image is required (image_base64 in JSON, image in multipart)") }
        guard let audio = form.audio else { throw ServiceError(.invalidRequest, "audio is required (audio_base64 in JSON, audio in multipart)") }
        _ = try image.finish()
        let audioPath = try audio.finish()
        let probe: AudioProbe
        do {
            probe = try AudioDecoding.probe(path: audioPath, flag: CancellationFlag())
        } catch {
            throw ServiceError(.invalidAudio, "\(audio.field) cannot be decoded as audio")
        }
        guard probe.durationSec <= configuration.maxAudioSeconds else {
            throw ServiceError(.audioTooLong, "the audio is \(Int(probe.durationSec)) s; at most \(Int(configuration.maxAudioSeconds)) s is accepted")
        }
        let idempotency = request.header("idempotency-key") ?? ""
        guard idempotency.utf8.count <= 200 else { throw ServiceError(.invalidRequest, "Idempotency-Key must be at most 200 bytes") }
        create.idempotencyKey = idempotency
        create.owner = key.id
        let folder = Self.uploadFolder(of: key) + Self.newRequestID()
        let imageKey = try BlobKey("\(folder)/image.\(image.format ?? "bin")")
        let audioKey = try BlobKey("\(folder)/audio.\(audio.format ?? "bin")")
        create.imageKey = imageKey.rawValue
        create.audioKey = audioKey.rawValue
        return create
    }

    // MARK: Read

    private func listJobs(_ request: HTTPRequest) async throws -> HTTPResponse {
        let key = try Self.caller()
        let query = Self.query(request.query)
        var list = ListJobsRequest()
        list.owner = key.id
        if let size = query["page_size"] {
            guard let value = Int32(size), (1...100).contains(value) else { throw ServiceError(.invalidRequest, "page_size must be 1–100") }
            list.pageSize = value
        } else {
            list.pageSize = 20
        }
        list.pageToken = query["page_token"] ?? ""
        if let name = query["status"], !name.isEmpty {
            guard let status = JobJSON.status(named: name) else {
                throw ServiceError(.invalidRequest, "status must be one of in_queue, running, completed, failed, cancelled, timed_out")
            }
            list.status = status
        }
        let page = try await dispatcher.unary(DispatcherService.listJobs, list, options: CallOptions(timeoutNanoseconds: 10_000_000_000))
        var body: [String: Any] = ["jobs": page.jobs.map { JobJSON.object($0, videoURL: videoURL) }]
        body["next_page_token"] = page.nextPageToken.isEmpty ? NSNull() : page.nextPageToken
        return JobJSON.response(200, body)
    }

    func inlineVideo(_ job: Job) async throws -> String {
        try Self.requireVideo(job)
        let key = try BlobKey(job.videoKey)
        let limit = configuration.maxInlineVideoBytes
        return try await blobIO.run { [blobs] _ in
            guard let info = try blobs.info(key) else { throw ServiceError(.notFound, "the video of job \(job.id) is gone") }
            guard info.size <= limit else {
                throw ServiceError(.payloadTooLarge, "the video is too large to inline; download it from /v1/jobs/\(job.id)/video")
            }
            return Data(try blobs.get(key)).base64EncodedString()
        }
    }
}

/// A 429 from the job-creation budget, with its headers.
struct RateLimitRefusal: Error {
    let decision: RateDecision
    let message: String
}

/// Typed reads of a form's small fields: JSON values, or multipart text.
struct FormFields {
    let values: [String: FieldValue]
    init(_ values: [String: FieldValue]) { self.values = values }

    private func wrong(_ name: String, _ expected: String) -> ServiceError {
        ServiceError(.invalidRequest, "\(name) must be \(expected)")
    }

    func number(_ name: String) throws -> Double? {
        switch values[name] {
        case nil, .null: return nil
        case .text(let text):
            guard let value = Double(text.trimmingCharacters(in: .whitespaces)), value.isFinite else { throw wrong(name, "a number") }
            return value
        case .number(let value) where value.isFinite: return value
        default: throw wrong(name, "a number")
        }
    }

    func integer(_ name: String, required: Bool, in range: ClosedRange<Int>) throws -> Int? {
        guard let value = try number(name) else {
            if required { throw ServiceError(.invalidRequest, "\(name) is required") }
            return nil
        }
        guard value == value.rounded(), value >= Double(range.lowerBound), value <= Double(range.upperBound) else {
            throw wrong(name, "a whole number in \(range.lowerBound)–\(range.upperBound)")
        }
        return Int(value)
    }

    func string(_ name: String, maxBytes: Int) throws -> String? {
        switch values[name] {
        case nil, .null: return nil
        case .text(let text):
            guard text.utf8.count <= maxBytes else { throw wrong(name, "at most \(maxBytes) bytes") }
            return text
        default: throw wrong(name, "a string")
        }
    }

    func bool(_ name: String) throws -> Bool? {
        switch values[name] {
        case nil, .null: return nil
        case .text(let text):
            switch text.trimmingCharacters(in: .whitespaces).lowercased() {
            case "true", "1", "on", "yes": return true
            case "false", "0", "off", "no", "": return false
            default: throw wrong(name, "true or false")
            }
        case .bool(let value): return value
        default: throw wrong(name, "true or false")
        }
    }
}
