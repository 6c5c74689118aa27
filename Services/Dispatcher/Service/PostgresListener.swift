import CTalkMesh
import TalkMeshBase
import TalkMeshCore

/// A dedicated connection that LISTENs and hands every notification to its handlers. Its socket
/// is watched on `executor`'s thread (the Dispatcher's workflow thread), where the handlers run:
/// a notice, which comes with the commit of the write it tells of, is then most often read in the
/// same wake-up as that write's answer, instead of waking a thread of its own. Notifications sent
/// while it is disconnected are lost (PostgreSQL does not replay them): after reconnecting (on a
/// thread of its own, with a pause between tries) it says `.resynchronize`, and handlers re-read
/// what they care about.
final class PostgresListener: @unchecked Sendable {
    private let handlers = Locked<[@Sendable (StoreChange) -> Void]>([])
    private let stopped = CancellationFlag()
    private let reconnecting = BlockingWorkPool(threads: 1, name: "pg-listen")
    private let executor: WorkflowExecutor
    private let url: String
    private let channels: [String]
    /// The executor thread's own: the connection, and the descriptor watched for it (kept: once
    /// the connection has failed, libpq has closed its socket and `socket` says -1).
    private var connection: PostgresConnection?
    private var socket: Int32 = -1

    init(url: String, channels: [String], executor: WorkflowExecutor) throws(ServiceError) {
        self.url = url
        self.channels = channels
        self.executor = executor
        let first = try Self.connect(url, channels)
        Task(executorPreference: executor) { self.listen(on: first) }
    }

    /// Adds a handler; it runs on the executor's thread and must not block.
    func add(_ handler: @escaping @Sendable (StoreChange) -> Void) {
        handlers.withLock { $0.append(handler) }
    }

    /// Stops listening (soon, on the executor's thread).
    func stop() {
        stopped.cancel()
        Task(executorPreference: executor) { self.drop() }
    }

    private static func connect(_ url: String, _ channels: [String]) throws(ServiceError) -> PostgresConnection {
        let connection = try PostgresConnection(url: url)
        try connection.execute(channels.map { "LISTEN \($0)" }.joined(separator: "; "))
        return connection
    }

    private func listen(on connection: PostgresConnection) {
        guard !stopped.isCancelled else { return }
        self.connection = connection
        socket = connection.socket
        executor.watch(socket, events: Int16(POLLIN)) { _ in self.read() }
    }

    private func drop() {
        if socket >= 0 { executor.unwatch(socket) }
        socket = -1
        connection = nil
    }

    /// The socket is readable: the notices that came, to the handlers.
    private func read() {
        guard let connection else { return }
        do {
            let received = try connection.notifications()
            let handlers = self.handlers.withLock { $0 }
            for (channel, payload) in received {
                if let change = Self.change(channel: channel, payload: payload) {
                    for handler in handlers { handler(change) }
                }
            }
        } catch {
            drop()
            reconnect()
        }
    }

    /// Reconnects with a pause until it works, then tells every handler to re-read.
    private func reconnect() {
        let url = self.url, channels = self.channels, stopped = self.stopped, executor = self.executor
        reconnecting.submit {
            while !stopped.isCancelled {
                usleep(500_000)
                if let fresh = try? Self.connect(url, channels) {
                    Task(executorPreference: executor) {
                        self.listen(on: fresh)
                        let handlers = self.handlers.withLock { $0 }
                        for handler in handlers { handler(.resynchronize) }
                    }
                    return
                }
            }
        }
    }

    /// `talkmesh_jobs` carries "<job id> <version>"; `talkmesh_slots` and `talkmesh_claimable`
    /// carry nothing.
    static func change(channel: String, payload: String) -> StoreChange? {
        switch channel {
        case "talkmesh_slots":
            return .slotsFreed
        case "talkmesh_claimable":
            return .claimable
        case "talkmesh_jobs":
            let parts = payload.split(separator: " ")
            guard parts.count == 2, let version = Int64(parts[1]) else { return nil }
            return .job(id: String(parts[0]), version: version)
        default:
            return nil
        }
    }
}
