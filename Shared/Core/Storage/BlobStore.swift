/// Where large bytes live (images, audio, chunks, videos). RPC messages carry keys, not bytes.
///
/// Media libraries want files: `withLocalFile` lends a readable local path for a key, and
/// `store(_:fromFile:)` moves a finished local file in as a whole (no partial blob is ever seen).
public protocol BlobStore: Sendable {
    /// Calls `body` with a local path holding the blob's bytes; NOT_FOUND when it does not exist.
    func withLocalFile<T>(_ key: BlobKey, _ body: (String) throws -> T) throws -> T
    /// Moves (or copies) a complete local file in under `key`, atomically.
    func store(_ key: BlobKey, fromFile path: String) throws
    /// Writes bytes under `key`, atomically.
    func put(_ key: BlobKey, _ bytes: [UInt8]) throws
    /// Reads a whole blob.
    func get(_ key: BlobKey) throws -> [UInt8]
    /// True when the key exists.
    func exists(_ key: BlobKey) throws -> Bool
    /// Removes a blob (no error when absent).
    func delete(_ key: BlobKey) throws
    /// A path for a scratch file that `store(_:fromFile:)` can move in cheaply (same filesystem).
    func scratchPath(suffix: String) throws -> String
}

/// Opens the store a `BLOB_STORE` URL names.
public enum BlobStores {
    /// `file:///absolute/dir` (created when missing).
    public static func open(_ url: String) throws -> any BlobStore {
        if url.hasPrefix("file://") {
            let path = String(url.dropFirst("file://".count))
            guard path.hasPrefix("/") else {
                throw ServiceError(.invalidArgument, "BLOB_STORE=\(url): expected file:///absolute/path")
            }
            return try FileBlobStore(root: path)
        }
        throw ServiceError(.invalidArgument, "BLOB_STORE=\(url): only file:///path is supported so far")
    }
}
