import ArgumentParser
import Glibc
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC

/// The settings every TalkMesh service takes: environment variables, with flags overriding them.
/// Bad values stop the process at start with a clear message and exit code 2.
public struct ServiceOptions: ParsableArguments {
    @Option(help: "Address to bind (env HOST, default 0.0.0.0).")
    var host: String?
    @Option(help: "Port to bind; 0 picks a free one (env PORT).")
    var port: String?
    @Option(help: "trace, debug, info, notice, warning, error, critical (env LOG_LEVEL, default info).")
    var logLevel: String?
    @Option(help: "json or text (env LOG_FORMAT, default json).")
    var logFormat: String?
    @Option(help: "PEM certificate chain; TLS with ALPN h2/http/1.1 when set with the key (env TLS_CERT_FILE).")
    var tlsCertFile: String?
    @Option(help: "PEM private key (env TLS_KEY_FILE).")
    var tlsKeyFile: String?
    @Option(help: "Require client certificates signed by this CA (env TLS_CLIENT_CA_FILE).")
    var tlsClientCaFile: String?
    @Option(help: "A plaintext port serving only health, for probes when the main port requires mTLS (env HEALTH_PORT).")
    var healthPort: String?
    @Option(help: "Event-loop threads; 0 = one per core (env EVENT_LOOPS, default 0).")
    var eventLoops: String?
    @Option(help: "Largest gRPC message received, bytes (env MAX_RECEIVE_MESSAGE_BYTES, default 67108864).")
    var maxReceiveMessageBytes: String?
    @Option(help: "Largest request header block, bytes (env MAX_HEADER_BYTES, default 16384).")
    var maxHeaderBytes: String?
    @Option(help: "Largest plain HTTP request body, bytes (env MAX_BODY_BYTES, default 67108864).")
    var maxBodyBytes: String?
    @Option(help: "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (env MAX_CONCURRENT_STREAMS, default 4096).")
    var maxConcurrentStreams: String?
    @Option(help: "Close connections gracefully after this age, ±10% jitter; 0 disables (env MAX_CONNECTION_AGE, default 5m).")
    var maxConnectionAge: String?
    @Option(help: "Time in-flight calls get after SIGTERM or GOAWAY (env DRAIN_TIMEOUT, default 30s).")
    var drainTimeout: String?
    @Option(help: "Close a connection with no complete preface or request by then (env HANDSHAKE_TIMEOUT, default 10s).")
    var handshakeTimeout: String?
    @Option(help: "Close a connection with no request in progress after this long; 0 disables (env IDLE_TIMEOUT, default 2m).")
    var idleTimeout: String?
    @Option(help: "Longest pause while a request body arrives: 408 / DEADLINE_EXCEEDED past it (env BODY_TIMEOUT, default 30s).")
    var bodyTimeout: String?
    @Option(help: "Request bytes one connection may have buffered before dispatch (env MAX_CONNECTION_BUFFER_BYTES, default 128 MiB).")
    var maxConnectionBufferBytes: String?

    public init() {}

    /// One row of the settings table (the README shows the same table).
    public struct Setting: Sendable {
        public let environment: String
        public let flag: String
        public let meaning: String
    }

    /// The settings, for `--help` and the README.
    public static let settings: [Setting] = [
        Setting(environment: "HOST", flag: "--host", meaning: "address to bind (default 0.0.0.0)"),
        Setting(environment: "PORT", flag: "--port", meaning: "port to bind (each service has its default)"),
        Setting(environment: "LOG_LEVEL", flag: "--log-level", meaning: "trace … critical (default info)"),
        Setting(environment: "LOG_FORMAT", flag: "--log-format", meaning: "json or text (default json)"),
        Setting(environment: "TLS_CERT_FILE", flag: "--tls-cert-file", meaning: "PEM certificate chain; with the key turns TLS on"),
        Setting(environment: "TLS_KEY_FILE", flag: "--tls-key-file", meaning: "PEM private key"),
        Setting(environment: "TLS_CLIENT_CA_FILE", flag: "--tls-client-ca-file", meaning: "require client certificates from this CA"),
        Setting(environment: "HEALTH_PORT", flag: "--health-port", meaning: "plaintext health-only port (for probes under mTLS)"),
        Setting(environment: "EVENT_LOOPS", flag: "--event-loops", meaning: "event-loop threads, 0 = one per core (default 0)"),
        Setting(environment: "MAX_RECEIVE_MESSAGE_BYTES", flag: "--max-receive-message-bytes", meaning: "largest gRPC message (default 64 MiB)"),
        Setting(environment: "MAX_HEADER_BYTES", flag: "--max-header-bytes", meaning: "largest header block (default 16 KiB)"),
        Setting(environment: "MAX_BODY_BYTES", flag: "--max-body-bytes", meaning: "largest HTTP body (default 64 MiB)"),
        Setting(environment: "MAX_CONCURRENT_STREAMS", flag: "--max-concurrent-streams", meaning: "HTTP/2 streams per connection (default 4096)"),
        Setting(environment: "MAX_CONNECTION_AGE", flag: "--max-connection-age", meaning: "graceful reconnect age, 0 = never (default 5m)"),
        Setting(environment: "DRAIN_TIMEOUT", flag: "--drain-timeout", meaning: "grace for in-flight calls on shutdown (default 30s)"),
        Setting(environment: "HANDSHAKE_TIMEOUT", flag: "--handshake-timeout", meaning: "deadline for a connection's first request (default 10s)"),
        Setting(environment: "IDLE_TIMEOUT", flag: "--idle-timeout", meaning: "close connections with no request in progress, 0 = never (default 2m)"),
        Setting(environment: "BODY_TIMEOUT", flag: "--body-timeout", meaning: "longest pause while a request body arrives (default 30s)"),
        Setting(environment: "MAX_CONNECTION_BUFFER_BYTES", flag: "--max-connection-buffer-bytes", meaning: "request bytes one connection may buffer before dispatch (default 128 MiB)"),
    ]

    /// The resolved settings.
    public struct Resolved: Sendable {
        public var server: RPCServer.Configuration
        public var logLevel: String
        public var logFormat: String
    }

    /// A setting with a bad value.
    public struct InvalidSetting: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// Merges flags over the environment over the defaults and validates them all.
    public func resolve(serviceName: String, defaultPort: Int,
                        environment: [String: String] = ProcessEnvironment.current()) throws(InvalidSetting) -> Resolved {
        let reader = SettingsReader(environment: environment)
        func pick(_ flag: String?, _ key: String) -> (String, String)? {
            reader.string(flag, key).map { ($0, key) }
        }
        func integer(_ flag: String?, _ key: String, _ fallback: Int, _ range: ClosedRange<Int>) throws(InvalidSetting) -> Int {
            try reader.integer(flag, key, fallback, range)
        }
        func duration(_ flag: String?, _ key: String, _ fallback: Int64) throws(InvalidSetting) -> Int64 {
            try reader.duration(flag, key, fallback)
        }
        var server = RPCServer.Configuration()
        server.serviceName = serviceName
        server.host = pick(host, "HOST")?.0 ?? "0.0.0.0"
        server.port = try integer(port, "PORT", defaultPort, 0...65535)
        server.eventLoops = try integer(eventLoops, "EVENT_LOOPS", 0, 0...256)
        if pick(healthPort, "HEALTH_PORT") != nil {
            server.healthPort = try integer(healthPort, "HEALTH_PORT", 0, 0...65535)
        }
        server.maxReceiveMessageBytes = try integer(maxReceiveMessageBytes, "MAX_RECEIVE_MESSAGE_BYTES", 64 << 20, 1...(1 << 31 - 1))
        server.maxHeaderBytes = try integer(maxHeaderBytes, "MAX_HEADER_BYTES", 16 << 10, 1024...(1 << 24))
        server.maxBodyBytes = try integer(maxBodyBytes, "MAX_BODY_BYTES", 64 << 20, 0...(1 << 40))
        server.maxConcurrentStreams = try integer(maxConcurrentStreams, "MAX_CONCURRENT_STREAMS", 4096, 1...(1 << 31 - 1))
        server.maxConnectionAgeNanoseconds = try duration(maxConnectionAge, "MAX_CONNECTION_AGE", 300_000_000_000)
        server.drainTimeoutNanoseconds = try duration(drainTimeout, "DRAIN_TIMEOUT", 30_000_000_000)
        server.handshakeTimeoutNanoseconds = try duration(handshakeTimeout, "HANDSHAKE_TIMEOUT", 10_000_000_000)
        if server.handshakeTimeoutNanoseconds <= 0 {
            throw InvalidSetting(description: "HANDSHAKE_TIMEOUT must be positive")
        }
        server.idleTimeoutNanoseconds = try duration(idleTimeout, "IDLE_TIMEOUT", 120_000_000_000)
        server.bodyTimeoutNanoseconds = try duration(bodyTimeout, "BODY_TIMEOUT", 30_000_000_000)
        if server.bodyTimeoutNanoseconds <= 0 {
            throw InvalidSetting(description: "BODY_TIMEOUT must be positive")
        }
        let largestRequest = max(server.maxBodyBytes, server.maxReceiveMessageBytes + 5)
        server.maxConnectionBufferBytes = try integer(maxConnectionBufferBytes, "MAX_CONNECTION_BUFFER_BYTES", max(128 << 20, largestRequest),
                                                      0...(1 << 42))
        if server.maxConnectionBufferBytes < largestRequest {
            throw InvalidSetting(description: "MAX_CONNECTION_BUFFER_BYTES must hold the largest request (MAX_BODY_BYTES and MAX_RECEIVE_MESSAGE_BYTES + 5): at least \(largestRequest)")
        }
        let certificate = pick(tlsCertFile, "TLS_CERT_FILE")?.0
        let key = pick(tlsKeyFile, "TLS_KEY_FILE")?.0
        if (certificate == nil) != (key == nil) {
            throw InvalidSetting(description: "TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        }
        let clientCA = pick(tlsClientCaFile, "TLS_CLIENT_CA_FILE")?.0
        if clientCA != nil && certificate == nil {
            throw InvalidSetting(description: "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        }
        for file in [certificate, key, clientCA].compactMap({ $0 }) where access(file, R_OK) != 0 {
            throw InvalidSetting(description: "cannot read \(file): \(String(cString: strerror(errno)))")
        }
        server.tlsCertificateFile = certificate
        server.tlsKeyFile = key
        server.tlsClientCAFile = clientCA
        let level = pick(logLevel, "LOG_LEVEL")?.0.lowercased() ?? "info"
        guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(level) else {
            throw InvalidSetting(description: "LOG_LEVEL=\(level): expected trace, debug, info, notice, warning, error or critical")
        }
        let format = pick(logFormat, "LOG_FORMAT")?.0.lowercased() ?? "json"
        guard ["json", "text"].contains(format) else {
            throw InvalidSetting(description: "LOG_FORMAT=\(format): expected json or text")
        }
        return Resolved(server: server, logLevel: level, logFormat: format)
    }
}

/// Durations in settings: a number and a unit (ns, us, ms, s, m, h); a bare number is seconds.
public enum DurationSetting {
    /// Nanoseconds, or nil when malformed or negative.
    public static func parseNanoseconds(_ text: String) -> Int64? {
        let trimmed = text.trimmingWhitespace
        let units: [(String, Double)] = [("ns", 1), ("us", 1e3), ("ms", 1e6), ("s", 1e9), ("m", 60e9), ("h", 3600e9)]
        for (suffix, scale) in units.sorted(by: { $0.0.count > $1.0.count }) where trimmed.hasSuffix(suffix) {
            guard let value = Double(trimmed.dropLast(suffix.count)) else { return nil }
            return nanoseconds(value * scale)
        }
        guard let seconds = Double(trimmed) else { return nil }
        return nanoseconds(seconds * 1e9)
    }

    /// Nil for a negative, non-finite or unrepresentable (over ~292 years) duration: a conversion
    /// that would trap is refused instead.
    private static func nanoseconds(_ value: Double) -> Int64? {
        guard value.isFinite, value >= 0, value < 9.2e18 else { return nil }
        return Int64(value)
    }
}

/// The process environment as a dictionary.
public enum ProcessEnvironment {
    public static func current() -> [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let text = String(cString: entry)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }
}
