import Glibc
import TalkMeshBase
import TalkMeshRPC

/// The settings every TalkMesh service takes, declared once: the bind address, TLS, logging, and
/// the runtime's limits and timeouts.
extension Setting {
    /// The longest duration a setting takes (about 100 years, the runtime's longest wait).
    public static let longest = Duration.seconds(100 * 365 * 86_400)
    public static let host = Setting("HOST", default: "0.0.0.0", help: "address to bind")
    public static let port = Setting("PORT", .integer(0...65535), default: "0", help: "port to bind (0 picks a free one)")
    public static let logLevel = Setting("LOG_LEVEL", .choice(["trace", "debug", "info", "notice", "warning", "error", "critical"]),
                                         default: "info", help: "`trace` … `critical`")
    public static let logFormat = Setting("LOG_FORMAT", .choice(["json", "text"]), default: "json",
                                          help: "`json` (one object per line on stdout) or `text`")
    public static let tlsCertFile = Setting("TLS_CERT_FILE", help: "PEM certificate chain; with the key: TLS 1.2+ with ALPN `h2`, `http/1.1`")
    public static let tlsKeyFile = Setting("TLS_KEY_FILE", help: "PEM private key")
    public static let tlsClientCAFile = Setting("TLS_CLIENT_CA_FILE", help: "require client certificates from this CA (mutual TLS)")
    public static let healthPort = Setting("HEALTH_PORT", .integer(0...65535),
                                           help: "a plaintext port serving only health and metrics, for probes when the main port requires mTLS")
    public static let eventLoops = Setting("EVENT_LOOPS", .integer(0...256), default: "0", help: "event-loop threads, 0 = one per core")
    public static let maxReceiveMessageBytes = Setting("MAX_RECEIVE_MESSAGE_BYTES", .integer(1...(1 << 31 - 1)), default: "\(64 << 20)",
                                                       shown: "64 MiB", help: "largest gRPC message; past it `RESOURCE_EXHAUSTED`")
    public static let maxHeaderBytes = Setting("MAX_HEADER_BYTES", .integer(1024...(1 << 24)), default: "\(16 << 10)", shown: "16 KiB",
                                               help: "largest request head; past it 431 (HTTP/1.1) or a stream reset (HTTP/2)")
    public static let maxBodyBytes = Setting("MAX_BODY_BYTES", .integer(0...(1 << 40)), default: "\(64 << 20)", shown: "64 MiB",
                                             help: "largest plain HTTP body (routes may declare their own); past it 413")
    public static let maxConcurrentStreams = Setting("MAX_CONCURRENT_STREAMS", .integer(1...(1 << 31 - 1)), default: "4096",
                                                     help: "HTTP/2 streams per connection")
    public static let maxConnectionAge = Setting("MAX_CONNECTION_AGE", .duration(.zero ... Setting.longest), default: "5m",
                                                 help: "graceful GOAWAY after this age ±10 % (new replicas get traffic); `0` = never")
    public static let drainTimeout = Setting("DRAIN_TIMEOUT", .duration(.zero ... Setting.longest), default: "30s",
                                             help: "grace for calls in flight after SIGTERM or GOAWAY")
    public static let handshakeTimeout = Setting("HANDSHAKE_TIMEOUT", .duration(.nanoseconds(1) ... Setting.longest), default: "10s",
                                                 help: "a connection must send its preface / request head within this")
    public static let idleTimeout = Setting("IDLE_TIMEOUT", .duration(.zero ... Setting.longest), default: "2m",
                                            help: "a connection with no request in progress is closed after this; keepalive PINGs do not count; `0` = never")
    public static let bodyTimeout = Setting("BODY_TIMEOUT", .duration(.nanoseconds(1) ... Setting.longest), default: "30s",
                                            help: "the longest pause while a request body arrives; past it 408 or `DEADLINE_EXCEEDED`")
    public static let maxConnectionBufferBytes = Setting("MAX_CONNECTION_BUFFER_BYTES", .integer(0...(1 << 42)), shown: "128 MiB",
                                                         help: "request bytes one connection may hold before dispatch (at least the largest request); past it 503 / `RESOURCE_EXHAUSTED`")
}

/// The shared table and what it resolves to.
public enum ServiceSettings {
    /// The settings of every service, `PORT` defaulting to the service's own port.
    public static func common(defaultPort: Int) -> [Setting] {
        [.host, .port.defaulting(to: String(defaultPort)), .logLevel, .logFormat, .tlsCertFile, .tlsKeyFile, .tlsClientCAFile, .healthPort,
         .eventLoops, .maxReceiveMessageBytes, .maxHeaderBytes, .maxBodyBytes, .maxConcurrentStreams, .maxConnectionAge, .drainTimeout,
         .handshakeTimeout, .idleTimeout, .bodyTimeout, .maxConnectionBufferBytes]
    }

    /// The resolved settings.
    public struct Resolved: Sendable {
        public var server: RPCServer.Configuration
        public var logLevel: String
        public var logFormat: String
    }

    /// The runtime's configuration from the shared settings, with the checks that span several.
    public static func resolve(_ settings: Settings, serviceName: String) throws(InvalidSetting) -> Resolved {
        var server = RPCServer.Configuration()
        server.serviceName = serviceName
        server.host = try settings.string(.host) ?? "0.0.0.0"
        server.port = try settings.integer(.port)
        server.eventLoops = try settings.integer(.eventLoops)
        if settings.isSet(.healthPort) { server.healthPort = try settings.integer(.healthPort) }
        server.maxReceiveMessageBytes = try settings.integer(.maxReceiveMessageBytes)
        server.maxHeaderBytes = try settings.integer(.maxHeaderBytes)
        server.maxBodyBytes = try settings.integer(.maxBodyBytes)
        server.maxConcurrentStreams = try settings.integer(.maxConcurrentStreams)
        server.maxConnectionAgeNanoseconds = try settings.duration(.maxConnectionAge).nanosecondsClamped
        server.drainTimeoutNanoseconds = try settings.duration(.drainTimeout).nanosecondsClamped
        server.handshakeTimeoutNanoseconds = try settings.duration(.handshakeTimeout).nanosecondsClamped
        server.idleTimeoutNanoseconds = try settings.duration(.idleTimeout).nanosecondsClamped
        server.bodyTimeoutNanoseconds = try settings.duration(.bodyTimeout).nanosecondsClamped
        let largestRequest = max(server.maxBodyBytes, server.maxReceiveMessageBytes + 5)
        server.maxConnectionBufferBytes = settings.isSet(.maxConnectionBufferBytes)
            ? try settings.integer(.maxConnectionBufferBytes) : max(128 << 20, largestRequest)
        if server.maxConnectionBufferBytes < largestRequest {
            throw InvalidSetting(description: "MAX_CONNECTION_BUFFER_BYTES must hold the largest request (MAX_BODY_BYTES and MAX_RECEIVE_MESSAGE_BYTES + 5): at least \(largestRequest)")
        }
        let certificate = try settings.string(.tlsCertFile)
        let key = try settings.string(.tlsKeyFile)
        if (certificate == nil) != (key == nil) {
            throw InvalidSetting(description: "TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        }
        let clientCA = try settings.string(.tlsClientCAFile)
        if clientCA != nil && certificate == nil {
            throw InvalidSetting(description: "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        }
        for file in [certificate, key, clientCA].compactMap({ $0 }) where access(file, R_OK) != 0 {
            throw InvalidSetting(description: "cannot read \(file): \(String(cString: strerror(errno)))")
        }
        server.tlsCertificateFile = certificate
        server.tlsKeyFile = key
        server.tlsClientCAFile = clientCA
        return Resolved(server: server, logLevel: try settings.string(.logLevel) ?? "info", logFormat: try settings.string(.logFormat) ?? "json")
    }
}
