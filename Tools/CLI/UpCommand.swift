import ArgumentParser
import CTalkMesh
import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshGatewayService
import TalkMeshService

/// `talkmesh up`: the whole mesh on loopback, supervised.
struct UpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "up",
        abstract: "Runs the whole mesh on loopback: Media, Audio, Dispatcher, Gateway and the RunPod emulator.",
        discussion: """
            Embedded defaults: blobs in <data dir>/blobs, jobs in <data dir>/jobs.db (SQLite), API keys in \
            <data dir>/api-keys.json. The first run creates a development key (<data dir>/dev-api-key, mode 0600) that \
            `talkmesh submit` uses by default. Waits until every service serves, prints the Gateway's URL and the key, \
            then streams the services' logs. Ctrl-C or SIGTERM drains and stops them all (exit 0); a service that \
            ends on its own is reported with its last lines and the others are stopped (exit 1). Replica i of a \
            service (from 0) listens on its port + 10 × i; the Dispatcher balances over them.
            """)

    @Option(help: "Where blobs, jobs and keys live.") var dataDir = ".talkmesh"
    @Option(help: "The Gateway's port.") var gatewayPort = 8080
    @Option(help: "The Media service's port (its first replica).") var mediaPort = 50051
    @Option(help: "The Audio service's port (its first replica).") var audioPort = 50052
    @Option(help: "The Dispatcher's port.") var dispatcherPort = 50053
    @Option(help: "The RunPod emulator's port.") var emulatorPort = 8090
    @Option(help: "Media replicas.") var media = 1
    @Option(help: "Audio replicas.") var audio = 1
    @Flag(help: "Use the real RunPod endpoint (RUNPOD_ENDPOINT_ID, RUNPOD_API_KEY) instead of the emulator.") var runpod = false
    @Option(parsing: .singleValue, help: "An argument for the emulator, e.g. --emulator-arg=--fail-rate=1 (repeatable).")
    var emulatorArg: [String] = []
    @Option(help: "Where the service executables are (default: beside this one).") var binDir: String?
    @Option(help: "Seconds to wait for every service to serve.") var readyTimeout = 60.0
    @Flag(help: "Keep the services' logs to themselves (the supervisor still reports).") var quiet = false

    func validate() throws {
        guard (1...16).contains(media), (1...16).contains(audio) else { throw ValidationError("--media and --audio must be 1…16") }
        for port in [gatewayPort, mediaPort, audioPort, dispatcherPort, emulatorPort] where !(1...65535).contains(port) {
            throw ValidationError("port \(port) is not 1…65535")
        }
    }

    func run() throws {
        // The supervisor runs on a thread of its own that outlives every child (see Supervisor).
        final class Outcome: @unchecked Sendable { var code: Int32 = 1 }  // written before `done` is signalled
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            outcome.code = supervise()
            done.signal()
        }
        thread.stackSize = 8 << 20
        thread.start()
        done.wait()
        if outcome.code != 0 { throw ExitCode(outcome.code) }
    }

    private func supervise() -> Int32 {
        let host = "127.0.0.1"
        let plan: MeshPlan
        do {
            plan = try MeshPlan(command: self, host: host)
        } catch {
            StandardStream.write(2, "talkmesh up: \(error)\n")
            return 1
        }
        let supervisor = Supervisor(names: plan.children.map(\.name), colour: isatty(1) == 1, quietLogs: quiet)
        supervisor.catchSignals()
        for child in plan.children {
            do {
                try supervisor.start(child)
            } catch {
                supervisor.say("\(error)")
                supervisor.stopAll(grace: 20)
                return 1
            }
        }
        // Ready when every /readyz answers 200; a child that ends first is the failure to report.
        let deadline = DispatchTime.now() + readyTimeout
        var waiting = plan.children
        while !waiting.isEmpty {
            switch supervisor.next(until: .now() + 0.1) {
            case .exited(let name, let status)?:
                return failed(supervisor, name: name, status: status)
            case .signal?:
                supervisor.say("stopping")
                supervisor.stopAll(grace: 20)
                return 0
            case nil:
                waiting.removeAll { Readiness.ready($0.readyURL) }
                if DispatchTime.now() > deadline {
                    supervisor.say("not serving after \(Int(readyTimeout)) s: \(waiting.map(\.name).joined(separator: ", "))")
                    supervisor.stopAll(grace: 20)
                    return 1
                }
            }
        }
        supervisor.say("""
            ready
              Gateway   http://\(host):\(gatewayPort)  (OpenAPI: /openapi.json)
              API key   \(plan.apiKey)  (also in \(plan.dataDir)/dev-api-key)
              data      \(plan.dataDir)
              RunPod    \(runpod ? "the real endpoint \(ProcessEnvironment.current()["RUNPOD_ENDPOINT_ID"] ?? "")" : "the emulator on port \(emulatorPort)")
            try: talkmesh submit --image face.png --audio speech.wav -o out.mp4
            Ctrl-C stops everything.
            """)
        while true {
            switch supervisor.next() {
            case .exited(let name, let status)?:
                return failed(supervisor, name: name, status: status)
            case .signal?, nil:
                supervisor.say("stopping")
                supervisor.stopAll(grace: 20)
                supervisor.say("stopped")
                return 0
            }
        }
    }

    private func failed(_ supervisor: Supervisor, name: String, status: Int32) -> Int32 {
        let how = status > 128 ? "was killed by signal \(status - 128)" : "exited with status \(status)"
        var report = "\(name) \(how); its last lines:"
        for line in supervisor.lastLines(of: name) { report += "\n  \(line)" }
        supervisor.say(report)
        supervisor.say("stopping the others")
        supervisor.stopAll(grace: 20)
        return 1
    }
}

/// What `talkmesh up` starts, and with which settings.
struct MeshPlan {
    var children: [Supervisor.Child] = []
    var apiKey: String
    var dataDir: String

    init(command: UpCommand, host: String) throws {
        let environment = ProcessEnvironment.current()
        let binaries = command.binDir ?? MeshPlan.ownDirectory()
        try FileManager.default.createDirectory(atPath: command.dataDir + "/blobs", withIntermediateDirectories: true)
        dataDir = URL(fileURLWithPath: command.dataDir).standardizedFileURL.path
        apiKey = try MeshPlan.developmentKey(in: dataDir)
        try String("http://\(host):\(command.gatewayPort)\n").write(toFile: dataDir + "/gateway-url", atomically: true, encoding: .utf8)

        var shared = environment
        for name in ["PORT", "HOST", "LOG_FORMAT", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"] { shared[name] = nil }
        shared["HOST"] = host
        shared["LOG_FORMAT"] = environment["LOG_FORMAT"] ?? "text"
        shared["BLOB_STORE"] = "file://\(dataDir)/blobs"

        var ports: [Int] = []
        func child(_ name: String, _ executable: String, port: Int, arguments: [String] = [], _ settings: [String: String] = [:]) -> Supervisor.Child {
            ports.append(port)
            var env = shared.merging(settings) { $1 }
            env["PORT"] = "\(port)"
            return Supervisor.Child(name: name, executable: "\(binaries)/\(executable)", arguments: arguments, environment: env,
                                    readyURL: "http://\(host):\(port)/readyz")
        }
        func replicas(_ kind: String, count: Int, port: Int) -> ([Supervisor.Child], String) {
            let members = (0..<count).map { child(count == 1 ? kind : "\(kind)-\($0 + 1)", "talkmesh-\(kind)", port: port + 10 * $0) }
            return (members, "ipv4:" + (0..<count).map { "\(host):\(port + 10 * $0)" }.joined(separator: ","))
        }
        var runpodSettings: [String: String] = [:]
        if command.runpod {
            guard let endpoint = environment["RUNPOD_ENDPOINT_ID"], !endpoint.isEmpty,
                  let key = environment["RUNPOD_API_KEY"], !key.isEmpty else {
                throw SupervisorError("--runpod needs RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY in the environment")
            }
        } else {
            children.append(child("runpod", "talkmesh-runpod-emulator", port: command.emulatorPort, arguments: command.emulatorArg))
            runpodSettings = ["RUNPOD_BASE_URL": "http://\(host):\(command.emulatorPort)/v2", "RUNPOD_ENDPOINT_ID": "local",
                              "RUNPOD_API_KEY": ""]
        }
        let (media, mediaAddress) = replicas("media", count: command.media, port: command.mediaPort)
        let (audio, audioAddress) = replicas("audio", count: command.audio, port: command.audioPort)
        children += media + audio
        children.append(child("dispatcher", "talkmesh-dispatcher", port: command.dispatcherPort, runpodSettings.merging([
            "JOB_STORE": "sqlite://\(dataDir)/jobs.db", "MEDIA_ADDR": mediaAddress, "AUDIO_ADDR": audioAddress,
        ]) { $1 }))
        children.append(child("gateway", "talkmesh-gateway", port: command.gatewayPort, [
            "API_KEYS_FILE": "\(dataDir)/api-keys.json", "DISPATCHER_ADDR": "\(host):\(command.dispatcherPort)",
        ]))

        if let repeated = Dictionary(grouping: ports, by: { $0 }).first(where: { $0.value.count > 1 })?.key {
            throw SupervisorError("port \(repeated) is given to two services (replica i of a service listens on its port + 10 × i)")
        }
        for child in children {
            guard access(child.executable, X_OK) == 0 else {
                throw SupervisorError("\(child.executable) is missing: build first (swift build), or give --bin-dir")
            }
        }
        for (child, port) in zip(children, ports) where !Readiness.portFree(host: host, port: port) {
            throw SupervisorError("port \(port) (\(child.name)) is in use; choose another with its --…-port flag")
        }
    }

    /// The directory of the running executable.
    static func ownDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return "." }
        return URL(fileURLWithPath: cString(buffer)).deletingLastPathComponent().path
    }

    /// The development key: read back from `dev-api-key`, or made (with its record in
    /// `api-keys.json`) the first time.
    static func developmentKey(in dataDir: String) throws -> String {
        let keyPath = dataDir + "/dev-api-key", keysPath = dataDir + "/api-keys.json"
        var keys = FileManager.default.fileExists(atPath: keysPath) ? try APIKeyFile.load(keysPath) : []
        if let stored = try? String(contentsOfFile: keyPath, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines),
           keys.contains(where: { $0.name == "development" && !$0.revoked && $0.sha256 == Digest.sha256Hex(stored) }) {
            return stored
        }
        let (secret, record) = try APIKeyFile.newKey(name: "development", rate: 100, burst: 200, jobRate: 5, jobBurst: 20, maxActiveJobs: 20)
        keys.append(record)
        try APIKeyFile.save(keys, to: keysPath)
        unlink(keyPath)
        let fd = open(keyPath, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else { throw SupervisorError("cannot write \(keyPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let line = Array((secret + "\n").utf8)
        guard write(fd, line, line.count) == line.count else { throw SupervisorError("cannot write \(keyPath)") }
        return secret
    }
}

/// Small probes `talkmesh up` needs before and while starting the mesh.
enum Readiness {
    /// Whether `GET url` answers 200 within half a second.
    static func ready(_ url: String) -> Bool {
        guard let easy = curl_easy_init() else { return false }
        defer { curl_easy_cleanup(easy) }
        _ = tm_curl_easy_setopt_str(easy, CURLOPT_URL, url)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_TIMEOUT_MS, 500)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOBODY, 1)
        guard curl_easy_perform(easy) == CURLE_OK else { return false }
        var status = 0
        _ = tm_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
        return status == 200
    }

    /// Whether nothing listens on `host:port` (a bind test, released at once).
    static func portFree(host: String, port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, host, &address.sin_addr)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }
}
