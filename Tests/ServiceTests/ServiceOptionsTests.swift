import Testing
import TalkMeshService

@Suite("Service settings")
struct ServiceOptionsTests {
    @Test("defaults, environment, and flags over the environment")
    func precedence() throws {
        let defaults = try ServiceOptions.parse([]).resolve(serviceName: "svc", defaultPort: 50051, environment: [:])
        #expect(defaults.server.port == 50051)
        #expect(defaults.server.host == "0.0.0.0")
        #expect(defaults.server.maxReceiveMessageBytes == 64 << 20)
        #expect(defaults.server.maxConnectionAgeNanoseconds == 300_000_000_000)
        #expect(defaults.logFormat == "json")

        let environment = ["PORT": "9000", "LOG_FORMAT": "text", "DRAIN_TIMEOUT": "1.5s", "MAX_CONNECTION_AGE": "0"]
        let fromEnvironment = try ServiceOptions.parse([]).resolve(serviceName: "svc", defaultPort: 1, environment: environment)
        #expect(fromEnvironment.server.port == 9000)
        #expect(fromEnvironment.logFormat == "text")
        #expect(fromEnvironment.server.drainTimeoutNanoseconds == 1_500_000_000)
        #expect(fromEnvironment.server.maxConnectionAgeNanoseconds == 0)

        let flagged = try ServiceOptions.parse(["--port", "9100", "--log-format", "json"])
            .resolve(serviceName: "svc", defaultPort: 1, environment: environment)
        #expect(flagged.server.port == 9100)
        #expect(flagged.logFormat == "json")
    }

    @Test("bad values name the setting", arguments: [
        (["PORT": "65536"], "PORT=65536"),
        (["EVENT_LOOPS": "-1"], "EVENT_LOOPS=-1"),
        (["HANDSHAKE_TIMEOUT": "0s"], "HANDSHAKE_TIMEOUT"),
        (["TLS_KEY_FILE": "/k"], "TLS_CERT_FILE and TLS_KEY_FILE"),
        (["TLS_CLIENT_CA_FILE": "/ca"], "TLS_CLIENT_CA_FILE"),
        (["LOG_LEVEL": "verbose"], "LOG_LEVEL=verbose"),
    ])
    func invalid(environment: [String: String], fragment: String) throws {
        let options = try ServiceOptions.parse([])
        do {
            _ = try options.resolve(serviceName: "svc", defaultPort: 1, environment: environment)
            Issue.record("expected \(fragment) to be rejected")
        } catch {
            #expect(error.description.contains(fragment))
        }
    }

    @Test("durations", arguments: [("500ms", Int64(500_000_000)), ("2s", 2_000_000_000), ("5m", 300_000_000_000),
                                   ("1h", 3_600_000_000_000), ("250us", 250_000), ("7", 7_000_000_000), ("10ns", 10)])
    func durations(text: String, nanoseconds: Int64) {
        #expect(DurationSetting.parseNanoseconds(text) == nanoseconds)
    }

    @Test("malformed or unrepresentable durations", arguments: ["", "fast", "-1s", "1d", "ms", "1e300h", "inf", "nan", "99999999999h", "1e19"])
    func badDurations(text: String) {
        #expect(DurationSetting.parseNanoseconds(text) == nil)
    }
}
