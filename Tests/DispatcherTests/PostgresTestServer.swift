import Foundation
import Glibc

/// A real PostgreSQL server for the tests of the PostgreSQL adapter: `initdb` into a scratch
/// directory and `postgres` on a free loopback port, as the `postgres` user when the tests run as
/// root (PostgreSQL refuses root). One server per test process; each test takes a database of its
/// own. The server is stopped when the process exits, or within a second of its death when it is
/// killed. scripts/bootstrap installs it.
final class PostgresTestServer: Sendable {
    let port: Int
    let directory: String
    private let binaries: String

    /// The process's one server, started on first use.
    static let shared: Result<PostgresTestServer, any Error> = Result { try PostgresTestServer() }

    private init() throws {
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? []
        guard let version = versions.compactMap(Int.init).max() else {
            throw TestServerError("PostgreSQL server binaries not found under /usr/lib/postgresql: run scripts/bootstrap")
        }
        binaries = "/usr/lib/postgresql/\(version)/bin"
        directory = NSTemporaryDirectory() + "talkmesh-pg-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var prefix: [String] = []
        if geteuid() == 0, let user = getpwnam("postgres") {
            chown(directory, user.pointee.pw_uid, user.pointee.pw_gid)
            prefix = ["/usr/bin/setpriv", "--reuid=\(user.pointee.pw_uid)", "--regid=\(user.pointee.pw_gid)", "--init-groups"]
        }
        try Self.run(prefix + ["\(binaries)/initdb", "-D", "\(directory)/data", "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        port = Self.freePort()
        let server = Process()
        // Under the watchdog shell the Python tests use too (Tests/Integration/pgwatchdog.sh): it
        // stops the server and removes its directory once this test process is gone, however it
        // ended. `atexit` below covers only a normal exit, and a parent-death signal would fire
        // when the thread that spawned it ends, not the process.
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Integration/pgwatchdog.sh")
        let watchdog = try String(contentsOf: script, encoding: .utf8)
        let command = prefix + ["/bin/sh", "-c", watchdog, "talkmesh-pg-watchdog", "\(getpid())", directory,
                                "\(binaries)/postgres", "-D", "\(directory)/data", "-p", "\(port)", "-k", directory,
                                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
        server.executableURL = URL(fileURLWithPath: command[0])
        server.arguments = Array(command.dropFirst())
        server.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        server.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try server.run()
        serverPID = server.processIdentifier
        serverDirectory = directory
        atexit {
            kill(serverPID, SIGINT)
            var status: Int32 = 0
            waitpid(serverPID, &status, 0)
            try? FileManager.default.removeItem(atPath: serverDirectory)
        }
        let deadline = Date().addingTimeInterval(30)
        while (try? Self.run(["\(binaries)/pg_isready", "-h", "127.0.0.1", "-p", "\(port)", "-q"])) == nil {
            guard Date() < deadline, server.isRunning else { throw TestServerError("PostgreSQL did not start") }
            usleep(100_000)
        }
    }

    /// A fresh database; its URL.
    func newDatabase() throws -> String {
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(12).lowercased()
        try Self.run(["\(binaries)/psql", "-h", "127.0.0.1", "-p", "\(port)", "-U", "postgres", "-q", "-c", "CREATE DATABASE \(name)"])
        return "postgres://postgres@127.0.0.1:\(port)/\(name)"
    }

    private static func run(_ command: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw TestServerError("\(command.joined(separator: " ")) exited \(process.terminationStatus)") }
    }

    private static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

nonisolated(unsafe) private var serverPID: pid_t = 0
nonisolated(unsafe) private var serverDirectory = ""

struct TestServerError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
