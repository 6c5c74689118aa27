import CTalkMesh
import TalkMeshCore

/// One SQLite connection (the adapter: nothing else touches sqlite3). Not thread-safe: its owner
/// confines it to one thread. The connection and every statement are finalized by their owners.
final class SQLiteDatabase {
    private var handle: OpaquePointer?
    let path: String
    /// Prepared statements not in use, by their SQL: a statement is compiled once, not per call
    /// (compiling an UPDATE cost more than running it). At most `idleLimit` are kept.
    private var idle: [String: OpaquePointer] = [:]
    private static let idleLimit = 64

    /// Opens (creating) the database with WAL and `synchronous=NORMAL`: a committed transaction
    /// survives a killed process; only a power loss may roll back the last commits.
    /// `exclusive`: this connection alone uses the file, holding its lock from the first access
    /// until it closes (`locking_mode=EXCLUSIVE`, set before WAL is): the WAL index lives in its
    /// memory instead of a shared `-shm` file, and a transaction takes no file lock of its own
    /// (without it, each write cost five or six `fcntl` calls).
    init(path: String, exclusive: Bool = false) throws(ServiceError) {
        self.path = path
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nil)
        handle = db
        guard rc == SQLITE_OK else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            throw ServiceError(.storeUnavailable, "cannot open the job store", cause: "\(path): \(message)")
        }
        sqlite3_busy_timeout(db, 5000)
        if exclusive { try execute("PRAGMA locking_mode=EXCLUSIVE") }
        try execute("PRAGMA journal_mode=WAL")
        try execute("PRAGMA synchronous=NORMAL")
        try execute("PRAGMA foreign_keys=ON")
        // Up to 32 MB of pages in memory (SQLite's default is 2 MB): a few thousand jobs' rows
        // stay cached instead of being read back from the file on every write.
        try execute("PRAGMA cache_size=-32768")
    }

    deinit {
        for statement in idle.values { sqlite3_finalize(statement) }
        sqlite3_close_v2(handle)
    }

    /// Runs statements that return nothing.
    func execute(_ sql: String) throws(ServiceError) {
        var message: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(handle, sql, nil, nil, &message)
        defer { sqlite3_free(message) }
        guard rc == SQLITE_OK else { throw failure(rc, message.map { String(cString: $0) } ?? "") }
    }

    /// One statement, compiled or taken from the idle ones; it comes back (reset, its bindings
    /// cleared, so it holds no read snapshot) when its `SQLiteStatement` goes.
    func prepare(_ sql: String) throws(ServiceError) -> SQLiteStatement {
        if let statement = idle.removeValue(forKey: sql) { return SQLiteStatement(statement, sql: sql, database: self) }
        var statement: OpaquePointer?
        let rc = sqlite3_prepare_v2(handle, sql, -1, &statement, nil)
        guard rc == SQLITE_OK, let statement else { throw failure(rc, errorMessage) }
        return SQLiteStatement(statement, sql: sql, database: self)
    }

    /// A statement its user is done with: kept for the next `prepare` of the same SQL (one per
    /// SQL, up to `idleLimit`), else finalized.
    fileprivate func giveBack(_ statement: OpaquePointer, sql: String) {
        sqlite3_reset(statement)
        sqlite3_clear_bindings(statement)
        if idle[sql] == nil && idle.count < Self.idleLimit {
            idle[sql] = statement
        } else {
            sqlite3_finalize(statement)
        }
    }

    /// Runs `body` in one transaction (BEGIN IMMEDIATE: the write lock is taken at once).
    func transaction<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            try? execute("ROLLBACK")
            throw error
        }
    }

    var changes: Int { Int(sqlite3_changes(handle)) }
    var errorMessage: String { String(cString: sqlite3_errmsg(handle)) }

    func failure(_ rc: Int32, _ message: String) -> ServiceError {
        let code: ErrorCode = rc == SQLITE_FULL ? .storageFull : .storeUnavailable
        return ServiceError(code, "the job store failed", cause: "sqlite \(rc): \(message) (\(path))")
    }
}

/// A prepared statement in use, given back to its database (reset) when released.
final class SQLiteStatement {
    private let statement: OpaquePointer
    private let sql: String
    private let database: SQLiteDatabase
    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

    init(_ statement: OpaquePointer, sql: String, database: SQLiteDatabase) {
        self.statement = statement
        self.sql = sql
        self.database = database
    }

    deinit { database.giveBack(statement, sql: sql) }

    /// Binds positional values (1-based): String, Int64, Int, [UInt8], or nil for NULL.
    func bind(_ values: [Any?]) throws(ServiceError) {
        sqlite3_reset(statement)
        sqlite3_clear_bindings(statement)
        for (offset, value) in values.enumerated() {
            let index = Int32(offset + 1)
            let rc: Int32
            switch value {
            case nil: rc = sqlite3_bind_null(statement, index)
            case let text as String: rc = sqlite3_bind_text(statement, index, text, -1, Self.transient)
            case let number as Int64: rc = sqlite3_bind_int64(statement, index, number)
            case let number as Int: rc = sqlite3_bind_int64(statement, index, Int64(number))
            case let number as Int32: rc = sqlite3_bind_int64(statement, index, Int64(number))
            case let bytes as [UInt8]:
                rc = bytes.withUnsafeBytes { sqlite3_bind_blob(statement, index, $0.baseAddress, Int32($0.count), Self.transient) }
            default: preconditionFailure("SQLiteStatement.bind: unsupported \(type(of: value))")
            }
            guard rc == SQLITE_OK else { throw database.failure(rc, database.errorMessage) }
        }
    }

    /// Steps once: true when a row is available.
    func step() throws(ServiceError) -> Bool {
        let rc = sqlite3_step(statement)
        if rc == SQLITE_ROW { return true }
        if rc == SQLITE_DONE { return false }
        throw database.failure(rc, database.errorMessage)
    }

    /// Runs to completion.
    func run(_ values: [Any?] = []) throws(ServiceError) {
        try bind(values)
        while try step() {}
    }

    func int64(_ column: Int32) -> Int64 { sqlite3_column_int64(statement, column) }
    func text(_ column: Int32) -> String? {
        sqlite3_column_text(statement, column).map { String(cString: $0) }
    }
    func blob(_ column: Int32) -> [UInt8] {
        let count = Int(sqlite3_column_bytes(statement, column))
        guard count > 0, let base = sqlite3_column_blob(statement, column) else { return [] }
        return [UInt8](UnsafeRawBufferPointer(start: base, count: count))
    }
}
