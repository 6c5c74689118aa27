import Glibc
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC

/// One JSON object per line on stdout: `ts`, `level`, `service`, `msg`, then the metadata.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    private let label: String
    private let json: Bool

    /// Creates a handler; `json: false` writes `ts level [service] msg key=value` lines instead.
    public init(label: String, json: Bool = true) {
        self.label = label
        self.json = json
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if let trace = TraceContext.current {
            merged["trace_id"] = .string(trace.traceID)
            merged["span_id"] = .string(trace.spanID)
        }
        var line: String
        if json {
            line = "{\"ts\":\"\(Self.timestamp())\",\"level\":\"\(event.level)\",\"service\":\(Self.quote(label)),\"msg\":\(Self.quote("\(event.message)"))"
            for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
                line += ",\(Self.quote(key)):\(Self.quote("\(value)"))"
            }
            line += "}\n"
        } else {
            line = "\(Self.timestamp()) \(event.level) [\(label)] \(event.message)"
            for (key, value) in merged.sorted(by: { $0.key < $1.key }) { line += " \(key)=\(value)" }
            line += "\n"
        }
        StandardStream.write(1, line)
    }

    static func timestamp() -> String {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        var time = spec.tv_sec
        var parts = tm()
        gmtime_r(&time, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
        let millis = spec.tv_nsec / 1_000_000
        let padded = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
        return "\(cString(buffer)).\(padded)Z"
    }

    /// A JSON string literal for `text`.
    public static func quote(_ text: String) -> String { JSONText.quote(text) }
}

/// Whole-line writes to stdout and stderr with write(2): one call per line, so lines from
/// different threads never interleave.
public enum StandardStream {
    /// Writes all of `text` to the file descriptor.
    public static func write(_ fd: Int32, _ text: String) {
        var bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if written <= 0 {
                if written < 0 && errno == EINTR { continue }
                return
            }
            offset += written
        }
        bytes.removeAll()
    }
}
