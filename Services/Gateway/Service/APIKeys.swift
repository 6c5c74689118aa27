import CTalkMesh
import Foundation
import TalkMeshBase
import TalkMeshCore

/// One API key as stored: never the key itself, only its SHA-256, with the key's limits.
public struct APIKey: Sendable, Equatable {
    public var id: String
    public var name: String
    /// Lower-case hex SHA-256 of the key.
    public var sha256: String
    /// Requests per second, and how many may come at once.
    public var rate: Double
    public var burst: Double
    /// Job creations per second, and how many at once.
    public var jobRate: Double
    public var jobBurst: Double
    /// Unfinished jobs the key may have at once.
    public var maxActiveJobs: Int
    public var createdAt: String
    public var revoked: Bool

    public init(id: String, name: String, sha256: String, rate: Double = 10, burst: Double = 20, jobRate: Double = 1,
                jobBurst: Double = 5, maxActiveJobs: Int = 5, createdAt: String = "", revoked: Bool = false) {
        self.id = id
        self.name = name
        self.sha256 = sha256
        self.rate = rate
        self.burst = burst
        self.jobRate = jobRate
        self.jobBurst = jobBurst
        self.maxActiveJobs = maxActiveJobs
        self.createdAt = createdAt
        self.revoked = revoked
    }
}

/// The API-key file (`API_KEYS_FILE`): JSON `{"keys": [{id, name, sha256, rate, burst, job_rate,
/// job_burst, max_active_jobs, created_at, revoked}]}`, written atomically (a new file renamed over).
public enum APIKeyFile {
    /// Reads the file; a missing file is an empty key set.
    public static func load(_ path: String) throws -> [APIKey] {
        guard let data = FileManager.default.contents(atPath: path) else {
            if access(path, F_OK) != 0 { return [] }
            throw ServiceError(.invalidArgument, "cannot read the API key file \(path)")
        }
        guard let root = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let entries = root["keys"] as? [[String: Any]] else {
            throw ServiceError(.invalidArgument, "\(path) is not an API key file ({\"keys\": [...]})")
        }
        return try entries.enumerated().map { index, entry in
            guard let id = entry["id"] as? String, let hash = entry["sha256"] as? String, hash.count == 64,
                  hash.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else {
                throw ServiceError(.invalidArgument, "\(path): key \(index) needs an id and a 64-hex-digit sha256")
            }
            func number(_ name: String, _ fallback: Double) -> Double { (entry[name] as? NSNumber)?.doubleValue ?? fallback }
            return APIKey(id: id, name: entry["name"] as? String ?? "", sha256: hash, rate: number("rate", 10), burst: number("burst", 20),
                          jobRate: number("job_rate", 1), jobBurst: number("job_burst", 5),
                          maxActiveJobs: Int(number("max_active_jobs", 5)), createdAt: entry["created_at"] as? String ?? "",
                          revoked: entry["revoked"] as? Bool ?? false)
        }
    }

    /// Writes the file atomically (mode 0600).
    public static func save(_ keys: [APIKey], to path: String) throws {
        let entries: [[String: Any]] = keys.map {
            ["id": $0.id, "name": $0.name, "sha256": $0.sha256, "rate": $0.rate, "burst": $0.burst, "job_rate": $0.jobRate,
             "job_burst": $0.jobBurst, "max_active_jobs": $0.maxActiveJobs, "created_at": $0.createdAt, "revoked": $0.revoked]
        }
        let data = try JSONSerialization.data(withJSONObject: ["keys": entries], options: [.prettyPrinted, .sortedKeys])
        let temporary = path + ".tmp-\(getpid())"
        guard FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o600]) else {
            throw ServiceError(.storageFailed, "cannot write \(temporary)")
        }
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw ServiceError(.storageFailed, "cannot replace \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// A new key: the secret to hand out once, and its record (which holds only the hash).
    public static func newKey(name: String, rate: Double, burst: Double, jobRate: Double, jobBurst: Double,
                              maxActiveJobs: Int) throws -> (secret: String, record: APIKey) {
        let id = "key_" + Hex.encode(try randomBytes(6))
        let secret = "tmk_" + Hex.encode(try randomBytes(24))
        let formatter = ISO8601DateFormatter()
        return (secret, APIKey(id: id, name: name, sha256: Digest.sha256Hex(secret), rate: rate, burst: burst, jobRate: jobRate,
                               jobBurst: jobBurst, maxActiveJobs: maxActiveJobs, createdAt: formatter.string(from: Date())))
    }

    static func randomBytes(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard RAND_bytes(&bytes, Int32(count)) == 1 else { throw ServiceError(.internalError, "RAND_bytes failed") }
        return bytes
    }
}

/// The keys the Gateway accepts, reloaded when the file changes (checked each second) or on
/// SIGHUP; a request in progress keeps the set it started with, and a file that fails to parse
/// leaves the last good set in place (with an error logged).
public final class KeyRing: @unchecked Sendable {
    private let lock = PThreadMutex()
    private var keys: [APIKey] = []
    /// Each key's SHA-256 as 32 bytes (the file's hex decoded once per load); empty if unreadable.
    private var digests: [[UInt8]] = []
    private var stamp: (Int, Int, UInt64) = (0, 0, 0)
    public let path: String

    public init(path: String) throws {
        self.path = path
        _ = try reload()
    }

    /// Re-reads the file when its modification time, size or inode changed (or when forced).
    /// Returns true when a new set was loaded.
    @discardableResult
    public func reload(force: Bool = false) throws -> Bool {
        var info = stat()
        let current: (Int, Int, UInt64) = stat(path, &info) == 0
            ? (Int(info.st_mtim.tv_sec) * 1_000_000_000 + Int(info.st_mtim.tv_nsec), Int(info.st_size), UInt64(info.st_ino)) : (0, 0, 0)
        if !force, lock.withLock({ stamp == current }) { return false }
        let loaded = try APIKeyFile.load(path)
        let decoded = loaded.map { Hex.bytes($0.sha256) ?? [] }
        lock.withLock {
            keys = loaded
            digests = decoded
            stamp = current
        }
        return true
    }

    public var count: Int { lock.withLock { keys.filter { !$0.revoked }.count } }

    /// The key a presented secret belongs to, or nil. Every stored hash is compared, each in
    /// constant time, so the time taken says nothing about which or how much matched.
    public func authenticate(_ secret: String) -> APIKey? {
        let presented = Digest.sha256(secret.utf8)
        let (candidates, stored) = lock.withLock { (keys, digests) }
        var found: APIKey?
        for (key, digest) in zip(candidates, stored) where Digest.constantTimeEqual(digest, presented) && !key.revoked {
            found = key
        }
        return found
    }
}
