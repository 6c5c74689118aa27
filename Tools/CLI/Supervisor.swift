import CTalkMesh
import Foundation
import TalkMeshService

/// Runs child processes, prefixes their output, and reports the first one that ends.
///
/// Everything that spawns runs on the one thread that calls `run`: a child's parent-death signal
/// is tied to the thread that forked it, and this thread lives as long as the children may.
final class Supervisor: @unchecked Sendable {
    struct Child {
        var name: String
        var executable: String
        var arguments: [String]
        var environment: [String: String]
        /// Where `/readyz` answers once the child serves.
        var readyURL: String
    }

    enum Event {
        case exited(name: String, status: Int32)
        case signal(Int32)
    }

    private final class Running: @unchecked Sendable {  // fields behind Supervisor.lock
        let child: Child
        let pid: pid_t
        var lastLines: [String] = []
        var exitStatus: Int32?

        init(child: Child, pid: pid_t) {
            self.child = child
            self.pid = pid
        }
    }

    private let lock = NSLock()
    private let wake = DispatchSemaphore(value: 0)
    private var events: [Event] = []
    private var running: [Running] = []
    private let colour: Bool
    private let width: Int
    private let quietLogs: Bool
    private var signalSources: [DispatchSourceSignal] = []
    static let keptLines = 20

    init(names: [String], colour: Bool, quietLogs: Bool) {
        self.colour = colour
        self.quietLogs = quietLogs
        width = max(names.map(\.count).max() ?? 0, 2)
    }

    /// SIGINT and SIGTERM become events instead of ending the process.
    func catchSignals() {
        for signo in [SIGINT, SIGTERM] {
            signal(signo, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signo, queue: .global())
            source.setEventHandler { [weak self] in self?.post(.signal(signo)) }
            source.resume()
            signalSources.append(source)
        }
    }

    /// Starts `child`, its output read by a thread of its own.
    func start(_ child: Child) throws {
        var pipe: [Int32] = [0, 0]
        // Close-on-exec, so no child holds another's pipe open (only this thread forks).
        guard Glibc.pipe(&pipe) == 0 else { throw SupervisorError("pipe: \(String(cString: strerror(errno)))") }
        _ = fcntl(pipe[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(pipe[1], F_SETFD, FD_CLOEXEC)
        let argv = ([child.executable] + child.arguments).map { strdup($0) } + [nil]
        let envp = child.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        let pid = tm_spawn_supervised(child.executable, argv, envp, pipe[1])
        close(pipe[1])
        guard pid > 0 else {
            close(pipe[0])
            throw SupervisorError("cannot start \(child.name): \(String(cString: strerror(errno)))")
        }
        let entry = Running(child: child, pid: pid)
        lock.withLock { running.append(entry) }
        let readEnd = pipe[0]
        let reader = Thread { [self] in readOutput(of: entry, from: readEnd) }
        reader.name = "output of \(child.name)"
        reader.start()
    }

    /// Waits for the next event, or until `deadline` (then nil).
    func next(until deadline: DispatchTime = .distantFuture) -> Event? {
        while true {
            if let event = lock.withLock({ events.isEmpty ? nil : events.removeFirst() }) { return event }
            if wake.wait(timeout: deadline) == .timedOut { return nil }
        }
    }

    /// The last lines `name` wrote.
    func lastLines(of name: String) -> [String] {
        lock.withLock { running.first { $0.child.name == name }?.lastLines ?? [] }
    }

    /// Stops the children in reverse start order: SIGTERM, then SIGKILL after `grace` seconds.
    func stopAll(grace: Double) {
        for entry in lock.withLock({ running.reversed() }) where lock.withLock({ entry.exitStatus == nil }) {
            kill(entry.pid, SIGTERM)
            let deadline = Date().addingTimeInterval(grace)
            while lock.withLock({ entry.exitStatus == nil }) && Date() < deadline { usleep(20_000) }
            if lock.withLock({ entry.exitStatus == nil }) {
                say("\(entry.child.name) did not stop within \(Int(grace)) s; killing it")
                kill(entry.pid, SIGKILL)
                while lock.withLock({ entry.exitStatus == nil }) { usleep(20_000) }
            }
        }
    }

    /// A line of the supervisor's own, on stderr.
    func say(_ text: String) {
        lock.withLock { StandardStream.write(2, "talkmesh up: \(text)\n") }
    }

    private func post(_ event: Event) {
        lock.withLock { events.append(event) }
        wake.signal()
    }

    private func readOutput(of entry: Running, from fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 16 << 10)
        var pending: [UInt8] = []
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            pending.append(contentsOf: buffer[..<count])
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                emit(String(decoding: pending[..<newline], as: UTF8.self), from: entry)
                pending.removeSubrange(...newline)
            }
            if pending.count > 64 << 10 {  // a line that never ends is shown in pieces
                emit(String(decoding: pending, as: UTF8.self), from: entry)
                pending.removeAll()
            }
        }
        if !pending.isEmpty { emit(String(decoding: pending, as: UTF8.self), from: entry) }
        close(fd)
        var status: Int32 = 0
        while waitpid(entry.pid, &status, 0) < 0 && errno == EINTR {}
        let code = tm_wifexited(status) != 0 ? tm_wexitstatus(status) : 128 + tm_wtermsig(status)
        lock.withLock { entry.exitStatus = code }
        post(.exited(name: entry.child.name, status: code))
    }

    private func emit(_ line: String, from entry: Running) {
        let name = entry.child.name
        let padded = name + String(repeating: " ", count: max(0, width - name.count))
        let prefix = colour ? "\u{1B}[\(Self.colourCode(name))m\(padded) |\u{1B}[0m " : "\(padded) | "
        lock.withLock {
            entry.lastLines.append(line)
            if entry.lastLines.count > Self.keptLines { entry.lastLines.removeFirst() }
            if !quietLogs { StandardStream.write(1, prefix + line + "\n") }
        }
    }

    /// One of six colours, fixed per service kind (every media replica shares one).
    private static func colourCode(_ name: String) -> Int {
        let kind = name.split(separator: "-").first.map(String.init) ?? name
        let codes = ["gateway": 36, "dispatcher": 35, "media": 32, "audio": 33, "runpod": 34]
        return codes[kind] ?? 37
    }
}

struct SupervisorError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
