import Glibc

/// The REST shapes of jobs and errors.
public enum JobJSON {
    /// `in_queue`, `running`, `completed`, `failed`, `cancelled`, `timed_out`.
    public static func status(_ status: JobStatus) -> String {
        switch status {
        case .inQueue: return "in_queue"
        case .running: return "running"
        case .completed: return "completed"
        case .failed: return "failed"
        case .cancelled: return "cancelled"
        case .timedOut: return "timed_out"
        default: return "unknown"
        }
    }

    /// The `status` query filter's value, or nil when it names none.
    public static func status(named name: String) -> JobStatus? {
        [JobStatus.inQueue, .running, .completed, .failed, .cancelled, .timedOut].first { status($0) == name }
    }

    public static func isTerminal(_ status: JobStatus) -> Bool {
        [.completed, .failed, .cancelled, .timedOut].contains(status)
    }


    /// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T13:57:14.123Z` (ISO8601DateFormatter
    /// builds an ICU formatter per call).
    public static func time(_ unixMs: Int64) -> String {
        var seconds = time_t(unixMs / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let digits = String(value)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(unixMs % 1000), 3))Z"
    }

    /// Seconds until the job should be done: 0 once terminal, never negative.
    public static func etaSeconds(_ job: Job) -> Double {
        isTerminal(job.status) ? 0 : max(0, job.etaSeconds.rounded())
    }

    public static func links(_ id: String) -> [String: Any] {
        ["self": "/v1/jobs/\(id)", "video": "/v1/jobs/\(id)/video", "events": "/v1/jobs/\(id)/events"]
    }

    /// A presigned video URL and when it expires (S3 stores).
    public typealias VideoURL = @Sendable (Job) -> (url: String, expiresUnixMs: Int64)?

    /// The `VideoURL` of a store that presigns (`presign(key, seconds)`, nil when it cannot): the
    /// job's video while retention has not deleted it, valid for `seconds`.
    public static func presignedVideoURL(seconds: Int, _ presign: @escaping @Sendable (String, Int) -> String?) -> VideoURL {
        { job in
            guard job.blobsDeletedAtUnixMs == 0, !job.videoKey.isEmpty, let url = presign(job.videoKey, seconds) else { return nil }
            return (url, (Int64(Glibc.time(nil)) + Int64(seconds)) * 1000)
        }
    }

    /// `GET /v1/jobs/{id}`'s body (and each item of the list, and each SSE event).
    public static func object(_ job: Job, videoURL: VideoURL? = nil) -> [String: Any] {
        var chunks = ["total": job.chunks.count, "completed": 0, "running": 0, "failed": 0]
        for chunk in job.chunks {
            switch chunk.status {
            case .chunkCompleted: chunks["completed"]! += 1
            case .chunkSubmitting, .chunkSubmitted, .chunkRunning: chunks["running"]! += 1
            case .chunkFailed: chunks["failed"]! += 1
            default: break
            }
        }
        var object: [String: Any] = [
            "id": job.id, "status": status(job.status), "progress": (job.progress * 1000).rounded() / 10,
            "eta_seconds": etaSeconds(job), "chunks": chunks,
            "created_at": time(job.createdAtUnixMs), "updated_at": time(job.updatedAtUnixMs),
            "width": Int(job.width), "height": Int(job.height), "links": links(job.id),
        ]
        if let error = job.error, !error.code.isEmpty { object["error"] = ["code": error.code, "message": error.message] }
        if job.completedAtUnixMs > 0 { object["completed_at"] = time(job.completedAtUnixMs) }
        if job.blobsDeletedAtUnixMs > 0 { object["video_expired_at"] = time(job.blobsDeletedAtUnixMs) }
        if job.status == .completed && !job.videoKey.isEmpty && job.blobsDeletedAtUnixMs == 0 {
            var video: [String: Any] = ["url": "/v1/jobs/\(job.id)/video", "duration_sec": job.durationSec,
                                        "width": Int(job.width), "height": Int(job.height)]
            if let presigned = videoURL?(job) {
                video["url"] = presigned.url
                video["url_expires_at"] = time(presigned.expiresUnixMs)
            }
            object["video"] = video
        }
        if let webhook = job.webhook, !webhook.url.isEmpty { object["webhook"] = Self.webhook(webhook) }
        return object
    }

    /// A job's webhook as the API shows it: where it goes, what waits, and every attempt (never its key).
    public static func webhook(_ webhook: JobWebhook) -> [String: Any] {
        var object: [String: Any] = ["url": webhook.url, "progress": webhook.progress]
        if !webhook.pendingEvent.isEmpty {
            object["pending"] = ["event": webhook.pendingEvent, "next_attempt_at": time(webhook.dueUnixMs),
                                 "attempts": Int(webhook.pendingAttempts)]
        }
        object["deliveries"] = webhook.deliveries.map { delivery -> [String: Any] in
            var item: [String: Any] = ["event": delivery.event, "attempt": Int(delivery.attempt), "at": time(delivery.atUnixMs),
                                       "delivered": delivery.delivered, "duration_ms": Int(delivery.durationMs)]
            if delivery.httpStatus > 0 { item["http_status"] = Int(delivery.httpStatus) }
            if !delivery.error.isEmpty { item["error"] = delivery.error }
            if delivery.abandoned { item["abandoned"] = true }
            return item
        }
        return object
    }

    /// `?include=chunks`: where each chunk sits in the audio and how its RunPod job went — the
    /// seams of the stitched video and the job's timings.
    public static func chunkList(_ job: Job) -> [[String: Any]] {
        job.chunks.map { chunk in
            var item: [String: Any] = ["index": Int(chunk.index), "start_sec": chunk.startSec, "duration_sec": chunk.durationSec,
                                       "status": chunkStatus(chunk.status), "attempts": Int(chunk.attempts),
                                       "queue_delay_ms": Int(chunk.queueDelayMs), "execution_ms": Int(chunk.executionMs)]
            if chunk.submittedAtUnixMs > 0 { item["submitted_at"] = time(chunk.submittedAtUnixMs) }
            if chunk.finishedAtUnixMs > 0 { item["finished_at"] = time(chunk.finishedAtUnixMs) }
            if let error = chunk.error, !error.code.isEmpty { item["error"] = ["code": error.code, "message": error.message] }
            return item
        }
    }

    /// `GET /v1/jobs/{id}/timeline`: every state change of the job and its chunks, with times, and
    /// each chunk's place in the audio and its RunPod timings — what `talkmesh timeline` draws.
    public static func timeline(_ job: Job) -> [String: Any] {
        var object: [String: Any] = ["id": job.id, "status": status(job.status), "created_at": time(job.createdAtUnixMs),
                                     "chunks": chunkList(job)]
        if job.completedAtUnixMs > 0 { object["completed_at"] = time(job.completedAtUnixMs) }
        object["events"] = job.timeline.map { event -> [String: Any] in
            var item: [String: Any] = ["at": time(event.atUnixMs), "from": event.from, "to": event.to]
            if event.chunk >= 0 {
                item["chunk"] = Int(event.chunk)
                item["attempt"] = Int(event.attempt)
                if !event.runpodJobId.isEmpty { item["runpod_job_id"] = event.runpodJobId }
            }
            if !event.errorCode.isEmpty { item["error_code"] = event.errorCode }
            return item
        }
        return object
    }

    /// `pending`, `submitted` (also while submitting), `running`, `completed`, `failed`, `cancelled`.
    public static func chunkStatus(_ status: ChunkStatus) -> String {
        switch status {
        case .chunkSubmitting, .chunkSubmitted: return "submitted"
        case .chunkRunning: return "running"
        case .chunkCompleted: return "completed"
        case .chunkFailed: return "failed"
        case .chunkCancelled: return "cancelled"
        default: return "pending"
        }
    }
}
