import Foundation
import TalkMeshBase
import TalkMeshCore

/// RunPod's job statuses, one Swift enum.
public enum RunPodStatus: String, Sendable, Hashable {
    case inQueue = "IN_QUEUE", inProgress = "IN_PROGRESS", running = "RUNNING", completed = "COMPLETED"
    case failed = "FAILED", cancelled = "CANCELLED", timedOut = "TIMED_OUT"

    public var isTerminal: Bool { [.completed, .failed, .cancelled, .timedOut].contains(self) }

    /// The Dispatcher's event for a poll that found this status: how many polls it takes to
    /// find chunks done (`talkmesh_dispatcher_events_total{event="runpod_polls_in_progress"}`, …).
    var pollEvent: String {
        switch self {
        case .inQueue: "runpod_polls_in_queue"
        case .inProgress: "runpod_polls_in_progress"
        case .running: "runpod_polls_running"
        case .completed: "runpod_polls_completed"
        case .failed: "runpod_polls_failed"
        case .cancelled: "runpod_polls_cancelled"
        case .timedOut: "runpod_polls_timed_out"
        }
    }
}

/// What InfiniteTalk workers take (wlsdml1114/Infinitetalk_Runpod_hub's handler and its forks).
public struct InfiniteTalkInput: Sendable {
    public var prompt: String
    public var imageBase64: String?
    /// The chunk's audio, base64-encoded straight into the `/run` body.
    public var wav: [UInt8]?
    public var imageURL: String?
    public var wavURL: String?
    public var width: Int
    public var height: Int
    public var forceOffload = true

    public init(prompt: String, image: [UInt8], wav: [UInt8], width: Int, height: Int) {
        self.init(prompt: prompt, imageBase64: Base64.encode(image), wav: wav, width: width, height: height)
    }

    /// With an image already in base64 (one job's chunks all send the same image).
    public init(prompt: String, imageBase64: String, wav: [UInt8], width: Int, height: Int) {
        self.prompt = prompt
        self.imageBase64 = imageBase64
        self.wav = wav
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
    public func runBody(executionTimeoutMs: Int, ttlMs: Int, webhook: String?) -> RunBody {
        var body = RunBody.Builder()
        body.append("{\"input\":{\"input_type\":\"image\",\"person_count\":\"single\",\"prompt\":")
        body.appendQuoted(prompt)
        body.append(",\"width\":\(width),\"height\":\(height),\"network_volume\":false,\"force_offload\":\(forceOffload)")
        // Base64 is A–Z a–z 0–9 + / = only: nothing to escape.
        if let imageBase64 {
            body.append(",\"image_base64\":\"")
            body.append(imageBase64)
            body.append("\"")
        } else if let imageURL {
            body.append(",\"image_url\":")
            body.appendQuoted(imageURL)
        }
        if let wav {
            body.append(",\"wav_base64\":\"")
            body.appendBase64(wav)
            body.append("\"")
        } else if let wavURL {
            body.append(",\"wav_url\":")
            body.appendQuoted(wavURL)
        }
        body.append("},\"policy\":{\"executionTimeout\":\(executionTimeoutMs),\"ttl\":\(ttlMs)}")
        if let webhook {
            body.append(",\"webhook\":")
            body.appendQuoted(webhook)
        }
        body.append("}")
        return body.build()
    }
}

/// A `/run` body, written once into memory of its exact size and sent from there
/// (`RequestBytes`): the audio is encoded straight into it (no zero fill first), and the transfer
/// takes no copy of its ~250 KB.
public final class RunBody: RequestBytes, @unchecked Sendable {
    private let storage: UnsafeMutableRawBufferPointer

    public var requestBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(storage) }
    public var count: Int { storage.count }
    public var bytes: [UInt8] { Array(requestBytes) }

    /// The body's pieces, gathered before their total size is known.
    struct Builder {
        private enum Piece {
            case text([UInt8])
            case string(String)
            case base64([UInt8])
        }
        private var pieces: [Piece] = []
        private var text: [UInt8] = []

        mutating func append(_ string: String) {
            // A long one (the image in base64) is copied once, into the body.
            if string.utf8.count > 1024 { flush(); pieces.append(.string(string)) } else { text.append(contentsOf: string.utf8) }
        }
        mutating func appendQuoted(_ string: String) { JSONText.appendQuoted(string, to: &text) }
        mutating func appendBase64(_ bytes: [UInt8]) { flush(); pieces.append(.base64(bytes)) }

        private mutating func flush() {
            if !text.isEmpty { pieces.append(.text(text)) }
            text = []
        }

        consuming func build() -> RunBody {
            flush()
            let sizes = pieces.map { piece in
                switch piece {
                case .text(let bytes): bytes.count
                case .string(let string): string.utf8.count
                case .base64(let bytes): Base64.encodedCount(bytes.count)
                }
            }
            let body = RunBody(count: sizes.reduce(0, +))
            var offset = 0
            let base = body.storage.baseAddress!.assumingMemoryBound(to: UInt8.self)
            for (piece, size) in zip(pieces, sizes) {
                switch piece {
                case .text(let bytes): bytes.withUnsafeBytes { UnsafeMutableRawPointer(base + offset).copyMemory(from: $0.baseAddress!, byteCount: size) }
                case .string(var string): string.withUTF8 { UnsafeMutableRawPointer(base + offset).copyMemory(from: $0.baseAddress!, byteCount: size) }
                case .base64(let bytes): bytes.withUnsafeBytes { Base64.write($0, to: base + offset) }
                }
                offset += size
            }
            return body
        }
    }

    private init(count: Int) {
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 1)
        storage = UnsafeMutableRawBufferPointer(rebasing: memory[..<count])
    }

    deinit { storage.deallocate() }
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
        /// Base64 text (raw or from a `data:` URI, the prefix removed), not yet decoded: a slice
        /// of the answer's bytes.
        case base64(ArraySlice<UInt8>)
        case url(String)
        case volumePath(String)
    }

    /// Parses a status response. A COMPLETED job without a usable video is RUNPOD_RESULT_MISSING;
    /// an error in the output, or FAILED (the SDK's JSON-string `error`), is RUNPOD_JOB_FAILED.
    /// Read by `JSONDocument`: the video stays in the body it came in (Foundation's parser copied
    /// it into a string, and that was most of a poll's cost).
    public static func parse(_ body: [UInt8]) throws(ServiceError) -> RunPodJob {
        guard let document = try? JSONDocument(body), let id = document.string(document.member("id", of: document.root)),
              let statusText = document.string(document.member("status", of: document.root)) else {
            throw ServiceError(.runpodBadResponse, "not a RunPod job", cause: String(decoding: body.prefix(200), as: UTF8.self))
        }
        guard let status = RunPodStatus(rawValue: statusText) else {
            throw ServiceError(.runpodBadResponse, "unknown RunPod status \(statusText)")
        }
        let root = document.root
        var job = RunPodJob(id: id, status: status, delayTimeMs: document.int(document.member("delayTime", of: root)),
                            executionTimeMs: document.int(document.member("executionTime", of: root)),
                            workerID: document.string(document.member("workerId", of: root)))
        switch status {
        case .failed:
            job.failure = ServiceError(.runpodJobFailed, failureMessage(document.member("error", of: root), in: document))
        case .completed:
            guard let output = document.member("output", of: root), !output.isNull else {
                job.failure = ServiceError(.runpodResultMissing, "the job completed without output")
                return job
            }
            guard case .object = output.kind else {
                job.failure = ServiceError(.runpodResultMissing, "the job's output holds no video")
                return job
            }
            let video = document.member("video", of: output)
            if document.string(document.member("status", of: output))?.lowercased() == "error" || document.member("error", of: output) != nil {
                let error = document.member("error", of: output) ?? document.member("message", of: output)
                job.failure = ServiceError(.runpodJobFailed, error.map { failureMessage($0, in: document) } ?? "the worker reported an error")
            } else if let text = document.utf8(video), !text.isEmpty {
                job.video = .base64(stripDataPrefix(text))
            } else if let video, let url = document.string(document.member("url", of: video)) {
                job.video = .url(url)
            } else if let url = document.string(document.member("video_url", of: output)) {
                job.video = .url(url)
            } else if let path = document.string(document.member("video_path", of: output)) {
                job.video = .volumePath(path)
            } else {
                job.failure = ServiceError(.runpodResultMissing, "the job's output holds no video")
            }
        default:
            break
        }
        return job
    }

    static func stripDataPrefix(_ text: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        guard text.starts(with: "data:".utf8), let comma = text.firstIndex(of: UInt8(ascii: ",")) else { return text }
        return text[(comma + 1)...]
    }

    /// The SDK sends handler exceptions as a JSON *string* with `error_message`.
    static func failureMessage(_ value: JSONDocument.Value?, in document: JSONDocument) -> String {
        guard let value, !value.isNull else { return "the job failed without a message" }
        if let text = document.string(value) {
            if let inner = try? JSONDocument(Array(text.utf8)), let message = inner.string(inner.member("error_message", of: inner.root)) {
                return message
            }
            return text
        }
        if let message = document.string(document.member("error_message", of: value) ?? document.member("message", of: value)) {
            return message
        }
        return document.text(value)
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
