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
        if !isUp { try connect() }
        let result = Self.run(handle, sql, parameters)
        let status = PQresultStatus(result)
        if status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK { return PGResult(result) }
        throw failure(result)
    }

    /// The error of a statement that failed (its result is freed).
    private func failure(_ result: OpaquePointer?) -> ServiceError {
        let state = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) } ?? ""
        let message = (PQresultErrorMessage(result).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
            ?? String(cString: PQerrorMessage(handle))).trimmingTrailingNewlines
        PQclear(result)
        if !isUp {
            return ServiceError(.storeUnavailable, "PostgreSQL connection lost", cause: message)
        }
        // 23505: unique violation; 55P03: lock timeout; 40001/40P01: serialization, deadlock.
        switch state {
        case "23505": return ServiceError(.storeConflict, "a row with that key exists", cause: message)
        case "55P03", "40001", "40P01": return ServiceError(.storeUnavailable, "PostgreSQL is busy; try again", cause: message)
        default: return ServiceError(.storeUnavailable, "PostgreSQL refused a statement", cause: "\(state): \(message)")
        }
    }

    private func lost() -> ServiceError {
        ServiceError(.storeUnavailable, "PostgreSQL connection lost", cause: String(cString: PQerrorMessage(handle)).trimmingTrailingNewlines)
    }

    /// Whether the connection is up (a broken one is replaced, not reused).
    var isUp: Bool { PQstatus(handle) == CONNECTION_OK }

    // MARK: Pipelines without blocking (the batcher's connection, on the workflow thread)

    /// Sends `statements` as one pipeline with one sync point (one transaction), without waiting
    /// for the socket: true when some of it is still to be written (`flush` once writable).
    /// Its answers are read with `receive`. The connection is non-blocking from then on.
    func sendPipeline(_ statements: [(sql: String, values: [PGValue])]) throws(ServiceError) -> Bool {
        guard isUp else { throw lost() }
        if PQisnonblocking(handle) == 0 && PQsetnonblocking(handle, 1) != 0 { throw lost() }
        guard PQenterPipelineMode(handle) == 1 else { throw lost() }
        for statement in statements {
            let sent = Self.withParameters(statement.values) { count, values, lengths, formats in
                PQsendQueryParams(handle, statement.sql, count, nil, values, lengths, formats, 0)
            }
            guard sent == 1 else { throw lost() }
        }
        guard PQpipelineSync(handle) == 1 else { throw lost() }
        return try flush()
    }

    /// Writes what a pipeline still holds: true while some is left.
    func flush() throws(ServiceError) -> Bool {
        switch PQflush(handle) {
        case 0: return false
        case 1: return true
        default: throw lost()
        }
    }

    /// Reads what has arrived of a pipeline's answers, appending each statement's outcome to
    /// `outcomes`; true once its sync point has come (the pipeline is over and the connection
    /// out of pipeline mode). Statements after a failed one come back failed too (aborted).
    func receive(into outcomes: inout [Result<PGResult, ServiceError>]) throws(ServiceError) -> Bool {
        guard PQconsumeInput(handle) == 1 else { throw lost() }
        var ended = false
        while PQisBusy(handle) == 0 {
            // A null ends each statement's results; two in a row: nothing is pending, no sync will come.
            guard let result = PQgetResult(handle) else {
                if ended { throw ServiceError(.storeUnavailable, "PostgreSQL's answers to a batch ended early") }
                ended = true
                continue
            }
            ended = false
            let status = PQresultStatus(result)
            if status == PGRES_PIPELINE_SYNC {
                PQclear(result)
                guard PQexitPipelineMode(handle) == 1 else { throw lost() }
                return true
            }
            if status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK {
                outcomes.append(.success(PGResult(result)))
            } else if status == PGRES_PIPELINE_ABORTED {
                PQclear(result)
                outcomes.append(.failure(ServiceError(.storeUnavailable, "PostgreSQL skipped a statement after another in its batch failed")))
            } else {
                outcomes.append(.failure(failure(result)))
            }
        }
        return false
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

    /// Runs `body` on a pool thread without a connection (connecting elsewhere), not waiting for it.
    func detach(_ body: @escaping @Sendable () -> Void) {
        threads.submit(body)
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
/// transaction (a group commit). Under load a statement then costs a share of one send and one
/// answer instead of a whole round trip. Only statements that are whole on their own belong here:
/// single-row writes whose answer the caller reads, with no lock a caller elsewhere might hold
/// long. A batch in which one statement fails takes no effect; its statements are then sent one
/// by one, each with its own answer.
///
/// The batches go out on a connection of their own, without blocking, from the thread of a
/// `WorkflowExecutor` (the Dispatcher's workflow thread), which watches its socket: an answer
/// resumes the workflows that waited for it on that same thread. Through a pool thread, each batch
/// cost a hand-off there and back (two wake-ups, four context switches), about a fifth of the
/// Dispatcher's CPU per chunk. Connecting blocks, so it happens on a pool thread.
final class PostgresBatcher: @unchecked Sendable {
    private struct Item: Sendable {
        let sql: String
        let values: [PGValue]
        let done: @Sendable (Result<PGResult, ServiceError>) -> Void
        /// Sent in a batch of its own (its batch failed: each statement learns its own answer).
        var alone = false
    }

    /// What waits to be sent; callers on any thread add to it.
    private struct Waiting {
        var items: [Item] = []
        /// When the first item held on the executor's thread came.
        var heldSince: Int64 = 0
        /// A turn on the executor's thread is on its way for items from other threads.
        var scheduled = false
    }

    private let waiting = Locked(Waiting())
    private let sent = Locked((batches: 0, statements: 0))
    private let pool: PostgresPool
    /// The most statements in one batch.
    let most: Int
    /// The thread the batches go out from (and the listener reads on).
    let executor: WorkflowExecutor
    private let holdNanoseconds: Int64

    // The executor thread's own.
    private var connection: PostgresConnection?
    private var connecting = false
    /// The batch in flight and the answers read so far.
    private var inFlight: [Item] = []
    private var outcomes: [Result<PGResult, ServiceError>] = []
    private var writing = false
    /// The descriptor watched for the batch in flight, or -1 (kept: once the connection has
    /// failed, libpq has closed its socket and `socket` says -1).
    private var socket: Int32 = -1

    /// With `workflow`, the batches go out from its thread, and statements queued there are held
    /// until it has run out of work (or `most` are waiting, or the first has waited
    /// `holdNanoseconds` on a thread that stays busy), so what one wake-up of the workflows writes
    /// goes in one batch. Without, a thread of its own sends them.
    init(pool: PostgresPool, most: Int = 64, workflow: WorkflowExecutor? = nil, holdNanoseconds: Int64 = 2_000_000) throws(ServiceError) {
        self.pool = pool
        self.most = max(1, most)
        executor = workflow ?? WorkflowExecutor(name: "pg-batch")
        self.holdNanoseconds = holdNanoseconds
        connection = try PostgresConnection(url: pool.url)
        executor.onIdle { [weak self] in self?.sendNext() }
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
        if executor.isCurrent {
            let now = MonotonicClock.nanoseconds()
            let due = waiting.withLock { waiting -> Bool in
                waiting.items.append(item)
                if waiting.items.count == 1 { waiting.heldSince = now }
                return waiting.items.count >= most || now - waiting.heldSince >= holdNanoseconds
            }
            if due { sendNext() }
            return
        }
        let schedule = waiting.withLock { waiting -> Bool in
            waiting.items.append(item)
            defer { waiting.scheduled = true }
            return !waiting.scheduled
        }
        if schedule {
            Task(executorPreference: executor) {
                self.waiting.withLock { $0.scheduled = false }
                self.sendNext()
            }
        }
    }

    /// Sends the next batch, unless one is in flight (its end sends the next) or the connection
    /// is being made.
    private func sendNext() {
        guard inFlight.isEmpty, !connecting else { return }
        guard let connection, connection.isUp else {
            connect()
            return
        }
        let batch = waiting.withLock { waiting -> [Item] in
            guard let first = waiting.items.first else { return [] }
            var count = 1
            if !first.alone {
                while count < min(most, waiting.items.count) && !waiting.items[count].alone { count += 1 }
            }
            defer { waiting.items.removeFirst(count) }
            return Array(waiting.items.prefix(count))
        }
        guard !batch.isEmpty else { return }
        sent.withLock { $0.batches += 1; $0.statements += batch.count }
        do {
            writing = try connection.sendPipeline(batch.map { ($0.sql, $0.values) })
        } catch {
            fail(batch, error)
            return
        }
        inFlight = batch
        socket = connection.socket
        watch()
    }

    private func watch() {
        executor.watch(socket, events: Int16(POLLIN) | (writing ? Int16(POLLOUT) : 0)) { _ in self.answered() }
    }

    /// The socket is ready: writes what is left, reads what came.
    private func answered() {
        guard let connection, !inFlight.isEmpty else { return }
        let synced: Bool
        do {
            let wasWriting = writing
            if writing { writing = try connection.flush() }
            synced = try connection.receive(into: &outcomes)
            if !synced && writing != wasWriting { watch() }
        } catch {
            let batch = inFlight
            inFlight = []
            outcomes = []
            fail(batch, error)
            return
        }
        guard synced else { return }
        executor.unwatch(socket)
        socket = -1
        let batch = inFlight, answers = outcomes
        inFlight = []
        outcomes = []
        if answers.count != batch.count {
            fail(batch, ServiceError(.storeUnavailable, "PostgreSQL answered \(answers.count) of \(batch.count) statements"))
            return
        }
        if batch.count > 1 && answers.contains(where: { if case .failure = $0 { true } else { false } }) {
            // None took effect: each goes again on its own, to learn which failed (first, in order).
            waiting.withLock { waiting in
                waiting.items.insert(contentsOf: batch.map { var item = $0; item.alone = true; return item }, at: 0)
            }
        } else {
            for (item, answer) in zip(batch, answers) { item.done(answer) }
        }
        sendNext()
    }

    /// The connection failed with `batch` on it (committed or not, nobody knows): each of its
    /// statements fails, and the next batch goes on a new connection.
    private func fail(_ batch: [Item], _ error: ServiceError) {
        if socket >= 0 { executor.unwatch(socket) }
        socket = -1
        writing = false
        connection = nil
        for item in batch { item.done(.failure(error)) }
        sendNext()
    }

    /// Connects on a pool thread (connecting blocks); what waits is sent once connected, or fails
    /// with the reason when the server cannot be reached.
    private func connect() {
        guard waiting.withLock({ !$0.items.isEmpty }) else { return }
        connecting = true
        let url = pool.url, executor = self.executor
        pool.detach {
            let result = Result { () throws(ServiceError) in try PostgresConnection(url: url) }
            Task(executorPreference: executor) { self.connected(result) }
        }
    }

    private func connected(_ result: Result<PostgresConnection, ServiceError>) {
        connecting = false
        switch result {
        case .success(let connection):
            self.connection = connection
            sendNext()
        case .failure(let error):
            let items = waiting.withLock { waiting in
                defer { waiting.items = [] }
                return waiting.items
            }
            for item in items { item.done(.failure(error)) }
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
