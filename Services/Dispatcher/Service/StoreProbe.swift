import Logging
import TalkMeshRPC

/// Keeps `/readyz` and gRPC health honest: NOT_SERVING while the job store does not answer. Its
/// question — how many jobs are queued and running — feeds the jobs-by-state gauge.
public struct StoreProbe: Sendable {
    let store: any JobStore
    let health: HealthService
    let counters: DispatcherCounters
    let logger: Logger
    var interval: Duration = .seconds(2)

    public init(store: any JobStore, health: HealthService, counters: DispatcherCounters, logger: Logger) {
        self.store = store
        self.health = health
        self.counters = counters
        self.logger = logger
    }

    public func run() async {
        var serving = true
        while !Task.isCancelled && !health.isShuttingDown {
            let reachable: Bool
            do {
                counters.set(unfinished: try await store.unfinishedCounts())
                reachable = true
            } catch {
                reachable = false
                if serving { logger.error("the job store does not answer", metadata: ["error": "\(error)"]) }
            }
            if reachable != serving {
                serving = reachable
                health.setStatus(serving ? .serving : .notServing)
            }
            try? await Task.sleep(for: interval)
        }
    }
}
