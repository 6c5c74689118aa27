import Logging

/// What every connection of one server shares: configuration, the method table, the REST router,
/// metrics, health and the logger. Immutable after start apart from the locked shutdown flag.
final class ServerCore: Sendable {
    let configuration: RPCServer.Configuration
    let registry: RPCServiceRegistry
    let router: HTTPRouter
    let metrics: RequestMetrics
    let health: HealthService
    let logger: Logger
    let tls: TLSContext?

    init(configuration: RPCServer.Configuration, registry: RPCServiceRegistry, router: HTTPRouter,
         metrics: RequestMetrics, health: HealthService, logger: Logger, tls: TLSContext?) {
        self.configuration = configuration
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.health = health
        self.logger = logger
        self.tls = tls
    }
}
