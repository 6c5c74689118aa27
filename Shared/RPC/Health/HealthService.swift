import TalkMeshBase
import TalkMeshMessages

/// `grpc.health.v1.Health` as the standard defines it: "" is the whole server, an unknown name is
/// NOT_FOUND for Check and SERVICE_UNKNOWN for Watch, and Watch sends the status now and on every
/// change. On shutdown every status turns NOT_SERVING and the watches end.
public final class HealthService: Sendable {
    public typealias Status = HealthCheckResponse.ServingStatus

    private final class State: @unchecked Sendable {
        let lock = PThreadMutex()
        var statuses: [String: Status] = ["": .serving]
        var watchers: [String: [UInt64: AsyncStream<Status>.Continuation]] = [:]
        var nextWatcher: UInt64 = 0
        var shuttingDown = false
    }

    private let state = State()

    /// Creates the service with the whole server ("") SERVING.
    public init() {}

    /// Sets a service's status (registering the name) and tells its watchers.
    public func setStatus(_ status: Status, for service: String = "") {
        let watchers: [AsyncStream<Status>.Continuation] = state.lock.withLock {
            if state.shuttingDown { return [] }
            state.statuses[service] = status
            return Array(state.watchers[service, default: [:]].values)
        }
        for watcher in watchers { watcher.yield(status) }
    }

    /// The status of a service, or nil when the name is not registered.
    public func status(of service: String) -> Status? {
        state.lock.withLock { state.statuses[service] }
    }

    /// True once shutdown began.
    public var isShuttingDown: Bool { state.lock.withLock { state.shuttingDown } }

    /// Turns every status NOT_SERVING, tells the watchers and ends their streams.
    public func enterShutdown() {
        let watchers: [AsyncStream<Status>.Continuation] = state.lock.withLock {
            state.shuttingDown = true
            for key in state.statuses.keys { state.statuses[key] = .notServing }
            let all = state.watchers.values.flatMap { $0.values }
            state.watchers.removeAll()
            return all
        }
        for watcher in watchers {
            watcher.yield(.notServing)
            watcher.finish()
        }
    }

    /// Adds `Check` and `Watch` to a registry.
    public func register(into registry: inout RPCServiceRegistry) {
        registry.register(Health.check) { [self] request, _ in
            guard let status = status(of: request.service) else {
                throw RPCError(code: .notFound, message: "unknown service \(request.service)")
            }
            var response = HealthCheckResponse()
            response.status = status
            return response
        }
        registry.register(Health.watch) { [self] request, _, writer in
            let stream = watch(request.service)
            var last: Status?
            for await status in stream where status != last {
                var response = HealthCheckResponse()
                response.status = status
                try await writer.write(response)
                last = status
            }
        }
    }

    private func watch(_ service: String) -> AsyncStream<Status> {
        let (stream, continuation) = AsyncStream.makeStream(of: Status.self, bufferingPolicy: .bufferingNewest(1))
        let id: UInt64? = state.lock.withLock {
            let current = state.statuses[service] ?? .serviceUnknown
            continuation.yield(state.shuttingDown ? .notServing : current)
            if state.shuttingDown { return nil }
            state.nextWatcher += 1
            state.watchers[service, default: [:]][state.nextWatcher] = continuation
            return state.nextWatcher
        }
        guard let id else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [state] _ in
            state.lock.withLock { _ = state.watchers[service]?.removeValue(forKey: id) }
        }
        return stream
    }
}
