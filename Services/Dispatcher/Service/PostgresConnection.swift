import CTalkMesh
import TalkMeshBase
import TalkMeshCore

/// A parameter of a PostgreSQL statement: text (numbers are sent as their text), bytes (bytea,
/// sent in binary) or NULL.
enum PGValue {
    case text(String)
    case bytes([UInt8])
    case null

    static func int(_ value: some BinaryInteger) -> PGValue { .text(String(value)) }
}

/// One blocking libpq connection (the adapter: nothing else touches libpq). Not thread-safe: its
/// owner confines it to one thread at a time (hence `@unchecked Sendable`: it moves between
/// threads, it is never shared). A broken connection is re-established on the next
/// statement; a statement that fails on a broken connection is STORE_UNAVAILABLE.
final class PostgresConnection: @unchecked Sendable {
    private var handle: OpaquePointer?
    let url: String

    init(url: String) throws(ServiceError) {
        self.url = url
        try connect()
    }

    deinit { PQfinish(handle) }

    private func connect() throws(ServiceError) {
        PQfinish(handle)
        handle = PQconnectdb(url)
        guard let handle, PQstatus(handle) == CONNECTION_OK else {
            let message = handle.map { String(cString: PQerrorMessage($0)) } ?? "out of memory"
            throw ServiceError(.storeUnavailable, "cannot connect to PostgreSQL", cause: Self.redact(url) + ": " + message)
        }
        // Lock waits are bounded: a stuck lock fails the statement instead of a job.
        _ = try execute("SET lock_timeout = '10s'")
    }

    /// The socket to wait on (LISTEN).
    var socket: Int32 { PQsocket(handle) }

    /// Runs `body` in one transaction: committed when it returns, rolled back when it throws.
    func transaction<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            _ = try? execute("ROLLBACK")
            throw error
        }
    }

    /// Runs one statement with parameters; rows come back as text.
    @discardableResult
    func execute(_ sql: String, _ parameters: [PGValue] = []) throws(ServiceError) -> PGResult {
        if PQstatus(handle) != CONNECTION_OK { try connect() }
        let result = Self.run(handle, sql, parameters)
        let status = PQresultStatus(result)
        if status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK { return PGResult(result) }
        let state = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) } ?? ""
        let message = String(cString: PQerrorMessage(handle)).trimmingTrailingNewlines
        PQclear(result)
        if PQstatus(handle) != CONNECTION_OK {
            throw ServiceError(.storeUnavailable, "PostgreSQL connection lost", cause: message)
        }
        // 23505: unique violation; 55P03: lock timeout; 40001/40P01: serialization, deadlock.
        switch state {
        case "23505": throw ServiceError(.storeConflict, "a row with that key exists", cause: message)
        case "55P03", "40001", "40P01": throw ServiceError(.storeUnavailable, "PostgreSQL is busy; try again", cause: message)
        default: throw ServiceError(.storeUnavailable, "PostgreSQL refused a statement", cause: "\(state): \(message)")
        }
    }

    /// Runs `statements` in one round trip and one transaction (libpq's pipeline mode, one sync
    /// point): their results in order, or nil when one of them failed — then none of them took
    /// effect (the transaction was rolled back) and the caller runs them one by one to learn
    /// which. STORE_UNAVAILABLE when the connection failed (whether the transaction committed
    /// is then unknown, as for a single statement).
    func pipeline(_ statements: [(sql: String, values: [PGValue])]) throws(ServiceError) -> [PGResult]? {
        if PQstatus(handle) != CONNECTION_OK { try connect() }
        func lost() -> ServiceError {
            ServiceError(.storeUnavailable, "PostgreSQL connection lost", cause: String(cString: PQerrorMessage(handle)).trimmingTrailingNewlines)
        }
        guard PQenterPipelineMode(handle) == 1 else { throw lost() }
        defer {
            // Left mid-batch (the connection failed): a connection still in pipeline mode takes no
            // other statement, so it is dropped, and the next statement connects afresh.
            if PQexitPipelineMode(handle) != 1 {
                PQfinish(handle)
                handle = nil
            }
        }
        for statement in statements {
            let sent = Self.withParameters(statement.values) { count, values, lengths, formats in
                PQsendQueryParams(handle, statement.sql, count, nil, values, lengths, formats, 0)
            }
            guard sent == 1 else { throw lost() }
        }
        guard PQpipelineSync(handle) == 1 else { throw lost() }
        var results: [PGResult] = []
        var failed = false
        for _ in statements {
            guard let result = PQgetResult(handle) else { throw lost() }
            let status = PQresultStatus(result)
            if status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK {
                results.append(PGResult(result))
            } else {
                PQclear(result)
                failed = true
            }
            // Each statement's results end with a null.
            while let extra = PQgetResult(handle) { PQclear(extra) }
        }
        guard let sync = PQgetResult(handle) else { throw lost() }
        let synced = PQresultStatus(sync) == PGRES_PIPELINE_SYNC
        PQclear(sync)
        guard synced else { throw lost() }
        return failed ? nil : results
    }

    private static func run(_ handle: OpaquePointer?, _ sql: String, _ parameters: [PGValue]) -> OpaquePointer? {
        if parameters.isEmpty { return PQexec(handle, sql) }
        return withParameters(parameters) { count, values, lengths, formats in
            PQexecParams(handle, sql, count, nil, values, lengths, formats, 0)
        }
    }

    /// Calls `body` with the parameters as libpq takes them: count, values, lengths, formats.
    private static func withParameters<T>(_ parameters: [PGValue],
                                          _ body: (Int32, [UnsafePointer<CChar>?], [Int32], [Int32]) -> T) -> T {
        // Every value lives in one buffer for the call: offsets first, pointers once it is final.
        var buffer: [UInt8] = []
        var offsets: [Int?] = []
        var lengths: [Int32] = []
        var formats: [Int32] = []
        for parameter in parameters {
            switch parameter {
            case .text(let text):
                offsets.append(buffer.count)
                buffer.append(contentsOf: text.utf8)
                buffer.append(0)
                lengths.append(0)
                formats.append(0)
            case .bytes(let bytes):
                offsets.append(buffer.count)
                buffer.append(contentsOf: bytes)
                lengths.append(Int32(bytes.count))
                formats.append(1)
            case .null:
                offsets.append(nil)
                lengths.append(0)
                formats.append(0)
            }
        }
        if buffer.isEmpty { buffer.append(0) }
        return buffer.withUnsafeBufferPointer { raw in
            let base = UnsafeRawPointer(raw.baseAddress!).assumingMemoryBound(to: CChar.self)
            let values: [UnsafePointer<CChar>?] = offsets.map { $0.map { base + $0 } }
            return body(Int32(parameters.count), values, lengths, formats)
        }
    }

    /// Reads what arrived on the socket and returns the notifications it held (LISTEN).
    func notifications() throws(ServiceError) -> [(channel: String, payload: String)] {
        guard PQconsumeInput(handle) == 1 else {
            throw ServiceError(.storeUnavailable, "PostgreSQL connection lost", cause: String(cString: PQerrorMessage(handle)))
        }
        var received: [(String, String)] = []
        while let notify = PQnotifies(handle) {
            received.append((String(cString: notify.pointee.relname), String(cString: notify.pointee.extra)))
            PQfreemem(notify)
        }
        return received
    }

    /// The URL without its password, for messages.
    static func redact(_ url: String) -> String {
        guard let at = url.lastIndex(of: "@"), let scheme = url.range(of: "://"), scheme.upperBound < at else { return url }
        let credentials = url[scheme.upperBound..<at]
        guard let colon = credentials.firstIndex(of: ":") else { return url }
        return String(url[..<colon]) + ":***" + String(url[at...])
    }
}

/// A statement's rows, as text; freed with the value. Immutable once made (libpq's reads of a
/// result are thread-safe), so it may be handed from the thread that ran the statement.
final class PGResult: @unchecked Sendable {
    private let handle: OpaquePointer?

    init(_ handle: OpaquePointer?) { self.handle = handle }
    deinit { PQclear(handle) }

    var rows: Int { Int(PQntuples(handle)) }
    /// Rows an UPDATE, INSERT or DELETE changed.
    var affected: Int { Int(String(cString: PQcmdTuples(handle))) ?? 0 }

    func isNull(_ row: Int, _ column: Int) -> Bool { PQgetisnull(handle, Int32(row), Int32(column)) == 1 }

    func text(_ row: Int, _ column: Int) -> String { String(cString: PQgetvalue(handle, Int32(row), Int32(column))) }

    func int64(_ row: Int, _ column: Int) -> Int64 { Int64(text(row, column)) ?? 0 }

    func double(_ row: Int, _ column: Int) -> Double { Double(text(row, column)) ?? 0 }

    /// A bytea column (text format: `\x` and hex digits).
    func bytes(_ row: Int, _ column: Int) -> [UInt8] {
        guard let value = PQgetvalue(handle, Int32(row), Int32(column)) else { return [] }
        var length = 0
        guard let decoded = PQunescapeBytea(UnsafeRawPointer(value).assumingMemoryBound(to: UInt8.self), &length) else { return [] }
        defer { PQfreemem(decoded) }
        return Array(UnsafeBufferPointer(start: decoded, count: length))
    }
}

/// A fixed number of connections, each used by one pool thread at a time: statements run off
/// Swift's cooperative threads, at most `size` at once, the rest queued.
final class PostgresPool: Sendable {
    private let connections: Locked<[PostgresConnection]>
    private let threads: BlockingWorkPool
    let url: String

    init(url: String, size: Int) throws(ServiceError) {
        self.url = url
        var opened: [PostgresConnection] = []
        for _ in 0..<size { opened.append(try PostgresConnection(url: url)) }
        connections = Locked(opened)
        threads = BlockingWorkPool(threads: size, name: "postgres")
    }

    /// Runs `body` with a connection of its own on a pool thread, without waiting for it.
    func submit(_ body: @escaping @Sendable (PostgresConnection) -> Void) {
        threads.submit { self.borrowing(body) }
    }

    /// `body` with a connection taken from the pool for its length. As many threads as
    /// connections: one is always free on a pool thread.
    private func borrowing<T>(_ body: (PostgresConnection) throws -> T) rethrows -> T {
        let connection = connections.withLock { $0.removeLast() }
        defer { connections.withLock { $0.append(connection) } }
        return try body(connection)
    }

    /// Runs `body` with a connection of its own, on a pool thread.
    func with<T: Sendable>(_ body: @escaping @Sendable (PostgresConnection) throws -> T) async throws -> T {
        try await threads.run { _ in try self.borrowing(body) }
    }
}

/// Statements from many callers, sent together: while one batch is in flight, the statements that
/// arrive meanwhile gather, and the next batch sends them all in one round trip and one
/// transaction (a group commit). Under load a statement then costs a share of one send, one
/// answer and one wake-up of the database instead of a whole round trip with a pool thread's
/// hand-off each (about 100 µs of the Dispatcher's CPU per statement, most of it the kernel's).
/// Only statements that are whole on their own belong here: single-row writes whose answer the
/// caller reads, with no lock a caller elsewhere might hold long. A batch in which one statement
/// fails takes no effect; its statements are then run one by one, each with its own answer.
final class PostgresBatcher: Sendable {
    private struct Item: Sendable {
        let sql: String
        let values: [PGValue]
        let done: @Sendable (Result<PGResult, ServiceError>) -> Void
    }

    private struct State {
        var items: [Item] = []
        /// A drain runs. While none does, the items waiting are held ones (queued on the workflow
        /// thread, to go when it runs out of work): any other enqueue starts a drain.
        var flushing = false
        /// When the first held item came.
        var heldSince: Int64 = 0
    }

    private let state = Locked(State())
    private let sent = Locked((batches: 0, statements: 0))
    private let pool: PostgresPool
    /// The most statements in one batch.
    let most: Int
    private let workflow: WorkflowExecutor?
    private let holdNanoseconds: Int64

    /// With `workflow`, statements queued on its thread are held until it has run out of work
    /// (or `most` are waiting, or the first has waited `holdNanoseconds` on a thread that stays
    /// busy), so what one wake-up of the workflows writes goes in one batch and wakes a pool
    /// thread once, instead of the first statement alone and the rest after it.
    init(pool: PostgresPool, most: Int = 64, workflow: WorkflowExecutor? = nil, holdNanoseconds: Int64 = 2_000_000) {
        self.pool = pool
        self.most = max(1, most)
        self.workflow = workflow
        self.holdNanoseconds = holdNanoseconds
        workflow?.onIdle { [weak self] in self?.flushHeld() }
    }

    /// Batches sent and the statements in them, so far.
    var totals: (batches: Int, statements: Int) { sent.withLock { $0 } }

    /// Runs one statement, in the next batch; `read` takes what the caller needs from its result.
    func execute<T: Sendable>(_ sql: String, _ values: [PGValue], _ read: @escaping @Sendable (PGResult) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            enqueue(Item(sql: sql, values: values) { result in
                continuation.resume(with: Result { try read(result.get()) })
            })
        }
    }

    /// Sends one statement in the next batch without waiting for it, its failure ignored: for a
    /// change nobody waits on, which then costs its caller no suspension and no wake-up.
    func send(_ sql: String, _ values: [PGValue]) {
        enqueue(Item(sql: sql, values: values) { _ in })
    }

    private func enqueue(_ item: Item) {
        let now = workflow?.isCurrent == true ? MonotonicClock.nanoseconds() : nil
        let start = state.withLock { state -> Bool in
            state.items.append(item)
            if state.flushing { return false }  // the batch in flight's drain takes it next
            if let now, state.items.count < most {
                if state.items.count == 1 { state.heldSince = now }
                if now - state.heldSince < holdNanoseconds { return false }
            }
            state.flushing = true
            return true
        }
        if start { pool.submit { self.drain($0) } }
    }

    /// The workflow thread ran out of work: what it queued goes now.
    private func flushHeld() {
        let start = state.withLock { state -> Bool in
            guard !state.flushing, !state.items.isEmpty else { return false }
            state.flushing = true
            return true
        }
        if start { pool.submit { self.drain($0) } }
    }

    /// Sends batches until none is waiting.
    private func drain(_ db: PostgresConnection) {
        while true {
            let batch = state.withLock { state -> [Item] in
                guard !state.items.isEmpty else {
                    state.flushing = false
                    return []
                }
                let count = min(state.items.count, most)
                defer { state.items.removeFirst(count) }
                return Array(state.items.prefix(count))
            }
            if batch.isEmpty { return }
            sent.withLock { $0.batches += 1; $0.statements += batch.count }
            run(batch, on: db)
        }
    }

    private func run(_ batch: [Item], on db: PostgresConnection) {
        if batch.count > 1 {
            do {
                if let results = try db.pipeline(batch.map { ($0.sql, $0.values) }) {
                    for (item, result) in zip(batch, results) { item.done(.success(result)) }
                    return
                }
            } catch {
                for item in batch { item.done(.failure(error)) }
                return
            }
        }
        // One statement, or a batch that took no effect because one of its statements failed.
        for item in batch {
            do { item.done(.success(try db.execute(item.sql, item.values))) } catch { item.done(.failure(error)) }
        }
    }
}

extension String {
    fileprivate var trimmingTrailingNewlines: String {
        var text = self
        while text.hasSuffix("\n") { text.removeLast() }
        return text
    }
}
