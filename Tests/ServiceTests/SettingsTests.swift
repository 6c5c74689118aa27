import Testing
import TalkMeshService

@Suite("Service settings")
struct SettingsTests {
    let table = ServiceSettings.common(defaultPort: 50051) + [.workers, .maxAudioSec]

    func resolve(_ arguments: [String] = [], _ environment: [String: String] = [:]) throws -> ServiceSettings.Resolved {
        guard case .run(let flags) = try Settings.parse(arguments, table: table) else { throw InvalidSetting(description: "not a run") }
        return try ServiceSettings.resolve(Settings(table: table, flags: flags, environment: environment), serviceName: "svc")
    }

    @Test("defaults, environment, and flags over the environment")
    func precedence() throws {
        let defaults = try resolve()
        #expect(defaults.server.port == 50051)
        #expect(defaults.server.host == "0.0.0.0")
        #expect(defaults.server.maxReceiveMessageBytes == 64 << 20)
        #expect(defaults.server.maxConnectionAgeNanoseconds == 300_000_000_000)
        #expect(defaults.server.maxConnectionBufferBytes == 128 << 20)
        #expect(defaults.logFormat == "json")

        let environment = ["PORT": "9000", "LOG_FORMAT": "TEXT", "DRAIN_TIMEOUT": "1.5s", "MAX_CONNECTION_AGE": "0"]
        let fromEnvironment = try resolve([], environment)
        #expect(fromEnvironment.server.port == 9000)
        #expect(fromEnvironment.logFormat == "text")
        #expect(fromEnvironment.server.drainTimeoutNanoseconds == 1_500_000_000)
        #expect(fromEnvironment.server.maxConnectionAgeNanoseconds == 0)

        let flagged = try resolve(["--port", "9100", "--log-format=json"], environment)
        #expect(flagged.server.port == 9100)
        #expect(flagged.logFormat == "json")
    }

    @Test("bad values name the setting", arguments: [
        (["PORT": "65536"], "PORT=65536"),
        (["EVENT_LOOPS": "-1"], "EVENT_LOOPS=-1"),
        (["HANDSHAKE_TIMEOUT": "0s"], "HANDSHAKE_TIMEOUT=0s"),
        (["TLS_KEY_FILE": "/k"], "TLS_CERT_FILE and TLS_KEY_FILE"),
        (["TLS_CLIENT_CA_FILE": "/ca"], "TLS_CLIENT_CA_FILE"),
        (["LOG_LEVEL": "verbose"], "LOG_LEVEL=verbose"),
        (["MAX_CONNECTION_BUFFER_BYTES": "1024"], "MAX_CONNECTION_BUFFER_BYTES must hold"),
    ])
    func invalid(environment: [String: String], fragment: String) throws {
        do {
            _ = try resolve([], environment)
            Issue.record("expected \(fragment) to be rejected")
        } catch {
            #expect("\(error)".contains(fragment))
        }
    }

    @Test("the command line: unknown flags, missing values, help", arguments: [
        (["--no-such"], "unknown option --no-such"), (["--port"], "--port needs a value"), (["--s3-endpoint", "x"], "unknown option"),
    ])
    func commandLine(arguments: [String], fragment: String) {
        do {
            _ = try Settings.parse(arguments, table: table)
            Issue.record("expected \(arguments) to be refused")
        } catch {
            #expect("\(error)".contains(fragment))
        }
    }

    @Test("help and the JSON table list every setting with its flag and default")
    func help() throws {
        guard case .help = try Settings.parse(["--port", "1", "-h"], table: table) else { Issue.record("no help"); return }
        let text = Settings.help(command: "svc", abstract: "A service.", table: table)
        for setting in table {
            #expect(text.contains(setting.name))
            if let flag = setting.flag { #expect(text.contains(flag)) }
        }
        #expect(text.contains("(default 50051)") && text.contains("(default 64 MiB)") && !text.contains("`"))
        let json = Settings.json(command: "svc", table: table)
        #expect(json.contains("\"name\":\"WORKERS\",\"flag\":\"--workers\",\"default\":\"`0`\""))
    }

    @Test("each kind validates its values", arguments: [
        ("WORKERS", "257", false), ("WORKERS", "256", true), ("MAX_AUDIO_SEC", "0", false), ("DRAIN_TIMEOUT", "5m", true),
        ("DRAIN_TIMEOUT", "876001h", false), ("LOG_LEVEL", "DEBUG", true),
    ])
    func kinds(name: String, value: String, accepted: Bool) {
        let settings = Settings(table: table, environment: [name: value])
        let setting = table.first { $0.name == name }!
        let ok: Bool
        switch setting.kind {
        case .integer: ok = (try? settings.integer(setting)) != nil
        case .duration: ok = (try? settings.duration(setting)) != nil
        default: ok = (try? settings.string(setting)) != nil
        }
        #expect(ok == accepted)
    }

    @Test("durations", arguments: [("500ms", Int64(500_000_000)), ("2s", 2_000_000_000), ("5m", 300_000_000_000),
                                   ("1h", 3_600_000_000_000), ("250us", 250_000), ("7", 7_000_000_000), ("10ns", 10),
                                   ("7d", 604_800_000_000_000)])
    func durations(text: String, nanoseconds: Int64) {
        #expect(DurationSetting.parseNanoseconds(text) == nanoseconds)
        #expect(DurationSetting.parse(text) == .nanoseconds(nanoseconds))
        #expect(DurationSetting.parse(DurationSetting.text(.nanoseconds(nanoseconds))) == .nanoseconds(nanoseconds))
    }

    @Test("malformed or unrepresentable durations", arguments: ["", "fast", "-1s", "1w", "d", "ms", "1e300h", "inf", "nan", "99999999999h", "1e19"])
    func badDurations(text: String) {
        #expect(DurationSetting.parseNanoseconds(text) == nil)
    }

    @Test("a duration's nanoseconds saturate")
    func clamped() {
        #expect(Duration.seconds(Int64.max / 2).nanosecondsClamped == Int64.max)
        #expect(Duration.milliseconds(-5).nanosecondsClamped == 0)
        #expect(Duration.milliseconds(1500).nanosecondsClamped == 1_500_000_000)
    }

    @Test("--check-settings checks every value and each required one, not only those a service reads first")
    func checkAll() throws {
        let table = self.table + [Setting("ENDPOINT", flag: nil, required: true, help: "needed")]
        guard case .checkSettings(let flags) = try Settings.parse(["--check-settings", "--workers", "2"], table: table) else {
            Issue.record("not a check"); return
        }
        #expect(flags == ["WORKERS": "2"])
        try Settings(table: table, flags: flags, environment: ["ENDPOINT": "e"]).checkAll()
        #expect(throws: InvalidSetting.self) { try Settings(table: table, flags: flags, environment: [:]).checkAll() }
        for bad in [["MAX_AUDIO_SEC": "long"], ["IDLE_TIMEOUT": "2 minutes"], ["LOG_LEVEL": "loud"]] {
            #expect(throws: InvalidSetting.self) {
                try Settings(table: table, flags: flags, environment: bad.merging(["ENDPOINT": "e"]) { a, _ in a }).checkAll()
            }
        }
    }
}
