import TalkMeshBase

/// Every blob-store call counted and timed, by store kind, operation and outcome
/// (`talkmesh_blob_operations_total`, `talkmesh_blob_operation_duration_seconds`), for whichever
/// store it wraps; every service's store (`BlobSettings.makeStore`) is wrapped.
public final class MeteredBlobStore: BlobStore {
    public let inner: any BlobStore
    let kind: String

    public static let operations = CounterFamily("talkmesh_blob_operations_total", help: "Blob store calls, by store, operation and outcome.",
                                                 labels: ["store", "operation", "outcome"])
    public static let durations = HistogramFamily("talkmesh_blob_operation_duration_seconds", help: "Time of each blob store call, by store and operation.",
                                                  labels: ["store", "operation"],
                                                  bounds: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120])

    /// Prometheus text of every store in the process.
    public static func render() -> String { operations.render() + durations.render() }

    public init(_ inner: any BlobStore, kind: String) {
        self.inner = inner
        self.kind = kind
    }

    private func measured<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        let started = MonotonicClock.nanoseconds()
        do {
            let result = try body()
            Self.operations.increment([kind, operation, "ok"])
            Self.durations.observe([kind, operation], Double(MonotonicClock.nanoseconds() - started) / 1e9)
            return result
        } catch {
            Self.operations.increment([kind, operation, (error as? ServiceError)?.code.rawValue.lowercased() ?? "error"])
            Self.durations.observe([kind, operation], Double(MonotonicClock.nanoseconds() - started) / 1e9)
            throw error
        }
    }

    /// Counted, not timed: the time inside would be the body's own work.
    public func withLocalFile<T>(_ key: BlobKey, _ body: (String) throws -> T) throws -> T {
        Self.operations.increment([kind, "local_copy", "ok"])
        return try inner.withLocalFile(key, body)
    }
    public func store(_ key: BlobKey, fromFile path: String) throws { try measured("store") { try inner.store(key, fromFile: path) } }
    public func put(_ key: BlobKey, _ bytes: [UInt8]) throws { try measured("put") { try inner.put(key, bytes) } }
    public func get(_ key: BlobKey) throws -> [UInt8] { try measured("get") { try inner.get(key) } }
    public func exists(_ key: BlobKey) throws -> Bool { try measured("exists") { try inner.exists(key) } }
    public func delete(_ key: BlobKey) throws { try measured("delete") { try inner.delete(key) } }
    public func scratchPath(suffix: String) throws -> String { try inner.scratchPath(suffix: suffix) }
    public func retire(_ key: BlobKey) throws { try measured("delete") { try inner.retire(key) } }
    public func reusableScratchPath(suffix: String) throws -> String { try inner.reusableScratchPath(suffix: suffix) }
    public func info(_ key: BlobKey) throws -> BlobInfo? { try measured("info") { try inner.info(key) } }
    public func stream(_ key: BlobKey, range: Range<Int>?, _ consumer: ([UInt8]) throws -> Void) throws {
        try measured("stream") { try inner.stream(key, range: range, consumer) }
    }
    public func list(prefix: String) throws -> [BlobListing] { try measured("list") { try inner.list(prefix: prefix) } }
    public func presignedURL(_ key: BlobKey, expiresSeconds: Int) -> String? { inner.presignedURL(key, expiresSeconds: expiresSeconds) }
    public var isLocal: Bool { inner.isLocal }
}
