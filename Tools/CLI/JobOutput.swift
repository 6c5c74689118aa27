import Foundation
import TalkMeshService

/// Live progress on stderr: one redrawn bar on a terminal, one plain line per change otherwise.
final class ProgressView {
    private let enabled: Bool
    private let terminal = isatty(2) == 1
    private var lastLine = ""
    private var drawn = false

    init(enabled: Bool) {
        self.enabled = enabled
    }

    func note(_ text: String) {
        guard enabled else { return }
        clear()
        StandardStream.write(2, text + "\n")
    }

    func show(_ job: [String: Any]) {
        guard enabled else { return }
        let percent = JobSummary.number(job["progress"])
        let chunks = job["chunks"] as? [String: Any] ?? [:]
        let total = chunks["total"] as? Int ?? 0, done = chunks["completed"] as? Int ?? 0
        let eta = (job["eta_seconds"] as? Double).map { $0 > 0 ? "ETA \(JobSummary.clock($0))" : "" } ?? ""
        let words = [JobSummary.stage(job), total > 0 ? "chunks \(done)/\(total)" : "", "\(percent)%", eta].filter { !$0.isEmpty }
        let text = words.joined(separator: "  ")
        guard text != lastLine else { return }
        lastLine = text
        if terminal {
            let width = 30, filled = min(width, max(0, Int((Double(percent) ?? 0) / 100 * Double(width))))
            let bar = "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]"
            StandardStream.write(2, "\r\u{1B}[2K\(bar) \(text)")
            drawn = true
        } else {
            StandardStream.write(2, text + "\n")
        }
    }

    func finish() {
        guard enabled, drawn else { return }
        StandardStream.write(2, "\n")
        drawn = false
    }

    private func clear() {
        if drawn { StandardStream.write(2, "\r\u{1B}[2K") }
    }
}

/// How the CLI words a job.
enum JobSummary {
    static func isTerminal(_ job: [String: Any]) -> Bool {
        ["completed", "failed", "cancelled", "timed_out"].contains(job["status"] as? String ?? "")
    }

    /// queued, splitting, rendering, stitching, then the terminal status.
    static func stage(_ job: [String: Any]) -> String {
        let status = job["status"] as? String ?? "unknown"
        guard status == "running" else { return status == "in_queue" ? "queued" : status }
        let chunks = job["chunks"] as? [String: Any] ?? [:]
        let total = chunks["total"] as? Int ?? 0, done = chunks["completed"] as? Int ?? 0
        return total == 0 ? "splitting" : done < total ? "rendering" : "stitching"
    }

    /// A progress number as the API gives it (50, 33.3), without a trailing `.0`.
    static func number(_ value: Any?) -> String {
        let number = value as? Double ?? Double(value as? Int ?? 0)
        return number == number.rounded() ? String(Int(number)) : String(format: "%.1f", number)
    }

    /// `1:05`, `12:00:03`.
    static func clock(_ seconds: Double) -> String {
        let total = Int(seconds.rounded())
        let (hours, minutes, rest) = (total / 3600, total / 60 % 60, total % 60)
        return hours > 0 ? String(format: "%d:%02d:%02d", hours, minutes, rest) : String(format: "%d:%02d", minutes, rest)
    }

    static func pathSegment(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
    }

    static func date(_ value: Any?) -> Date? {
        guard let text = value as? String else { return nil }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text)
    }

    /// The job's state, its video, and where the time went: the whole job, then each chunk's
    /// place in the audio and its RunPod queue and execution times.
    static func text(_ job: [String: Any]) -> String {
        var lines: [String] = []
        let id = job["id"] as? String ?? "", status = job["status"] as? String ?? "unknown"
        var head = "job \(id): \(status)"
        if let created = date(job["created_at"]), let ended = date(job["completed_at"]) ?? (isTerminal(job) ? date(job["updated_at"]) : nil) {
            head += String(format: " in %.1f s", ended.timeIntervalSince(created))
        } else if !isTerminal(job) {
            head += " (\(stage(job)), \(number(job["progress"]))%)"
        }
        lines.append(head)
        if let error = job["error"] as? [String: Any] {
            lines.append("  error: \(error["code"] as? String ?? ""): \(error["message"] as? String ?? "")")
        }
        if let video = job["video"] as? [String: Any] {
            lines.append(String(format: "  video: %.2f s, %d×%d", video["duration_sec"] as? Double ?? 0,
                                video["width"] as? Int ?? 0, video["height"] as? Int ?? 0))
        }
        for chunk in job["chunk_list"] as? [[String: Any]] ?? [] {
            let start = chunk["start_sec"] as? Double ?? 0, duration = chunk["duration_sec"] as? Double ?? 0
            var line = String(format: "  chunk %d: %6.1f–%6.1f s  ", chunk["index"] as? Int ?? 0, start, start + duration)
                + (chunk["status"] as? String ?? "")
            if let submitted = date(chunk["submitted_at"]), let finished = date(chunk["finished_at"]) {
                line += String(format: "  %.1f s on RunPod (queue %.1f s, execution %.1f s)", finished.timeIntervalSince(submitted),
                               Double(chunk["queue_delay_ms"] as? Int ?? 0) / 1000, Double(chunk["execution_ms"] as? Int ?? 0) / 1000)
            }
            if let attempts = chunk["attempts"] as? Int, attempts > 1 { line += ", \(attempts) attempts" }
            lines.append(line)
        }
        return lines.joined(separator: "\n")
    }
}
