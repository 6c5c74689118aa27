import Foundation
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// The APIs of the tools TalkMesh replaces, on the same keys, limits and jobs as `/v1`, so their
/// clients switch by changing the base URL and adding a key:
/// - the Infinitetalk API: `POST /jobs`, `GET /jobs/{id}`, `GET /health`; its errors are
///   `{"error": "message", "code": "CODE"}`;
/// - avatar-api: `POST /generate`, `GET /status/{job_id}`, `GET /result/{job_id}`; answers in a
///   `{"data": …}` envelope.
extension Gateway {
    /// avatar-api sends no size: its videos are 384×576 (portrait), as the Infinitetalk API's example.
    static let seedDefaultSize = (width: 384, height: 576)

    /// Routes whose errors take the Infinitetalk API's flat shape.
    static let infinitetalkRoutes: Set<String> = ["/jobs", "/jobs/{id}"]

    func installSeedRoutes(into router: inout HTTPRouter) {
        router.add("GET", "/health") { _ in JobJSON.response(200, ["status": "ok"]) }

        router.addStreaming("POST", "/jobs", maxBodyBytes: configuration.uploads.requestBytes) { [self] request in
            let job = try await createJob(request)
            return JobJSON.response(202, ["id": job.id, "status": Self.infinitetalkStatus(job.status)],
                                    headers: [("location", "/jobs/\(job.id)")])
        }
        router.add("GET", "/jobs/{id}") { [self] request in
            let job = try await ownJob(request.pathParameters["id"] ?? "")
            var object: [String: Any] = ["id": job.id, "status": Self.infinitetalkStatus(job.status),
                                         "progress": Self.percent(job)]
            if let error = job.error, !error.code.isEmpty { object["error"] = "\(error.code): \(error.message)" }
            if job.status == .completed {
                if job.options?.pushToS3 == true {
                    try Self.requireVideo(job)
                    object["video_url"] = videoURL(job)?.url ?? Self.absoluteURL(request, "/v1/jobs/\(job.id)/video")
                } else {
                    object["video_base64"] = try await inlineVideo(job)
                }
            }
            return JobJSON.response(200, object)
        }

        router.addStreaming("POST", "/generate", maxBodyBytes: configuration.uploads.requestBytes) { [self] request in
            let job = try await createJob(request, defaultSize: Self.seedDefaultSize)
            return JobJSON.response(200, ["data": ["job_id": job.id, "status": Self.avatarStatus(job.status)]])
        }
        router.add("GET", "/status/{job_id}") { [self] request in
            let job = try await ownJob(request.pathParameters["job_id"] ?? "")
            var data: [String: Any] = ["job_id": job.id, "status": Self.avatarStatus(job.status),
                                       "progress": Self.percent(job),
                                       "eta_seconds": Int(JobJSON.etaSeconds(job))]
            if let error = job.error, !error.code.isEmpty { data["error"] = ["code": error.code, "message": error.message] }
            return JobJSON.response(200, ["data": data])
        }
        router.add("GET", "/result/{job_id}") { [self] request in
            let job = try await ownJob(request.pathParameters["job_id"] ?? "")
            guard job.status == .completed else {
                throw ServiceError(.jobNotCompleted, "job \(job.id) is \(JobJSON.status(job.status)); its video is not ready")
            }
            try Self.requireVideo(job)
            return JobJSON.response(200, ["data": ["job_id": job.id, "url": videoURL(job)?.url ?? Self.absoluteURL(request, "/v1/jobs/\(job.id)/video"),
                                                   "duration_sec": job.durationSec]])
        }
    }

    /// The Infinitetalk API's error shape on its routes: `{"error": "message", "code": "CODE"}`.
    func seedErrors(_ request: HTTPRequest, _ route: String,
                    _ next: @Sendable (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse {
        guard Self.infinitetalkRoutes.contains(route) else { return try await next(request) }
        var response: HTTPResponse
        do { response = try await next(request) } catch { response = routerResponse(error) }
        guard response.status >= 400, response.streamBody == nil,
              let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
              let error = object["error"] as? [String: Any], let code = error["code"] as? String else { return response }
        response.body = JobJSON.data(["error": error["message"] as? String ?? code, "code": code])
        return response
    }

    /// Progress as the seeds report it: a whole percentage, 100 only when done.
    static func percent(_ job: Job) -> Int {
        Int((job.progress * 100).rounded(.down))
    }

    /// IN_QUEUE, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT.
    static func infinitetalkStatus(_ status: JobStatus) -> String {
        JobJSON.status(status).uppercased()
    }

    /// pending, processing, completed, failed (a cancelled or timed-out job has failed).
    static func avatarStatus(_ status: JobStatus) -> String {
        switch status {
        case .inQueue: return "pending"
        case .running: return "processing"
        case .completed: return "completed"
        default: return "failed"
        }
    }

    /// `path` on the host the client called (`X-Forwarded-Proto`/`-Host` from a proxy win).
    static func absoluteURL(_ request: HTTPRequest, _ path: String) -> String {
        let scheme = request.header("x-forwarded-proto") ?? (request.isSecure ? "https" : "http")
        let host = request.header("x-forwarded-host") ?? request.header("host") ?? request.header(":authority") ?? "localhost"
        return "\(scheme)://\(host)\(path)"
    }
}
