import Glibc
import TalkMeshBase

/// The process's own figures in Prometheus's standard names (`process_*`, as every client library
/// exports them, so the usual dashboards and alerts work) and each event loop's lag, read from
/// `/proc/self` at scrape time: nothing is kept between scrapes.
enum ProcessMetrics {
    static func render(loops: [EventLoop]) -> String {
        var out = ""
        func gauge(_ name: String, _ help: String, _ value: String, kind: String = "gauge") {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(kind)\n\(name) \(value)\n"
        }
        let page = Double(sysconf(Int32(_SC_PAGESIZE)))
        if let stat = readStat() {
            gauge("process_cpu_seconds_total", "User and system CPU time, in seconds.", String((stat.utime + stat.stime) / ticks), kind: "counter")
            gauge("process_resident_memory_bytes", "Resident memory, in bytes.", String(Int64(stat.rss * page)))
            gauge("process_virtual_memory_bytes", "Virtual memory, in bytes.", String(Int64(stat.vsize)))
        }
        if let startTime {
            gauge("process_start_time_seconds", "When the process started, in seconds since the Unix epoch.", String(startTime))
        }
        gauge("process_open_fds", "Open file descriptors.", String(openDescriptors()))
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            gauge("process_max_fds", "The limit on open file descriptors.", String(limit.rlim_cur))
        }
        let received = loops.reduce(0) { $0 + $1.bytesReceived.load(ordering: .relaxed) }
        let sent = loops.reduce(0) { $0 + $1.bytesSent.load(ordering: .relaxed) }
        out += "# HELP talkmesh_server_received_bytes_total Bytes read from clients (every protocol, TLS records decrypted).\n"
        out += "# TYPE talkmesh_server_received_bytes_total counter\ntalkmesh_server_received_bytes_total \(received)\n"
        out += "# HELP talkmesh_server_sent_bytes_total Bytes written to clients (every protocol, before TLS).\n"
        out += "# TYPE talkmesh_server_sent_bytes_total counter\ntalkmesh_server_sent_bytes_total \(sent)\n"
        out += "# HELP talkmesh_server_requests_in_flight Requests being handled now, by protocol.\n"
        out += "# TYPE talkmesh_server_requests_in_flight gauge\n"
        out += "talkmesh_server_requests_in_flight{protocol=\"grpc\"} \(loops.reduce(0) { $0 + $1.grpcInFlight.load(ordering: .relaxed) })\n"
        out += "talkmesh_server_requests_in_flight{protocol=\"http\"} \(loops.reduce(0) { $0 + $1.httpInFlight.load(ordering: .relaxed) })\n"
        out += "# HELP talkmesh_event_loop_lag_seconds How late the loop's last one-second housekeeping tick ran: the time a ready event waits.\n"
        out += "# TYPE talkmesh_event_loop_lag_seconds gauge\n"
        for loop in loops { out += "talkmesh_event_loop_lag_seconds{loop=\"\(loop.index)\"} \(Double(loop.lagNanoseconds.load(ordering: .relaxed)) / 1e9)\n" }
        out += "# HELP talkmesh_event_loop_connections Connections the loop owns: a new one goes to the loop with the fewest.\n"
        out += "# TYPE talkmesh_event_loop_connections gauge\n"
        for loop in loops { out += "talkmesh_event_loop_connections{loop=\"\(loop.index)\"} \(loop.openConnections.load(ordering: .relaxed))\n" }
        out += "# HELP talkmesh_event_loop_lag_max_seconds The latest any housekeeping tick of the loop ran since start.\n"
        out += "# TYPE talkmesh_event_loop_lag_max_seconds gauge\n"
        for loop in loops { out += "talkmesh_event_loop_lag_max_seconds{loop=\"\(loop.index)\"} \(Double(loop.maxLagNanoseconds.load(ordering: .relaxed)) / 1e9)\n" }
        return out
    }

    private static let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))

    /// When the process started (seconds since the epoch): the boot time plus the process's start
    /// in clock ticks after it, both fixed, so read once.
    private static let startTime: Double? = {
        guard let stat = readStat(), let boot = bootTime() else { return nil }
        return boot + stat.starttime / ticks
    }()

    /// utime, stime, starttime (ticks), vsize (bytes), rss (pages) from /proc/self/stat.
    private static func readStat() -> (utime: Double, stime: Double, starttime: Double, vsize: Double, rss: Double)? {
        guard let text = readFile("/proc/self/stat"), let close = text.lastIndex(of: ")") else { return nil }
        // After the command name in parentheses: fields 3 onwards, so field n is at n - 3.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 21, let utime = Double(fields[11]), let stime = Double(fields[12]),
              let start = Double(fields[19]), let vsize = Double(fields[20]), let rss = Double(fields[21]) else { return nil }
        return (utime, stime, start, vsize, rss)
    }

    private static func bootTime() -> Double? {
        guard let text = readFile("/proc/stat") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") { return Double(line.dropFirst(6)) }
        return nil
    }

    private static func openDescriptors() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while readdir(directory) != nil { count += 1 }
        return max(0, count - 3)  // ".", ".." and the descriptor of the listing itself
    }

    private static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(fd, &buffer, buffer.count)
            guard count > 0 else { break }
            bytes += buffer[0..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Loops made after the route that reports them: set once, by `bind()`, before any request.
final class LoopList: Sendable {
    private let list = Locked<[EventLoop]>([])
    var loops: [EventLoop] { list.withLock { $0 } }
    func set(_ loops: [EventLoop]) { list.withLock { $0 = loops } }
}
