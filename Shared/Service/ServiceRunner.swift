import ArgumentParser
import Dispatch
import Glibc
import Logging
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

    /// Runs the service; exits 2 on bad settings or when the port cannot be bound.
    public static func run(name: String, defaultPort: Int, options: ServiceOptions, configure: (inout Setup) throws -> Void) {
        let resolved: ServiceOptions.Resolved
        do {
            resolved = try options.resolve(serviceName: name, defaultPort: defaultPort)
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
            try configure(&setup)
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
        } catch let error as ServiceOptions.InvalidSetting {
            StandardStream.write(2, "\(name): invalid setting: \(error)\n")
            exit(2)
        } catch {
            logger.critical("cannot start: \(error)")
            StandardStream.write(2, "\(name): cannot start: \(error)\n")
            exit(2)
        }
    }
}

extension ParsableCommand {
    /// Like `main()`, but every usage or validation error exits with code 2 (help exits 0).
    public static func mainExitingTwoOnError() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            StandardStream.write(2, fullMessage(for: error) + "\n")
            Glibc.exit(2)
        }
    }

    /// The settings table for `--help`.
    public static var settingsDiscussion: String {
        "Settings (environment variable, flag):\n" + ServiceOptions.settings.map {
            "  \($0.environment.padding(27))\($0.flag.padding(29))\($0.meaning)"
        }.joined(separator: "\n")
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}
