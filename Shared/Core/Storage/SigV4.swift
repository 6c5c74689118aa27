import Glibc
import TalkMeshBase

/// AWS credentials: an access key pair and, for temporary credentials, a session token.
public struct AWSCredentials: Sendable, Equatable {
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?

    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }
}

/// AWS Signature Version 4, as S3 checks it: header signing for requests and query-string
/// signing for presigned URLs. One implementation for both, so a URL we hand out is signed the
/// way our own requests are.
public struct SigV4: Sendable {
    public var credentials: AWSCredentials
    public var region: String
    public var service: String

    public init(credentials: AWSCredentials, region: String, service: String = "s3") {
        self.credentials = credentials
        self.region = region
        self.service = service
    }

    /// The hash S3 accepts in place of a payload's own.
    public static let unsignedPayload = "UNSIGNED-PAYLOAD"
    public static let emptyPayloadHash = Hex.encode(Digest.sha256([UInt8]()))

    /// `20130524T000000Z` and `20130524` for a Unix time.
    public static func timestamps(_ unixTime: Int) -> (dateTime: String, date: String) {
        var seconds = time_t(unixTime)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let date = "\(parts.tm_year + 1900)\(two(parts.tm_mon + 1))\(two(parts.tm_mday))"
        return (date + "T" + two(parts.tm_hour) + two(parts.tm_min) + two(parts.tm_sec) + "Z", date)
    }

    /// Signs a request: returns the headers to send (`authorization`, `x-amz-date`,
    /// `x-amz-content-sha256`, the session token if any) beside the caller's own. `path` is the
    /// URI path already encoded once (as sent); `query` unencoded pairs; `headers` those to sign
    /// (must include `host`).
    public func sign(method: String, path: String, query: [(String, String)], headers: [(String, String)],
                     payloadHash: String, unixTime: Int) -> [(String, String)] {
        let (dateTime, date) = Self.timestamps(unixTime)
        var signed = headers.map { ($0.0.lowercased(), Self.trimmed($0.1)) }
        signed.append(("x-amz-content-sha256", payloadHash))
        signed.append(("x-amz-date", dateTime))
        if let token = credentials.sessionToken { signed.append(("x-amz-security-token", token)) }
        signed.sort { $0.0 < $1.0 }
        let names = signed.map(\.0).joined(separator: ";")
        let canonical = [method, path, Self.canonicalQuery(query),
                         signed.map { "\($0.0):\($0.1)\n" }.joined(), names, payloadHash].joined(separator: "\n")
        let scope = "\(date)/\(region)/\(service)/aws4_request"
        let signature = self.signature(canonical, dateTime: dateTime, date: date, scope: scope)
        var out = signed.filter { $0.0.hasPrefix("x-amz-") }
        out.append(("authorization", "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyID)/\(scope), SignedHeaders=\(names), Signature=\(signature)"))
        return out
    }

    /// The query string of a presigned URL (without `?`): anyone holding it may make this one
    /// request (`host` is the only signed header) until `expires` seconds after `unixTime`.
    public func presignedQuery(method: String, path: String, host: String, query: [(String, String)] = [],
                               expires: Int, unixTime: Int) -> String {
        let (dateTime, date) = Self.timestamps(unixTime)
        let scope = "\(date)/\(region)/\(service)/aws4_request"
        var pairs = query
        pairs.append(("X-Amz-Algorithm", "AWS4-HMAC-SHA256"))
        pairs.append(("X-Amz-Credential", "\(credentials.accessKeyID)/\(scope)"))
        pairs.append(("X-Amz-Date", dateTime))
        pairs.append(("X-Amz-Expires", String(expires)))
        if let token = credentials.sessionToken { pairs.append(("X-Amz-Security-Token", token)) }
        pairs.append(("X-Amz-SignedHeaders", "host"))
        let canonicalQuery = Self.canonicalQuery(pairs)
        let canonical = [method, path, canonicalQuery, "host:\(host)\n", "host", Self.unsignedPayload].joined(separator: "\n")
        let signature = self.signature(canonical, dateTime: dateTime, date: date, scope: scope)
        return canonicalQuery + "&X-Amz-Signature=" + signature
    }

    private func signature(_ canonicalRequest: String, dateTime: String, date: String, scope: String) -> String {
        let toSign = "AWS4-HMAC-SHA256\n\(dateTime)\n\(scope)\n" + Digest.sha256Hex(canonicalRequest)
        var key = Digest.hmacSHA256(key: Array(("AWS4" + credentials.secretAccessKey).utf8), Array(date.utf8))
        for part in [region, service, "aws4_request"] { key = Digest.hmacSHA256(key: key, Array(part.utf8)) }
        return Hex.encode(Digest.hmacSHA256(key: key, Array(toSign.utf8)))
    }

    /// Pairs sorted by encoded name then value, each side percent-encoded (everything but
    /// `A-Z a-z 0-9 - . _ ~`).
    public static func canonicalQuery(_ pairs: [(String, String)]) -> String {
        pairs.map { (encode($0.0), encode($0.1)) }
            .sorted { $0.0 == $1.0 ? $0.1 < $1.1 : $0.0 < $1.0 }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// RFC 3986 percent-encoding as SigV4 wants it; `/` kept when `keepSlash` (object paths).
    public static func encode(_ text: String, keepSlash: Bool = false) -> String {
        let digits = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(byte)
            case UInt8(ascii: "/") where keepSlash:
                out.append(byte)
            default:
                out += [UInt8(ascii: "%"), digits[Int(byte >> 4)], digits[Int(byte & 0xF)]]
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func trimmed(_ value: String) -> String {
        // Leading/trailing spaces removed, inner runs of spaces collapsed to one.
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    }
}
