import Foundation
import Testing
import TalkMeshCore
@testable import TalkMeshDispatcherService

/// Starts a program with posix_spawn (Foundation's Process can hang waiting from async code).
func spawn(_ path: String, _ arguments: [String], environment: [String: String]) throws -> pid_t {
    var pid: pid_t = 0
    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { argv.forEach { free($0) }; envp.forEach { free($0) } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    defer { posix_spawn_file_actions_destroy(&actions) }
    // A clean signal mask: this may run on a worker thread that blocks SIGTERM.
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attributes, &empty)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
    let rv = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
    guard rv == 0 else { throw ServiceError(.internalError, "cannot start \(path): \(String(cString: strerror(rv)))") }
    return pid
}

/// Runs a program to completion.
func runToEnd(_ path: String, _ arguments: [String]) throws {
    let pid = try spawn(path, arguments, environment: ProcessInfo.processInfo.environment)
    var status: Int32 = 0
    waitpid(pid, &status, 0)
}

/// The real client against the real emulator process on loopback.
final class Emulator {
    var pid: pid_t = 0
    let port: Int

    init(_ arguments: [String] = [], environment: [String: String] = [:]) throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let binary = ProcessInfo.processInfo.environment["TALKMESH_BIN"].map { URL(fileURLWithPath: $0) } ?? root.appendingPathComponent(".build/debug")
        let socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = Glibc.bind(socket, $0, length); _ = getsockname(socket, $0, &length) } }
        port = Int(UInt16(bigEndian: address.sin_port))
        Glibc.close(socket)
        var env = ProcessInfo.processInfo.environment
        env["HOST"] = "127.0.0.1"
        env["PORT"] = String(port)
        env["LOG_LEVEL"] = "warning"
        for (key, value) in environment { env[key] = value }
        pid = try spawn(binary.appendingPathComponent("talkmesh-runpod-emulator").path, arguments, environment: env)
        for _ in 0..<200 {
            let probe = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var target = sockaddr_in()
            target.sin_family = sa_family_t(AF_INET)
            target.sin_port = UInt16(port).bigEndian
            target.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &target) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            Glibc.close(probe)
            if connected == 0 { return }
            usleep(50_000)
        }
        throw ServiceError(.internalError, "the emulator did not start")
    }

    deinit {
        kill(pid, SIGTERM)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }

    /// The emulator's request log: [route, arrival time] pairs.
    func requests() async throws -> [[Any]] {
        let exchange = try await CurlEngine().perform(method: "GET", url: "http://127.0.0.1:\(port)/_emulator/requests")
        return try JSONSerialization.jsonObject(with: Data(exchange.body)) as! [[Any]]
    }

    func client(key: String? = nil, configure: (inout RunPodClient.Configuration) -> Void = { _ in }) -> RunPodClient {
        var configuration = RunPodClient.Configuration(endpointID: "talkmesh-test")
        configuration.baseURL = "http://127.0.0.1:\(port)/v2"
        configuration.apiKey = key
        configuration.backoffInitial = 0.05
        configuration.backoffMax = 0.2
        configure(&configuration)
        return RunPodClient(configuration: configuration)
    }
}

func fixtureInput(seconds: Double = 2) throws -> InfiniteTalkInput {
    let directory = NSTemporaryDirectory() + "talkmesh-client-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    func ffmpeg(_ arguments: [String]) throws {
        try runToEnd("/usr/bin/ffmpeg", ["-v", "error", "-y"] + arguments)
    }
    try ffmpeg(["-f", "lavfi", "-i", "testsrc2=s=256x384", "-frames:v", "1", "\(directory)/face.png"])
    try ffmpeg(["-f", "lavfi", "-i", "sine=f=300:sample_rate=16000", "-t", String(seconds), "-ac", "1", "-c:a", "pcm_s16le", "\(directory)/chunk.wav"])
    let image = [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(directory)/face.png")))
    let wav = [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(directory)/chunk.wav")))
    return InfiniteTalkInput(prompt: "a person talking", image: image, wav: wav, width: 256, height: 384)
}

func waitForTerminal(_ client: RunPodClient, _ id: String) async throws -> RunPodJob {
    for _ in 0..<600 {
        let job = try await client.status(id)
        if job.status.isTerminal { return job }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw ServiceError(.internalError, "job \(id) did not finish")
}

@Suite("RunPod client against the emulator", .serialized)
struct RunPodClientTests {
    @Test("submit, poll to COMPLETED, decode the video into the blob store")
    func completes() async throws {
        let emulator = try Emulator()
        let client = emulator.client()
        let submitted = try await client.submit(try fixtureInput())
        #expect(submitted.status == .inQueue)
        let done = try await waitForTerminal(client, submitted.id)
        #expect(done.status == .completed && done.failure == nil)
        let store = try FileBlobStore(root: NSTemporaryDirectory() + "talkmesh-client-store-\(getpid())")
        defer { try? FileManager.default.removeItem(atPath: store.root) }
        let key = try BlobKey("jobs/a/chunk-000.mp4")
        try await client.storeVideo(of: done, in: store, as: key)
        let bytes = try store.get(key)
        #expect(bytes.count > 1000 && Array(bytes[4..<8]) == Array("ftyp".utf8))
        let health = try await client.health()
        #expect((health["jobs"] as? [String: Any])?["completed"] as? Int == 1)
    }

    @Test("cancel, then an unknown job is RUNPOD_JOB_EXPIRED")
    func cancelAndExpired() async throws {
        let emulator = try Emulator(["--speed", "1", "--workers", "1"])
        let client = emulator.client()
        let job = try await client.submit(try fixtureInput(seconds: 4))
        #expect(try await client.cancel(job.id).status == .cancelled)
        await #expect(throws: ServiceError.self) { _ = try await client.status("no-such-job") }
        do { _ = try await client.status("no-such-job") } catch let error as ServiceError { #expect(error.code == .runpodJobExpired) }
    }

    @Test("a failed job carries the SDK's error_message and can be retried")
    func failedAndRetry() async throws {
        let emulator = try Emulator(["--fail-rate", "1"])
        let client = emulator.client()
        let job = try await client.submit(try fixtureInput())
        let done = try await waitForTerminal(client, job.id)
        #expect(done.status == .failed)
        #expect(done.failure?.code == .runpodJobFailed && done.failure?.message == "CUDA out of memory (injected)")
        #expect(try await client.retry(job.id).status == .inQueue)
    }

    @Test("COMPLETED without output is RUNPOD_RESULT_MISSING")
    func missingOutput() async throws {
        let emulator = try Emulator(["--missing-output-rate", "1"])
        let client = emulator.client()
        let done = try await waitForTerminal(client, try await client.submit(try fixtureInput()).id)
        #expect(done.status == .completed && done.failure?.code == .runpodResultMissing)
    }

    @Test("401 is RUNPOD_UNAUTHORIZED and is not retried")
    func unauthorized() async throws {
        let emulator = try Emulator(environment: ["RUNPOD_API_KEY": "right"])
        do {
            _ = try await emulator.client(key: "wrong").health()
            Issue.record("expected 401")
        } catch let error as ServiceError {
            #expect(error.code == .runpodUnauthorized)
        }
        let requests = try await emulator.requests()
        #expect(requests.count == 1)  // one attempt only
        #expect(try await emulator.client(key: "right").health()["workers"] != nil)
    }

    @Test("429 and 500 are retried with backoff, then RUNPOD_UNAVAILABLE", arguments: ["--http-429-rate", "--http-500-rate"])
    func retriedFaults(flag: String) async throws {
        let emulator = try Emulator([flag, "1"])
        let client = emulator.client { $0.maxAttempts = 3 }
        do {
            _ = try await client.health()
            Issue.record("expected a failure")
        } catch let error as ServiceError {
            #expect(error.code == .runpodUnavailable)
        }
        let requests = try await emulator.requests()
        #expect(requests.count == 3)
        if flag == "--http-429-rate" {
            // The emulator's 429 says Retry-After: 1; backoff alone would wait at most 0.2 s here.
            let times = requests.map { $0[1] as! Double }
            for (earlier, later) in zip(times, times.dropFirst()) { #expect(later - earlier >= 0.95) }
        }
    }

    @Test("5xx waits an exponential backoff between attempts, seen in the emulator's arrival times")
    func serverErrorsBackOff() async throws {
        let emulator = try Emulator(["--http-500-rate", "1"])
        // Attempt n waits a jittered time in [cap/2, cap], cap = 0.2 s × 2^(n-1) up to 0.8 s.
        let client = emulator.client {
            $0.maxAttempts = 4
            $0.backoffInitial = 0.2
            $0.backoffMax = 0.8
        }
        await #expect(throws: ServiceError.self) { _ = try await client.health() }
        let times = try await emulator.requests().map { $0[1] as! Double }
        #expect(times.count == 4)
        // Each wait is at least half its cap (sleeping never ends early): 0.1, 0.2, 0.4 s, growing.
        for (index, (earlier, later)) in zip(times, times.dropFirst()).enumerated() {
            #expect(later - earlier >= 0.1 * pow(2, Double(index)) - 0.005, "wait \(index + 1): \(later - earlier) s")
        }
    }

    @Test("executionTimeout ends a job TIMED_OUT; a hanging job stays IN_PROGRESS")
    func timedOutAndHanging() async throws {
        let slow = try Emulator(["--speed", "1"])
        let client = slow.client()
        let job = try await client.submit(try fixtureInput(seconds: 3), executionTimeoutMs: 300)
        #expect(try await waitForTerminal(client, job.id).status == .timedOut)
        #expect(try await client.retry(job.id).status == .inQueue)
        let stuck = try Emulator(["--hang-rate", "1"])
        let hanging = stuck.client()
        let id = try await hanging.submit(try fixtureInput()).id
        try await Task.sleep(for: .milliseconds(500))
        #expect(try await hanging.status(id).status == .inProgress)
        #expect(try await hanging.cancel(id).status == .cancelled)
    }

    @Test("configuration from the environment")
    func environment() throws {
        let configuration = try RunPodClient.Configuration.fromEnvironment(["RUNPOD_ENDPOINT_ID": "abc", "RUNPOD_API_KEY": "k",
                                                                             "RUNPOD_BASE_URL": "http://127.0.0.1:8090/v2/"])
        #expect(configuration.endpointID == "abc" && configuration.apiKey == "k" && configuration.baseURL == "http://127.0.0.1:8090/v2")
        #expect(try RunPodClient.Configuration.fromEnvironment(["RUNPOD_ENDPOINT_ID": "x"]).baseURL == "https://api.runpod.ai/v2")
        #expect(throws: ServiceError.self) { try RunPodClient.Configuration.fromEnvironment([:]) }
        #expect(throws: ServiceError.self) { try RunPodClient.Configuration.fromEnvironment(["RUNPOD_ENDPOINT_ID": "x", "RUNPOD_BASE_URL": "ftp://x"]) }
    }

    @Test("a video_url result is downloaded into the blob store")
    func downloadsURL() async throws {
        let directory = NSTemporaryDirectory() + "talkmesh-client-http-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let video = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try Data(video).write(to: URL(fileURLWithPath: directory + "/result.mp4"))
        // The HTTP server binds port 0 itself and writes the port it got: a port picked beforehand can be taken meanwhile.
        let portFile = directory + "/port"
        try? FileManager.default.removeItem(atPath: portFile)
        let serve = "import functools, http.server, sys\n"
            + "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
            + "server = http.server.HTTPServer(('127.0.0.1', 0), handler)\n"
            + "open(sys.argv[2] + '.tmp', 'w').write(str(server.server_port))\n"
            + "import os; os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
            + "server.serve_forever()\n"
        let server = try spawn("/usr/bin/env", ["python3", "-c", serve, directory, portFile], environment: ProcessInfo.processInfo.environment)
        defer { kill(server, SIGTERM); var status: Int32 = 0; waitpid(server, &status, 0) }
        var port = 0
        for _ in 0..<100 where port == 0 {
            if let text = try? String(contentsOfFile: portFile, encoding: .utf8), let number = Int(text) { port = number }
            else { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(port > 0)
        let emulator = try Emulator()
        let job = try RunPodJob.parse(Array(#"{"id":"a","status":"COMPLETED","output":{"video_url":"http://127.0.0.1:\#(port)/result.mp4"}}"#.utf8))
        let store = try FileBlobStore(root: directory + "/store")
        let client = emulator.client()
        try await client.storeVideo(of: job, in: store, as: try BlobKey("jobs/a/result.mp4"))  // listening once the port is written
        #expect(try store.get(try BlobKey("jobs/a/result.mp4")) == video)
    }

    @Test("cancelling the calling task ends a request in flight at once")
    func cancelledRequest() async throws {
        let emulator = try Emulator(["--slow-status", "5s"])
        let client = emulator.client { $0.requestTimeoutMs = 20_000 }
        let job = try await client.submit(try fixtureInput())
        let asking = Task { try await client.status(job.id) }
        for _ in 0..<100 where try await emulator.requests().filter({ $0[0] as? String == "status" }).isEmpty {
            try await Task.sleep(for: .milliseconds(20))  // until the request reached the emulator
        }
        asking.cancel()
        let result = await asking.result
        #expect(throws: CancellationError.self) { try result.get() }
        #expect(try await client.submit(try fixtureInput()).id != job.id)  // the engine carries on
    }

    @Test("slow status answers time out, are retried, then RUNPOD_UNAVAILABLE")
    func slowStatus() async throws {
        let emulator = try Emulator(["--slow-status", "400ms"])
        let client = emulator.client { $0.requestTimeoutMs = 100; $0.maxAttempts = 2 }
        let job = try await client.submit(try fixtureInput())
        do {
            _ = try await client.status(job.id)
            Issue.record("expected a timeout")
        } catch let error as ServiceError {
            #expect(error.code == .runpodUnavailable)
        }
        let statusRequests = try await emulator.requests().filter { $0[0] as? String == "status" }
        #expect(statusRequests.count == 2)
        let patient = emulator.client()
        #expect(try await patient.status(job.id).id == job.id)
    }

    @Test("a volume path without a configured volume is RUNPOD_RESULT_MISSING")
    func volumePath() async throws {
        let job = try RunPodJob.parse(Array(#"{"id":"a","status":"COMPLETED","output":{"video_path":"/runpod-volume/x.mp4"}}"#.utf8))
        let store = try FileBlobStore(root: NSTemporaryDirectory() + "talkmesh-client-volume-\(getpid())")
        defer { try? FileManager.default.removeItem(atPath: store.root) }
        let client = RunPodClient(configuration: RunPodClient.Configuration(endpointID: "x"))
        do {
            try await client.storeVideo(of: job, in: store, as: try BlobKey("a.mp4"))
            Issue.record("expected RUNPOD_RESULT_MISSING")
        } catch let error as ServiceError {
            #expect(error.code == .runpodResultMissing)
        }
        #expect(try !store.exists(try BlobKey("a.mp4")))
    }

    @Test("a body over 10 MB is refused before sending")
    func payloadTooLarge() async throws {
        let emulator = try Emulator()
        let client = emulator.client()
        let input = InfiniteTalkInput(prompt: "x", image: [UInt8](repeating: 1, count: 8 << 20), wav: [1], width: 256, height: 256)
        do {
            _ = try await client.submit(input)
            Issue.record("expected RUNPOD_PAYLOAD_TOO_LARGE")
        } catch let error as ServiceError {
            #expect(error.code == .runpodPayloadTooLarge)
        }
        let requests = try await emulator.requests()
        #expect(requests.isEmpty)
    }

    @Test("500 jobs in flight never exceed the request budget")
    func budget() async throws {
        let emulator = try Emulator(["--workers", "8"])
        let client = emulator.client { configuration in
            configuration.runPerWindow = 100
            configuration.statusPerWindow = 150
            configuration.budgetWindow = 0.5
        }
        let input = try fixtureInput(seconds: 0.2)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<500 {
                group.addTask {
                    let job = try await client.submit(input)
                    _ = try await client.status(job.id)
                }
            }
            try await group.waitForAll()
        }
        let requests = try await emulator.requests()
        for (route, limit) in [("run", 100), ("status", 150)] {
            let times = requests.filter { $0[0] as? String == route }.compactMap { $0[1] as? Double }.sorted()
            #expect(times.count == 500)
            var maximum = 0
            for (index, time) in times.enumerated() {
                // Arrival times carry the scheduling jitter of a loaded 2-core CI machine: a request granted
                // at t arrives at t + d, so arrivals within L seconds were granted within L + max(d). A 50 ms
                // and then a 100 ms margin were exceeded there (the latter under ASan: 115 in 0.4 s), so the
                // span checked is 0.2 s of the 0.5 s budgeted, allowing 0.3 s of delay. Without a budget the
                // 500 requests arrive together and this still fails by hundreds; RunPodWireTests checks
                // the granted instants themselves, exactly.
                maximum = max(maximum, times[index...].prefix { $0 - time < 0.2 }.count)
            }
            #expect(maximum <= limit, "\(route): \(maximum) in one window")
        }
    }
}
