import Glibc
import TalkMeshBase

/// `file://DIR`: each key is a file under the root. Writes go to a scratch file in `.tmp/` and are
/// renamed into place, so a reader never sees a partial blob and a full disk leaves nothing behind.
public struct FileBlobStore: BlobStore {
    public let root: String
    private var scratch: String { root + "/.tmp" }
    /// Files of retired blobs, kept in `.tmp/` for new scratch files (this process's own).
    private let spares = SpareFiles()

    public init(root: String) throws {
        var root = root
        while root.count > 1 && root.hasSuffix("/") { root.removeLast() }
        self.root = root
        try Self.makeDirectories(root)
        try Self.makeDirectories(root + "/.tmp")
    }

    func path(_ key: BlobKey) -> String { root + "/" + key.rawValue }

    public func withLocalFile<T>(_ key: BlobKey, _ body: (String) throws -> T) throws -> T {
        let path = path(key)
        var info = stat()
        guard stat(path, &info) == 0 else {
            if errno == ENOTDIR || errno == ENAMETOOLONG { throw Self.failure("stat", path) }
            throw ServiceError(.notFound, "no blob \(key)")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw ServiceError(.invalidKey, "the blob key \(key) names a directory, not a blob")
        }
        return try body(path)
    }

    public func store(_ key: BlobKey, fromFile source: String) throws {
        let destination = path(key)
        let directory = String(destination[..<destination.lastIndex(of: "/")!])
        // The directory usually exists: it is made (one mkdir per level of the path) only when
        // the rename says it is missing.
        if rename(source, destination) == 0 { return }
        var error = errno
        if error == ENOENT && access(source, F_OK) == 0 {
            try Self.makeDirectories(directory)
            if rename(source, destination) == 0 { return }
            error = errno
        }
        guard error == EXDEV else { throw Self.failure("rename", destination, error) }
        // Another filesystem: copy into scratch, then rename.
        let staged = try scratchPath(suffix: ".part")
        try Self.copy(source, staged)
        unlink(source)
        try Self.makeDirectories(directory)
        guard rename(staged, destination) == 0 else { unlink(staged); throw Self.failure("rename", destination) }
    }

    public func put(_ key: BlobKey, _ bytes: [UInt8]) throws {
        let staged = try scratchPath(suffix: ".part")
        do {
            try Self.writeAll(staged, bytes)
            try store(key, fromFile: staged)
        } catch {
            unlink(staged)
            throw error
        }
    }

    public func get(_ key: BlobKey) throws -> [UInt8] {
        try withLocalFile(key) { try Self.readAll($0) }
    }

    public func exists(_ key: BlobKey) throws -> Bool {
        var info = stat()
        return stat(path(key), &info) == 0
    }

    public func delete(_ key: BlobKey) throws {
        if unlink(path(key)) != 0 && errno != ENOENT { throw Self.failure("unlink", path(key)) }
    }

    /// The blob's file is kept (up to `SpareFiles.most` files, each of at most
    /// `SpareFiles.largest` bytes) to be a later scratch file, rather than unlinked. Creating a
    /// file costs an inode, and on ext4 without a journal (this project's build machine) the
    /// allocator skips, one by one, every inode freed in the last five minutes: with intermediates
    /// deleted by the thousand, creating the partial videos' files was 15–18 % of the
    /// Dispatcher's CPU (bench/dispatcher). A writer that takes the file writes over its blocks
    /// and cuts it to its own length. Only for blobs nobody reads any more.
    public func retire(_ key: BlobKey) throws {
        let path = path(key)
        var info = stat()
        if spares.hasRoom, stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, Int(info.st_size) <= SpareFiles.largest {
            let spare = try scratchPath(suffix: ".spare")
            if rename(path, spare) == 0 {
                spares.keep(spare)
                return
            }
        }
        try delete(key)
    }

    /// A retired file's path when one is kept (the caller writes over it from the start and cuts
    /// it to what it wrote), else a fresh `scratchPath`.
    public func reusableScratchPath(suffix: String) throws -> String {
        while let spare = spares.take() {
            if access(spare, F_OK) == 0 { return spare }
        }
        return try scratchPath(suffix: suffix)
    }

    public func scratchPath(suffix: String) throws -> String {
        var random = SystemRandomNumberGenerator()
        let name = String(UInt64.random(in: 0...UInt64.max, using: &random), radix: 36)
        return "\(scratch)/\(name)\(suffix)"
    }

    public func info(_ key: BlobKey) throws -> BlobInfo? {
        var info = stat()
        guard stat(path(key), &info) == 0 else {
            if errno == ENOENT { return nil }
            throw Self.failure("stat", path(key))
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else { return nil }
        // Size, modification time and inode: a blob written again gets a new tag.
        let stamp = "\(info.st_size)-\(info.st_mtim.tv_sec)\(info.st_mtim.tv_nsec)-\(info.st_ino)"
        return BlobInfo(size: Int(info.st_size), etag: "\"" + String(Digest.sha256Hex(stamp).prefix(32)) + "\"")
    }

    public func stream(_ key: BlobKey, range: Range<Int>?, _ consumer: ([UInt8]) throws -> Void) throws {
        try withLocalFile(key) { path in
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw Self.failure("open", path) }
            defer { close(fd) }
            var offset = range?.lowerBound ?? 0
            let end = range?.upperBound ?? Int.max
            var buffer = [UInt8](repeating: 0, count: 256 << 10)
            while offset < end {
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, min($0.count, end - offset), off_t(offset)) }
                if got < 0 { if errno == EINTR { continue }; throw Self.failure("read", path) }
                if got == 0 { break }
                try consumer(Array(buffer[0..<got]))
                offset += got
            }
        }
    }

    public func list(prefix: String) throws -> [BlobListing] {
        var out: [BlobListing] = []
        // The deepest directory the prefix names completely; names below it are filtered.
        let directory = prefix.lastIndex(of: "/").map { String(prefix[..<$0]) } ?? ""
        try walk(directory.isEmpty ? root : root + "/" + directory, relative: directory) { relative, size in
            if relative.hasPrefix(prefix), let key = try? BlobKey(relative) { out.append(BlobListing(key: key, size: size)) }
        }
        return out.sorted { $0.key.rawValue < $1.key.rawValue }
    }

    private func walk(_ directory: String, relative: String, _ visit: (String, Int) -> Void) throws {
        guard let handle = opendir(directory) else {
            if errno == ENOENT || errno == ENOTDIR { return }
            throw Self.failure("opendir", directory)
        }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
            if name == "." || name == ".." || (relative.isEmpty && name == ".tmp") { continue }
            let path = directory + "/" + name
            let child = relative.isEmpty ? name : relative + "/" + name
            var info = stat()
            guard lstat(path, &info) == 0 else { continue }
            switch info.st_mode & S_IFMT {
            case S_IFDIR: try walk(path, relative: child, visit)
            case S_IFREG: visit(child, Int(info.st_size))
            default: break
            }
        }
    }

    /// A directory has no URL of its own: the Gateway streams the blob instead.
    public func presignedURL(_ key: BlobKey, expiresSeconds: Int) -> String? { nil }
    public var isLocal: Bool { true }

    // MARK: Files

    /// A failed call on the store's files; the path and errno go in the cause (logged, not sent).
    public static func failure(_ what: String, _ path: String, _ error: Int32 = errno) -> ServiceError {
        let cause = "\(what) \(path): \(String(cString: strerror(error)))"
        if error == ENOSPC || error == EDQUOT {
            return ServiceError(.storageFull, "no space left in the blob store", cause: cause)
        }
        // The key itself is at fault: it names a directory, or a file where a directory is needed.
        if error == EISDIR || error == ENOTDIR || error == ENAMETOOLONG {
            return ServiceError(.invalidKey, "the blob key conflicts with the store's layout", cause: cause)
        }
        return ServiceError(.storageFailed, "the blob store failed (\(what))", cause: cause)
    }

    /// `mkdir -p`, from the deepest directory up: a store's directories mostly exist but for the
    /// last level (a job's first part), so that is one `mkdir`, not one per level of the path.
    static func makeDirectories(_ path: String) throws {
        if mkdir(path, 0o755) == 0 || errno == EEXIST { return }
        guard errno == ENOENT, let slash = path.lastIndex(of: "/"), slash != path.startIndex else { throw failure("mkdir", path) }
        try makeDirectories(String(path[..<slash]))
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw failure("mkdir", path) }
    }

    /// Writes a whole file and fsyncs it (the rename that follows publishes complete bytes).
    public static func writeAll(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw failure("open", path) }
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0 {
                if errno == EINTR { continue }
                let error = errno
                unlink(path)
                throw failure("write", path, error)
            }
            offset += written
        }
        if fsync(fd) != 0 {
            let error = errno
            unlink(path)
            throw failure("fsync", path, error)
        }
    }

    /// Reads a whole file: into an array of the size `fstat` gives (one copy, out of the page
    /// cache), and on past it if the file grew meanwhile.
    public static func readAll(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw errno == ENOENT ? ServiceError(.notFound, "no file \(path)") : failure("open", path) }
        defer { close(fd) }
        var info = stat()
        let expected = fstat(fd, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG ? Int(info.st_size) : 0
        var failed = false
        var out = [UInt8](unsafeUninitializedCapacity: expected) { buffer, count in
            while count < expected {
                let got = Glibc.read(fd, buffer.baseAddress! + count, expected - count)
                if got < 0 { if errno == EINTR { continue }; failed = true; return }
                if got == 0 { return }  // the file shrank
                count += got
            }
        }
        if failed { throw failure("read", path) }
        // At the end, as a rule: one byte's read says so before any buffer is made.
        var probe: UInt8 = 0
        while true {
            let got = Glibc.read(fd, &probe, 1)
            if got < 0 { if errno == EINTR { continue }; throw failure("read", path) }
            if got == 0 { return out }
            out.append(probe)
            break
        }
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = Glibc.read(fd, &buffer, buffer.count)
            if count < 0 { if errno == EINTR { continue }; throw failure("read", path) }
            if count == 0 { break }
            out.append(contentsOf: buffer[0..<count])
        }
        return out
    }

    /// Opens `path` for the duration of `body`, which reads up to `count` bytes at `offset` (fewer
    /// at the end of the file) as often as it likes: for headers read at a few scattered offsets.
    public static func withReader<T>(_ path: String, _ body: ((Int, Int) throws -> [UInt8]) throws -> T) throws -> T {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure("open", path) }
        defer { close(fd) }
        return try body { offset, count in
            guard offset >= 0, count > 0 else { return [] }
            var buffer = [UInt8](repeating: 0, count: count)
            var filled = 0
            while filled < count {
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + filled, count - filled, off_t(offset + filled)) }
                if got < 0 { if errno == EINTR { continue }; throw failure("read", path) }
                if got == 0 { break }
                filled += got
            }
            return Array(buffer[0..<filled])
        }
    }

    static func copy(_ source: String, _ destination: String) throws {
        try writeAll(destination, try readAll(source))
    }
}

/// Retired blobs' files, waiting in the scratch directory to be written over.
final class SpareFiles: Sendable {
    static let most = 64
    /// Larger files are deleted, not kept: the spares hold at most 64 × 4 MiB of disk.
    static let largest = 4 << 20
    private let paths = Locked<[String]>([])

    var hasRoom: Bool { paths.withLock { $0.count < Self.most } }
    func keep(_ path: String) { paths.withLock { $0.append(path) } }
    func take() -> String? { paths.withLock { $0.popLast() } }
}
