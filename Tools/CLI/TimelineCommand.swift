import ArgumentParser
import Glibc

/// `talkmesh timeline ID`: the job's timeline as a text Gantt chart of its chunks.
struct TimelineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "timeline", abstract: "Draws a job's chunks over time: queued on RunPod (.), running (#), failed attempts (x).",
        discussion: JobExitCodes.discussion)
    @Argument(help: "The job's id.") var id: String
    @Option(help: "Columns of the chart.") var width = 60
    @OptionGroup var gateway: GatewayOptions

    func run() throws {
        try gateway.reporting("timeline") {
            let response = try gateway.client().send("GET", "/v1/jobs/\(JobSummary.pathSegment(id))/timeline")
            guard response.status == 200 else { throw GatewayClient.Failure(response) }
            if gateway.json { JSONOutput.print(response.object) } else { print(TimelineChart.text(response.object, width: max(10, min(width, 400)))) }
        }
    }
}

/// The chart: one row per chunk, time left to right from the job's creation to its end (or now).
enum TimelineChart {
    static func text(_ timeline: [String: Any], width: Int) -> String {
        let events = timeline["events"] as? [[String: Any]] ?? []
        guard let created = (timeline["created_at"] as? String).flatMap(milliseconds) else { return "no timeline" }
        let times = events.compactMap { ($0["at"] as? String).flatMap(milliseconds) }
        let end = (timeline["completed_at"] as? String).flatMap(milliseconds) ?? max(times.max() ?? created, created + 1)
        let span = max(1, end - created)
        func column(_ at: Int64) -> Int { min(width - 1, max(0, Int((at - created) * Int64(width) / span))) }
        var lines = ["\(timeline["id"] as? String ?? "") \(timeline["status"] as? String ?? "")  \(format(span)) from creation to "
                     + (timeline["completed_at"] != nil ? "end" : "now")]
        let jobEvents = events.filter { $0["chunk"] == nil }
        lines.append("  job: " + jobEvents.map { "\($0["to"] as? String ?? "") +\(format(((($0["at"] as? String).flatMap(milliseconds)) ?? created) - created))" }
            .joined(separator: ", "))
        lines.append("chunk  audio            tries  |" + axis(width: width, span: span) + "|")
        let chunks = timeline["chunks"] as? [[String: Any]] ?? []
        for chunk in chunks {
            guard let index = chunk["index"] as? Int else { continue }
            var row = [Character](repeating: " ", count: width)
            var state = "pending", since = created
            func paint(until at: Int64) {
                let mark: Character? = switch state {
                case "submitting", "submitted": "."
                case "running": "#"
                default: nil
                }
                guard let mark else { return }
                for position in column(since)...max(column(since), column(at)) where row[position] == " " || (mark == "#" && row[position] == ".") { row[position] = mark }
            }
            for event in events where event["chunk"] as? Int == index {
                guard let at = (event["at"] as? String).flatMap(milliseconds), let next = event["to"] as? String else { continue }
                paint(until: at)
                if next == "failed" || event["error_code"] != nil { row[column(at)] = "x" }  // a failed attempt
                state = next
                since = at
            }
            paint(until: end)
            let start = chunk["start_sec"] as? Double ?? 0, duration = chunk["duration_sec"] as? Double ?? 0
            let audio = String(format: "%6.1fs +%5.1fs", start, duration)
            lines.append(String(format: "%5d  ", index) + audio + "  " + String(format: "%5d", chunk["attempts"] as? Int ?? 0) + "  |" + String(row) + "|")
        }
        return lines.joined(separator: "\n")
    }

    static func axis(width: Int, span: Int64) -> String {
        let label = format(span)
        return "0" + String(repeating: "-", count: max(0, width - 1 - label.count)) + label
    }

    static func format(_ milliseconds: Int64) -> String {
        milliseconds < 60_000 ? String(format: "%.1fs", Double(milliseconds) / 1000) : String(format: "%dm%02ds", milliseconds / 60_000, milliseconds / 1000 % 60)
    }

    /// `2026-12-05T09:12:54.123Z` → Unix milliseconds.
    static func milliseconds(_ text: String) -> Int64? {
        let parts = text.split(whereSeparator: { "-T:.Z".contains($0) }).compactMap { Int32($0) }
        guard parts.count == 7 else { return nil }
        var fields = tm()
        fields.tm_year = parts[0] - 1900
        fields.tm_mon = parts[1] - 1
        fields.tm_mday = parts[2]
        fields.tm_hour = parts[3]
        fields.tm_min = parts[4]
        fields.tm_sec = parts[5]
        return Int64(timegm(&fields)) * 1000 + Int64(parts[6])
    }
}
