import ArgumentParser
import Foundation
import TalkMeshService

/// Where the Gateway is and which key to use: flags, then the environment, then what a local
/// `talkmesh up` wrote into its data directory.
struct GatewayOptions: ParsableArguments {
    @Option(help: "The Gateway's URL (env TALKMESH_GATEWAY; default: the one `talkmesh up` wrote into --data-dir, else http://127.0.0.1:8080).")
    var gateway: String?
    @Option(help: "The API key (env TALKMESH_API_KEY; default: the development key of `talkmesh up` in --data-dir).")
    var apiKey: String?
    @Option(help: "The data directory of a local `talkmesh up`.")
    var dataDir = ".talkmesh"
    @Option(help: "CA certificates (PEM) to verify an https Gateway.")
    var caFile: String?
    @Flag(help: "Print JSON on stdout for scripts (errors too: {\"error\": {\"code\", \"message\"}}).")
    var json = false

    func client() throws -> GatewayClient {
        let environment = ProcessEnvironment.current()
        func stored(_ name: String) -> String? {
            (try? String(contentsOfFile: "\(dataDir)/\(name)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let url = gateway ?? environment["TALKMESH_GATEWAY"].flatMap { $0.isEmpty ? nil : $0 } ?? stored("gateway-url") ?? "http://127.0.0.1:8080"
        guard let key = apiKey ?? environment["TALKMESH_API_KEY"].flatMap({ $0.isEmpty ? nil : $0 }) ?? stored("dev-api-key") else {
            throw GatewayClient.Failure(code: "NO_API_KEY", message: "give --api-key, set TALKMESH_API_KEY, or start `talkmesh up` (it writes \(dataDir)/dev-api-key)",
                                        exitCode: 1)
        }
        return GatewayClient(baseURL: url.hasSuffix("/") ? String(url.dropLast()) : url, apiKey: key, caFile: caFile)
    }

    /// Runs `body`, reporting a failure as `talkmesh NAME: CODE: message` on stderr (and as JSON
    /// on stdout with --json) with its exit code.
    func reporting(_ name: String, _ body: () throws -> Void) throws {
        do {
            try body()
        } catch let failure as GatewayClient.Failure {
            StandardStream.write(2, "talkmesh \(name): \(failure)\n")
            if json { JSONOutput.print(["error": ["code": failure.code, "message": failure.message]]) }
            throw ExitCode(failure.exitCode)
        }
    }
}

/// Exit codes shared by the commands that call the Gateway.
enum JobExitCodes {
    static let discussion = """
        Exit codes: 0 success; 64 bad arguments; 1 a local file problem; 2 the Gateway cannot be reached; \
        3 the Gateway refused the request (its error code is printed); 4 the job ended failed, cancelled or timed out.
        """
}

enum JSONOutput {
    static func print(_ value: Any) {
        let data = (try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
        Swift.print(String(decoding: data, as: UTF8.self))
    }
}

/// `talkmesh submit`: upload, follow, download.
struct SubmitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "submit",
        abstract: "Turns a portrait and a speech recording into a talking-avatar video through the Gateway.",
        discussion: "Shows live progress on stderr (a bar on a terminal, one line per change otherwise), then writes the video. "
            + JobExitCodes.discussion)

    @Option(help: "The portrait (PNG, JPEG or WebP).") var image: String
    @Option(help: "The speech (WAV, MP3, M4A, OGG or FLAC), any length.") var audio: String
    @Option(help: "Video width.") var width = 384
    @Option(help: "Video height.") var height = 576
    @Option(help: "What the person does.") var prompt: String?
    @Option(help: "Seconds of audio per RunPod job (default: the Dispatcher's, 45).") var chunkTargetSec: Double?
    @Flag(help: "Ask the workers to offload the model between steps (smaller GPUs).") var forceOffload = false
    @Option(help: "An Idempotency-Key: submitting again with it returns the same job.") var idempotencyKey: String?
    @Option(name: .shortAndLong, help: "Where to write the video (default: <job id>.mp4).") var output: String?
    @Flag(help: "No progress on stderr.") var quiet = false
    @OptionGroup var gateway: GatewayOptions

    func validate() throws {
        for file in [image, audio] where access(file, R_OK) != 0 { throw ValidationError("cannot read \(file)") }
        guard (64...4096).contains(width), (64...4096).contains(height) else { throw ValidationError("--width and --height must be 64…4096") }
    }

    func run() throws {
        try gateway.reporting("submit") {
            let client = try gateway.client()
            var fields = [("width", "\(width)"), ("height", "\(height)")]
            if let prompt { fields.append(("prompt", prompt)) }
            if let chunkTargetSec { fields.append(("chunk_target_sec", "\(chunkTargetSec)")) }
            if forceOffload { fields.append(("force_offload", "true")) }
            let created = try client.createJob(image: image, audio: audio, fields: fields, idempotencyKey: idempotencyKey)
            guard created.status == 202 || created.status == 200, let id = created.object["id"] as? String else {
                throw GatewayClient.Failure(created)
            }
            let view = ProgressView(enabled: !quiet)
            view.note("job \(id) created")
            let job = try JobFollower(client: client, id: id).follow { view.show($0) }
            view.finish()
            guard job["status"] as? String == "completed" else { throw JobFollower.failure(job) }
            let target = output ?? "\(id).mp4"
            let video = try client.download("/v1/jobs/\(id)/video", to: target)
            guard video.status == 200 else { throw GatewayClient.Failure(video) }
            let detailed = try client.send("GET", "/v1/jobs/\(id)?include=chunks")
            guard detailed.status == 200 else { throw GatewayClient.Failure(detailed) }
            if gateway.json {
                var object = detailed.object
                object["output"] = target
                JSONOutput.print(object)
            } else {
                print(JobSummary.text(detailed.object))
                print("video: \(target)")
            }
        }
    }
}

/// `talkmesh watch ID`: follows a job until it ends.
struct WatchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "watch", abstract: "Follows a job's progress until it ends (--json: one line per change).",
        discussion: JobExitCodes.discussion)
    @Argument(help: "The job's id.") var id: String
    @OptionGroup var gateway: GatewayOptions

    func run() throws {
        try gateway.reporting("watch") {
            let view = ProgressView(enabled: !gateway.json)
            let job = try JobFollower(client: try gateway.client(), id: id).follow { job in
                if gateway.json { JSONOutput.print(job) } else { view.show(job) }
            }
            view.finish()
            if !gateway.json { print(JobSummary.text(job)) }
            if job["status"] as? String != "completed" { throw JobFollower.failure(job) }
        }
    }
}

/// `talkmesh status ID`.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Prints a job's state, chunks and timings.",
                                                    discussion: JobExitCodes.discussion)
    @Argument(help: "The job's id.") var id: String
    @OptionGroup var gateway: GatewayOptions

    func run() throws {
        try gateway.reporting("status") {
            let response = try gateway.client().send("GET", "/v1/jobs/\(JobSummary.pathSegment(id))?include=chunks")
            guard response.status == 200 else { throw GatewayClient.Failure(response) }
            if gateway.json { JSONOutput.print(response.object) } else { print(JobSummary.text(response.object)) }
        }
    }
}

/// `talkmesh jobs`.
struct JobsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jobs", abstract: "Lists the key's jobs, newest first.",
                                                    discussion: JobExitCodes.discussion)
    @Option(help: "Only jobs in this state (in_queue, running, completed, failed, cancelled, timed_out).") var status: String?
    @Option(help: "How many jobs at most.") var limit = 20
    @OptionGroup var gateway: GatewayOptions

    func run() throws {
        try gateway.reporting("jobs") {
            let client = try gateway.client()
            var jobs: [[String: Any]] = []
            var token: String?
            repeat {
                var path = "/v1/jobs?page_size=\(min(100, max(1, limit - jobs.count)))"
                if let status { path += "&status=\(JobSummary.pathSegment(status))" }
                if let token { path += "&page_token=\(JobSummary.pathSegment(token))" }
                let response = try client.send("GET", path)
                guard response.status == 200 else { throw GatewayClient.Failure(response) }
                jobs += response.object["jobs"] as? [[String: Any]] ?? []
                token = response.object["next_page_token"] as? String
            } while token != nil && jobs.count < limit
            if gateway.json {
                JSONOutput.print(["jobs": jobs])
                return
            }
            print(["ID", "STATUS", "PROGRESS", "CHUNKS", "CREATED", "VIDEO"].joined(separator: "\t"))
            for job in jobs {
                let chunks = job["chunks"] as? [String: Any] ?? [:]
                let video = (job["video"] as? [String: Any])?["duration_sec"] as? Double
                print([job["id"] as? String ?? "", job["status"] as? String ?? "", "\(JobSummary.number(job["progress"]))%",
                       "\(chunks["completed"] as? Int ?? 0)/\(chunks["total"] as? Int ?? 0)", job["created_at"] as? String ?? "",
                       video.map { String(format: "%.1f s", $0) } ?? "-"].joined(separator: "\t"))
            }
        }
    }
}

/// `talkmesh cancel ID`.
struct CancelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cancel", abstract: "Cancels a job that has not ended.",
                                                    discussion: JobExitCodes.discussion)
    @Argument(help: "The job's id.") var id: String
    @OptionGroup var gateway: GatewayOptions

    func run() throws {
        try gateway.reporting("cancel") {
            let response = try gateway.client().send("DELETE", "/v1/jobs/\(JobSummary.pathSegment(id))")
            guard response.status == 202 || response.status == 200 else { throw GatewayClient.Failure(response) }
            if gateway.json { JSONOutput.print(response.object) } else { print("cancelling \(id): \(response.object["status"] as? String ?? "")") }
        }
    }
}

/// Follows a job through the events stream, resuming with Last-Event-ID when the stream breaks.
struct JobFollower {
    let client: GatewayClient
    let id: String
    /// Broken streams tolerated in a row before giving up (each waits a little longer).
    var reconnects = 30

    /// Calls `onChange` with every new state; returns the terminal one.
    func follow(_ onChange: @escaping ([String: Any]) -> Void) throws -> [String: Any] {
        var lastID: String?
        var last: [String: Any]?
        var failures = 0
        while true {
            var parser = ServerSentEvents()
            var terminal: [String: Any]?
            var progressed = false
            let headers = lastID.map { ["last-event-id: \($0)"] } ?? []
            let response: GatewayClient.Response
            do {
                response = try client.stream("/v1/jobs/\(JobSummary.pathSegment(id))/events", headers: headers) { bytes in
                    for event in parser.feed(bytes) {
                        guard let job = (try? JSONSerialization.jsonObject(with: Data(event.data.utf8))) as? [String: Any] else { continue }
                        if let eventID = event.id { lastID = eventID }
                        last = job
                        progressed = true
                        onChange(job)
                        if JobSummary.isTerminal(job) { terminal = job; return false }
                    }
                    return true
                }
            } catch let failure as GatewayClient.Failure where failure.exitCode == 2 || failure.code.hasPrefix("CURL_") {
                // The connection went (a Gateway restarting, say): resume where it broke.
                failures += 1
                if failures > reconnects { throw failure }
                Thread.sleep(forTimeInterval: min(5, 0.2 * Double(failures)))
                continue
            }
            if let terminal { return terminal }
            guard response.status == 200 else { throw GatewayClient.Failure(response) }
            // The stream ended before the job did: resume.
            if let last, JobSummary.isTerminal(last) { return last }
            failures = progressed ? 0 : failures + 1
            if failures > reconnects {
                throw GatewayClient.Failure(code: "EVENTS_ENDED", message: "the events stream of \(id) keeps ending before the job does", exitCode: 3)
            }
            Thread.sleep(forTimeInterval: min(5, 0.2 * Double(failures)))
        }
    }

    /// A job that ended other than completed, as the failure the CLI reports.
    static func failure(_ job: [String: Any]) -> GatewayClient.Failure {
        let error = job["error"] as? [String: Any]
        let status = job["status"] as? String ?? "unknown"
        return GatewayClient.Failure(code: error?["code"] as? String ?? "JOB_\(status.uppercased())",
                                     message: "job \(job["id"] as? String ?? "") \(status)" + ((error?["message"] as? String).map { ": \($0)" } ?? ""),
                                     exitCode: 4)
    }
}

/// A text/event-stream parser: bytes in, complete events out.
struct ServerSentEvents {
    struct Event {
        var id: String?
        var data: String
    }

    private var pending: [UInt8] = []
    private var id: String?
    private var data: [String] = []

    mutating func feed(_ bytes: UnsafeRawBufferPointer) -> [Event] {
        pending.append(contentsOf: bytes)
        var events: [Event] = []
        while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
            var line = String(decoding: pending[..<newline], as: UTF8.self)
            pending.removeSubrange(...newline)
            if line.hasSuffix("\r") { line.removeLast() }
            if line.isEmpty {
                if !data.isEmpty { events.append(Event(id: id, data: data.joined(separator: "\n"))) }
                data = []
                continue
            }
            if line.hasPrefix(":") { continue }  // a comment (keep-alive)
            let field = line.prefix { $0 != ":" }
            var value = line.dropFirst(field.count).dropFirst()
            if value.hasPrefix(" ") { value = value.dropFirst() }
            switch field {
            case "id": id = String(value)
            case "data": data.append(String(value))
            default: break
            }
        }
        return events
    }
}
