import Glibc
import TalkMeshBase

/// The settings of `BLOB_STORE=s3://bucket/prefix`:
///
/// | setting | default | meaning |
/// |---|---|---|
/// | `S3_ENDPOINT` | `https://s3.<region>.amazonaws.com` | R2, MinIO, a test server |
/// | `S3_REGION` | `us-east-1` (or `AWS_REGION`) | the signing region |
/// | `S3_PATH_STYLE` | `true` with `S3_ENDPOINT`, else `false` | `endpoint/bucket/key` vs `bucket.endpoint/key` |
/// | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` | — | credentials |
/// | `AWS_SHARED_CREDENTIALS_FILE`, `AWS_PROFILE` | — , `default` | credentials from a file instead |
/// | `S3_MULTIPART_THRESHOLD`, `S3_PART_SIZE` | 16 MiB, 8 MiB | when and how uploads go in parts |
/// | `S3_MAX_ATTEMPTS` | 5 | attempts per request (throttling, 5xx, transport failures) |
/// | `S3_SCRATCH_DIR` | `$TMPDIR/talkmesh-scratch` | local copies and outputs on their way in |
public struct S3Settings: Sendable {
    public var bucket: String
    public var prefix: String
    public var location: S3Location
    public var credentials: AWSCredentials
    public var multipartThreshold: Int
    public var partSize: Int
    public var maxAttempts: Int
    public var scratchDirectory: String

    public init(url: String, setting: (String) -> String?) throws {
        func bad(_ text: String) -> ServiceError { ServiceError(.invalidArgument, text) }
        let rest = url.dropFirst("s3://".count)
        let bucket = String(rest.prefix { $0 != "/" })
        guard (3...63).contains(bucket.count), bucket.allSatisfy({ $0.isLowercase || $0.isNumber || $0 == "-" || $0 == "." }) else {
            throw bad("BLOB_STORE=\(url): expected s3://bucket/prefix with a valid bucket name (3–63 of a-z 0-9 . -)")
        }
        self.bucket = bucket
        prefix = String(rest.dropFirst(bucket.count).drop { $0 == "/" })
        if !prefix.isEmpty { _ = try BlobKey(prefix) }
        let region = setting("S3_REGION") ?? setting("AWS_REGION") ?? "us-east-1"
        let endpoint = setting("S3_ENDPOINT")
        if let endpoint, !(endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://")) || endpoint.dropFirst(8).contains("/") {
            throw bad("S3_ENDPOINT=\(endpoint): expected http(s)://host[:port] with no path")
        }
        let pathStyle: Bool
        switch setting("S3_PATH_STYLE")?.lowercased() {
        case nil: pathStyle = endpoint != nil
        case "true", "1", "yes": pathStyle = true
        case "false", "0", "no": pathStyle = false
        case let other?: throw bad("S3_PATH_STYLE=\(other): expected true or false")
        }
        location = S3Location(endpoint: endpoint ?? "https://s3.\(region).amazonaws.com", region: region, bucket: bucket, pathStyle: pathStyle)
        credentials = try Self.credentials(setting)
        func size(_ name: String, _ fallback: Int) throws -> Int {
            guard let text = setting(name) else { return fallback }
            guard let value = Self.byteCount(text), value >= 5 << 20, value <= 5 << 30 else {
                throw bad("\(name)=\(text): expected a size from 5MiB to 5GiB (e.g. 8MiB)")
            }
            return value
        }
        multipartThreshold = try size("S3_MULTIPART_THRESHOLD", 16 << 20)
        partSize = try size("S3_PART_SIZE", 8 << 20)
        if let text = setting("S3_MAX_ATTEMPTS") {
            guard let value = Int(text), (1...20).contains(value) else { throw bad("S3_MAX_ATTEMPTS=\(text): expected 1…20") }
            maxAttempts = value
        } else {
            maxAttempts = 5
        }
        scratchDirectory = setting("S3_SCRATCH_DIR") ?? ((setting("TMPDIR") ?? "/tmp") + "/talkmesh-scratch")
    }

    public func open() throws -> S3BlobStore {
        let client = S3Client(location: location, credentials: credentials, maxAttempts: maxAttempts)
        return try S3BlobStore(client: client, prefix: prefix, scratchDirectory: scratchDirectory,
                               multipartThreshold: multipartThreshold, partSize: partSize)
    }

    /// From the environment, or from an AWS credentials file (`[profile]` sections of
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`).
    static func credentials(_ setting: (String) -> String?) throws -> AWSCredentials {
        if let id = setting("AWS_ACCESS_KEY_ID"), let secret = setting("AWS_SECRET_ACCESS_KEY") {
            return AWSCredentials(accessKeyID: id, secretAccessKey: secret, sessionToken: setting("AWS_SESSION_TOKEN"))
        }
        let profile = setting("AWS_PROFILE") ?? "default"
        let path = setting("AWS_SHARED_CREDENTIALS_FILE") ?? (setting("HOME").map { $0 + "/.aws/credentials" } ?? "")
        guard let bytes = try? FileBlobStore.readAll(path) else {
            throw ServiceError(.invalidArgument, "BLOB_STORE is s3:// but no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE")
        }
        var section = ""
        var values: [String: String] = [:]
        for raw in String(decoding: bytes, as: UTF8.self).split(whereSeparator: \.isNewline) {
            let line = raw.trimmingWhitespace
            if line.hasPrefix("#") || line.hasPrefix(";") || line.isEmpty { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                section = String(line.dropFirst().dropLast()).trimmingWhitespace
                continue
            }
            guard section == profile, let equals = line.firstIndex(of: "=") else { continue }
            values[String(line[..<equals]).trimmingWhitespace.lowercased()] = String(line[line.index(after: equals)...]).trimmingWhitespace
        }
        guard let id = values["aws_access_key_id"], let secret = values["aws_secret_access_key"] else {
            throw ServiceError(.invalidArgument, "\(path) has no aws_access_key_id and aws_secret_access_key under [\(profile)]")
        }
        return AWSCredentials(accessKeyID: id, secretAccessKey: secret, sessionToken: values["aws_session_token"])
    }

    /// `8388608`, `8MiB`, `8MB` (taken as MiB), `1GiB`.
    static func byteCount(_ text: String) -> Int? {
        let lowered = text.lowercased().trimmingWhitespace
        let digits = lowered.prefix { $0.isNumber }
        guard let number = Int(digits) else { return nil }
        switch lowered.dropFirst(digits.count) {
        case "", "b": return number
        case "k", "kb", "kib": return number << 10
        case "m", "mb", "mib": return number << 20
        case "g", "gb", "gib": return number << 30
        default: return nil
        }
    }
}
