import Foundation
import TalkMeshBase
import TalkMeshCore

/// RunPod's job statuses, one Swift enum.
public enum RunPodStatus: String, Sendable, Hashable {
    case inQueue = "IN_QUEUE", inProgress = "IN_PROGRESS", running = "RUNNING", completed = "COMPLETED"
    case failed = "FAILED", cancelled = "CANCELLED", timedOut = "TIMED_OUT"

    public var isTerminal: Bool { [.completed, .failed, .cancelled, .timedOut].contains(self) }
}

/// What InfiniteTalk workers take (wlsdml1114/Infinitetalk_Runpod_hub's handler and its forks).
public struct InfiniteTalkInput: Sendable {
    public var prompt: String
    public var imageBase64: String?
    public var wavBase64: String?
    public var imageURL: String?
    public var wavURL: String?
    public var width: Int
    public var height: Int
    public var forceOffload = true

    public init(prompt: String, image: [UInt8], wav: [UInt8], width: Int, height: Int) {
        self.init(prompt: prompt, imageBase64: Data(image).base64EncodedString(), wav: wav, width: width, height: height)
    }

    /// With an image already in base64 (one job's chunks all send the same image).
    public init(prompt: String, imageBase64: String, wav: [UInt8], width: Int, height: Int) {
        self.prompt = prompt
        self.imageBase64 = imageBase64
        wavBase64 = Data(wav).base64EncodedString()
        self.width = width
        self.height = height
    }

    public init(prompt: String, imageURL: String, wavURL: String, width: Int, height: Int) {
        self.prompt = prompt
        self.imageURL = imageURL
        self.wavURL = wavURL
        self.width = width
        self.height = height
    }

    /// The `/run` body: raw base64 (no `data:` prefix), policy, optional webhook. Written by hand:
    /// base64 needs no JSON escaping, and JSONSerialization spent most of the Dispatcher's CPU
    /// escaping megabytes of it character by character (bench/dispatcher).
    public func runBody(executionTimeoutMs: Int, ttlMs: Int, webhook: String?) throws -> [UInt8] {
        var body: [UInt8] = []
        body.reserveCapacity((imageBase64?.utf8.count ?? 0) + (wavBase64?.utf8.count ?? 0) + prompt.utf8.count + 512)
        func append(_ text: String) { body.append(contentsOf: text.utf8) }
        append("{\"input\":{\"input_type\":\"image\",\"person_count\":\"single\",\"prompt\":")
        JSONText.appendQuoted(prompt, to: &body)
        append(",\"width\":\(width),\"height\":\(height),\"network_volume\":false,\"force_offload\":\(forceOffload)")
        for (name, base64, url) in [("image", imageBase64, imageURL), ("wav", wavBase64, wavURL)] {
            if let base64 {
                append(",\"\(name)_base64\":\"")
                append(base64)  // A–Z a–z 0–9 + / = only: nothing to escape.
                append("\"")
            } else if let url {
                append(",\"\(name)_url\":")
                JSONText.appendQuoted(url, to: &body)
            }
        }
        append("},\"policy\":{\"executionTimeout\":\(executionTimeoutMs),\"ttl\":\(ttlMs)}")
        if let webhook {
            append(",\"webhook\":")
            JSONText.appendQuoted(webhook, to: &body)
        }
        append("}")
        return body
    }
}

/// A job as `/run` and `/status` describe it.
public struct RunPodJob: Sendable {
    public var id: String
    public var status: RunPodStatus
    public var delayTimeMs: Int?
    public var executionTimeMs: Int?
    public var workerID: String?
    /// Where the result video is, once COMPLETED.
    public var video: VideoResult?
    /// Why it failed (FAILED, or COMPLETED with an error in its output).
    public var failure: ServiceError?

    public enum VideoResult: Sendable, Equatable {
        /// Base64 text (raw or from a `data:` URI), not yet decoded.
        case base64(Substring)
        case url(String)
        case volumePath(String)
    }

    /// Parses a status response. A COMPLETED job without a usable video is RUNPOD_RESULT_MISSING;
    /// an error in the output, or FAILED (the SDK's JSON-string `error`), is RUNPOD_JOB_FAILED.
    public static func parse(_ body: [UInt8]) throws(ServiceError) -> RunPodJob {
        guard let object = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any],
              let id = object["id"] as? String, let statusText = object["status"] as? String else {
            throw ServiceError(.runpodBadResponse, "not a RunPod job", cause: String(decoding: body.prefix(200), as: UTF8.self))
        }
        guard let status = RunPodStatus(rawValue: statusText) else {
            throw ServiceError(.runpodBadResponse, "unknown RunPod status \(statusText)")
        }
        var job = RunPodJob(id: id, status: status, delayTimeMs: object["delayTime"] as? Int, executionTimeMs: object["executionTime"] as? Int,
                            workerID: object["workerId"] as? String)
        switch status {
        case .failed:
            job.failure = ServiceError(.runpodJobFailed, failureMessage(object["error"]))
        case .completed:
            guard let output = object["output"], !(output is NSNull) else {
                job.failure = ServiceError(.runpodResultMissing, "the job completed without output")
                return job
            }
            guard let map = output as? [String: Any] else {
                job.failure = ServiceError(.runpodResultMissing, "the job's output holds no video")
                return job
            }
            if (map["status"] as? String)?.lowercased() == "error" || map["error"] != nil {
                job.failure = ServiceError(.runpodJobFailed, failureMessage(map["error"] ?? map["message"] ?? "the worker reported an error"))
            } else if let video = map["video"] as? String, !video.isEmpty {
                job.video = .base64(stripDataPrefix(video))
            } else if let video = map["video"] as? [String: Any], let url = video["url"] as? String {
                job.video = .url(url)
            } else if let url = map["video_url"] as? String {
                job.video = .url(url)
            } else if let path = map["video_path"] as? String {
                job.video = .volumePath(path)
            } else {
                job.failure = ServiceError(.runpodResultMissing, "the job's output holds no video")
            }
        default:
            break
        }
        return job
    }

    static func stripDataPrefix(_ text: String) -> Substring {
        if text.hasPrefix("data:"), let comma = text.firstIndex(of: ",") { return text[text.index(after: comma)...] }
        return text[...]
    }

    /// The SDK sends handler exceptions as a JSON *string* with `error_message`.
    static func failureMessage(_ value: Any?) -> String {
        if let text = value as? String {
            if let data = text.data(using: .utf8), let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
               let message = object["error_message"] as? String {
                return message
            }
            return text
        }
        if let object = value as? [String: Any], let message = (object["error_message"] ?? object["message"]) as? String { return message }
        return value.map { String(describing: $0) } ?? "the job failed without a message"
    }
}

/// RunPod's `Retry-After` header (delta-seconds; an HTTP-date is not used by RunPod and falls
/// back to backoff). The value comes from the peer: it is checked and clamped before any use.
public enum RetryAfter {
    /// The longest wait a peer can ask for: past it, the request budget's own backoff takes over.
    public static let longestSeconds: Double = 120

    /// Seconds to wait, within 0…`longestSeconds`; nil when absent or not a finite non-negative number.
    public static func seconds(_ header: String?) -> Double? {
        guard let header, let value = Double(header.trimmingCharacters(in: .whitespaces)), value.isFinite, value >= 0 else { return nil }
        return min(value, longestSeconds)
    }
}
