import Glibc

/// A stored blob's size and entity tag (changes when the bytes do).
public struct BlobInfo: Sendable, Equatable {
    public var size: Int
    public var etag: String

    public init(size: Int, etag: String) {
        self.size = size
        self.etag = etag
    }
}

/// One blob found by `list(prefix:)`.
public struct BlobListing: Sendable, Equatable {
    public var key: BlobKey
    public var size: Int
}

/// Where large bytes live (images, audio, chunks, videos). RPC messages carry keys, not bytes.
///
/// The contract holds for a local directory and for S3 alike. Media libraries want files:
/// `withLocalFile` lends a readable local path for a key, valid only inside its closure (with S3
/// it is a downloaded copy, removed when the closure returns), and outputs are written to a
/// `scratchPath` and moved in whole by `store(_:fromFile:)` — no reader ever sees a partial blob.
/// Every call blocks: run them on a work pool, never on an event loop.
public protocol BlobStore: Sendable {
    /// Calls `body` with a local path holding the blob's bytes; NOT_FOUND when it does not exist.
    /// The path must not be used after `body` returns.
    func withLocalFile<T>(_ key: BlobKey, _ body: (String) throws -> T) throws -> T
    /// Moves a complete local file in under `key` (the file is gone afterwards); atomic.
    func store(_ key: BlobKey, fromFile path: String) throws
    /// Writes bytes under `key`, atomically.
    func put(_ key: BlobKey, _ bytes: [UInt8]) throws
    /// Reads a whole blob.
    func get(_ key: BlobKey) throws -> [UInt8]
    /// True when the key exists.
    func exists(_ key: BlobKey) throws -> Bool
    /// Removes a blob (no error when absent).
    func delete(_ key: BlobKey) throws
    /// A path for a local scratch file that `store(_:fromFile:)` can take in cheaply.
    func scratchPath(suffix: String) throws -> String
    /// Size and entity tag, or nil when the blob does not exist.
    func info(_ key: BlobKey) throws -> BlobInfo?
    /// Hands the blob's bytes (or those in `range`) to `consumer` as they are read, in slices.
    func stream(_ key: BlobKey, range: Range<Int>?, _ consumer: ([UInt8]) throws -> Void) throws
    /// Every blob whose key starts with `prefix`.
    func list(prefix: String) throws -> [BlobListing]
    /// A URL anyone may GET the blob from until it expires, or nil when the store has none
    /// (a local directory).
    func presignedURL(_ key: BlobKey, expiresSeconds: Int) -> String?
    /// True when calls are local file operations (microseconds from the page cache), which a
    /// caller may make in place rather than on a work pool; false for a network store.
    var isLocal: Bool { get }
    /// Deletes a blob nobody reads any more (a rendered chunk's audio, an ended job's
    /// intermediates). A local store may keep its file for a later `reusableScratchPath` instead
    /// of unlinking it.
    func retire(_ key: BlobKey) throws
    /// `scratchPath`, but the path may already hold a retired file: the writer writes from its
    /// start and cuts it to what it wrote (or truncates it first), and its inode is reused
    /// instead of a new one allocated.
    func reusableScratchPath(suffix: String) throws -> String
}

extension BlobStore {
    public var isLocal: Bool { false }
    public func retire(_ key: BlobKey) throws { try delete(key) }
    public func reusableScratchPath(suffix: String) throws -> String { try scratchPath(suffix: suffix) }

    /// The total size of the blobs `keys` name (an absent one counts 0); nil when a key is invalid
    /// or the store cannot answer. Blocks.
    public func totalSize(_ keys: [String]) -> Int? {
        try? keys.reduce(0) { $0 + (try info(try BlobKey($1))?.size ?? 0) }
    }

    /// Local paths for several blobs at once, all valid inside `body` only.
    public func withLocalFiles<T>(_ keys: [BlobKey], _ body: ([String]) throws -> T) throws -> T {
        func nest(_ index: Int, _ paths: [String]) throws -> T {
            guard index < keys.count else { return try body(paths) }
            return try withLocalFile(keys[index]) { try nest(index + 1, paths + [$0]) }
        }
        return try nest(0, [])
    }

    /// The bytes in `range` (fewer at the blob's end).
    public func read(_ key: BlobKey, range: Range<Int>) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(range.count)
        try stream(key, range: range) { out += $0 }
        return out
    }
}

/// Opens the store a `BLOB_STORE` URL names.
public enum BlobStores {
    /// `file:///absolute/dir` (created when missing) or `s3://bucket[/prefix]` with the S3
    /// settings read through `setting` (see `S3Settings`).
    public static func open(_ url: String, setting: (String) -> String? = { getenv($0).map { String(cString: $0) } }) throws -> any BlobStore {
        if url.hasPrefix("file://") {
            let path = String(url.dropFirst("file://".count))
            guard path.hasPrefix("/") else {
                throw ServiceError(.invalidArgument, "BLOB_STORE=\(url): expected file:///absolute/path")
            }
            return try FileBlobStore(root: path)
        }
        if url.hasPrefix("s3://") {
            return try S3Settings(url: url, setting: setting).open()
        }
        throw ServiceError(.invalidArgument, "BLOB_STORE=\(url): expected file:///absolute/path or s3://bucket/prefix")
    }
}
