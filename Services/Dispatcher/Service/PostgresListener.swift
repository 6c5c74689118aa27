import CTalkMesh
import TalkMeshBase
import TalkMeshCore

/// A dedicated connection that LISTENs and hands every notification to its handlers, on a thread
/// of its own. Notifications sent while it is disconnected are lost (PostgreSQL does not replay
/// them): after reconnecting it says `.resynchronize`, and handlers re-read what they care about.
final class PostgresListener: Sendable {
    private final class Handlers: Sendable {
        let list = Locked<[@Sendable (StoreChange) -> Void]>([])
    }

    private let handlers = Handlers()
    private let stopped = CancellationFlag()
    private let thread = BlockingWorkPool(threads: 1, name: "pg-listen")

    init(url: String, channels: [String]) throws(ServiceError) {
        let first = try Self.connect(url, channels)
        let connection = Connection(first)
        Task.detached { [thread, stopped, handlers] in
            _ = try? await thread.run { _ in
                Self.loop(url: url, channels: channels, connection: connection, stopped: stopped) { change in
                    for handler in handlers.list.withLock({ $0 }) { handler(change) }
                }
            }
        }
    }

    /// Adds a handler; it runs on the listener's thread and must not block.
    func add(_ handler: @escaping @Sendable (StoreChange) -> Void) {
        handlers.list.withLock { $0.append(handler) }
    }

    /// Ends the loop within its poll interval.
    func stop() { stopped.cancel() }

    private final class Connection: @unchecked Sendable {
        var value: PostgresConnection
        init(_ value: PostgresConnection) { self.value = value }
    }

    private static func connect(_ url: String, _ channels: [String]) throws(ServiceError) -> PostgresConnection {
        let connection = try PostgresConnection(url: url)
        try connection.execute(channels.map { "LISTEN \($0)" }.joined(separator: "; "))
        return connection
    }

    private static func loop(url: String, channels: [String], connection: Connection, stopped: CancellationFlag,
                             deliver: (StoreChange) -> Void) {
        while !stopped.isCancelled {
            var descriptor = pollfd(fd: connection.value.socket, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, 250)
            guard ready > 0 else { continue }
            do {
                for (channel, payload) in try connection.value.notifications() {
                    if let change = Self.change(channel: channel, payload: payload) { deliver(change) }
                }
                // Notices come in bursts (one per job write); a pause after each read lets the next
                // ones gather, read in one wake-up instead of one each, for at most 20 ms of delay.
                usleep(20_000)
            } catch {
                // Reconnect with a pause until it works, then tell everyone to re-read.
                while !stopped.isCancelled {
                    usleep(500_000)
                    if let fresh = try? connect(url, channels) {
                        connection.value = fresh
                        deliver(.resynchronize)
                        break
                    }
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
