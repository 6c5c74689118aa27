import Dispatch
import Glibc
import Logging
import TalkMeshCore
import TalkMeshRPC

/// Starts a TalkMesh service: resolves its settings, sets up logging, binds, serves until SIGTERM
/// or SIGINT, drains and returns (the process then exits 0).
public enum ServiceRunner {
    /// What a service adds to the runtime: its gRPC methods and REST routes.
    public struct Setup {
        public var services = RPCServiceRegistry()
        public var router = HTTPRouter()
        /// The service's own metrics, appended to `/metrics`.
        public var metricsSources: [@Sendable () -> String] = []
        /// Runs once the server has drained, before the process exits.
        public var onStop: [@Sendable () async -> Void] = []
        public let health: HealthService
        public let logger: Logger
    }

    /// Runs the service on its settings table (the shared settings, then `table`): `--help` prints
    /// it and exits 0; bad settings, an unknown flag or a port that cannot be bound exit 2.
    /// `configure` is `@Sendable` so that it is isolated to no actor: written in a `@main` type's
    /// `main()`, it would otherwise be on the main actor, and so would every task it starts, which
    /// then never runs (the main thread runs the event loop, never the main actor's queue).
    public static func run(name: String, abstract: String, defaultPort: Int, settings table: [Setting] = [],
                           arguments: [String] = Array(CommandLine.arguments.dropFirst()),
                           configure: @Sendable (inout Setup, Settings) throws -> Void) {
        let table = ServiceSettings.common(defaultPort: defaultPort) + table + Setting.tracing
        let settings: Settings
        let resolved: ServiceSettings.Resolved
        do {
            switch try Settings.parse(arguments, table: table) {
            case .help:
                StandardStream.write(1, Settings.help(command: name, abstract: abstract, table: table))
                exit(0)
            case .settingsJSON:
                StandardStream.write(1, Settings.json(command: name, table: table) + "\n")
                exit(0)
            case .checkSettings(let flags):
                let checked = Settings(table: table, flags: flags)
                try checked.checkAll()
                _ = try ServiceSettings.resolve(checked, serviceName: name)
                StandardStream.write(1, "\(name): settings ok\n")
                exit(0)
            case .run(let flags):
                settings = Settings(table: table, flags: flags)
                resolved = try ServiceSettings.resolve(settings, serviceName: name)
            }
        } catch {
            StandardStream.write(2, "\(name): invalid setting: \(error)\n")
            exit(2)
        }
        let json = resolved.logFormat == "json"
        let level = Logger.Level(rawValue: resolved.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = JSONLogHandler(label: label, json: json)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: name)
        let health = HealthService()
        var setup = Setup(health: health, logger: logger)
        do {
            let (tracer, exporter) = try TracingSetup.make(settings, serviceName: name, logger: logger)
            TalkMeshTracer.bootstrap(tracer)
            try configure(&setup, settings)
            setup.metricsSources.append { MeteredBlobStore.render() }
            if let exporter {
                setup.metricsSources.append { exporter.metrics() }
                setup.onStop.append { await exporter.flush() }  // last: the other hooks' spans go too
            } else {
                setup.metricsSources.append { OTLPExporter.metrics() }
            }
            let server = try RPCServer(configuration: resolved.server, services: setup.services, router: setup.router,
                                       health: health, metricsSources: setup.metricsSources, logger: logger)
            let port = try server.bind()
            logger.info("serving gRPC, HTTP/2 and HTTP/1.1", metadata: [
                "host": "\(resolved.server.host)", "port": "\(port)",
                "health_port": "\(server.boundHealthPort.map(String.init) ?? "-")",
                "tls": "\(resolved.server.tlsCertificateFile != nil)", "event_loops": "\(server.configuration.eventLoops)",
            ])
            server.run()
            if !setup.onStop.isEmpty {
                let hooks = setup.onStop
                let done = DispatchSemaphore(value: 0)
                Task {
                    for hook in hooks { await hook() }
                    done.signal()
                }
                if done.wait(timeout: .now() + 30) == .timedOut { logger.warning("stop hooks did not finish within 30 s") }
            }
            logger.info("stopped")
        } catch let error as InvalidSetting {
            StandardStream.write(2, "\(name): invalid setting: \(error)\n")
            exit(2)
        } catch {
            logger.critical("cannot start: \(error)")
            StandardStream.write(2, "\(name): cannot start: \(error)\n")
            exit(2)
        }
    }
}
