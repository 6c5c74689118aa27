import CTalkMesh
import Glibc
import TalkMeshBase

/// Where an S3 bucket is and how to reach it.
public struct S3Location: Sendable {
    /// `http(s)://host[:port]` without a path: AWS's regional endpoint by default, or R2, MinIO,
    /// a test server.
    public var endpoint: String
    public var region: String
    public var bucket: String
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    public var pathStyle: Bool

    public init(endpoint: String, region: String, bucket: String, pathStyle: Bool) {
        var endpoint = endpoint
        while endpoint.hasSuffix("/") { endpoint.removeLast() }
        self.endpoint = endpoint
        self.region = region
        self.bucket = bucket
        self.pathStyle = pathStyle
    }

    var scheme: String { endpoint.hasPrefix("https://") ? "https" : "http" }
    var endpointHost: String { String(endpoint.dropFirst(scheme.count + 3)) }
    /// The `Host` a request carries (and signs).
    var host: String { pathStyle ? endpointHost : bucket + "." + endpointHost }
    /// The URI path of an object (encoded once, as sent and signed); of the bucket when `key` is nil.
    func path(_ key: String?) -> String {
        let object = key.map { SigV4.encode($0, keepSlash: true) }
        if pathStyle { return "/" + bucket + (object.map { "/" + $0 } ?? "") }
        return "/" + (object ?? "")
    }
}

/// An answer from S3.
struct S3Response {
    var status: Int
    var headers: [String: String]
    var body: [UInt8]
}

/// What a request sends: nothing, bytes, or a slice of an open file read as it goes.
enum S3Body {
    case none
    case bytes([UInt8])
    case file(fd: Int32, offset: Int, length: Int)

    var length: Int {
        switch self {
        case .none: 0
        case .bytes(let bytes): bytes.count
        case .file(_, _, let length): length
        }
    }
}

/// Where a successful answer's body goes: memory (bounded), an open file, or a consumer. An
/// error answer's body always goes to memory (S3's `<Error>` document).
enum S3Sink {
    case memory(limit: Int)
    case file(fd: Int32)
    case consumer(([UInt8]) throws -> Void)
}

/// A small, synchronous S3 client on libcurl's easy interface, meant for blocking threads (the
/// services' work pools): requests are signed with SigV4, idle easy handles are kept so their
/// connections are reused, and throttling (429, 503 SlowDown), 5xx and transport failures are
/// retried with exponential backoff and jitter. Bodies stream: a file is read slice by slice as
/// curl sends it, and a download is written as it arrives.
public final class S3Client: @unchecked Sendable {
    public let location: S3Location
    public let signer: SigV4
    /// Attempts per request, the first included.
    public let maxAttempts: Int
    /// The first retry's delay; it doubles each time, up to `maxBackoff` (jitter: a random half to all of it).
    public let baseBackoffMilliseconds: Int
    public let maxBackoffMilliseconds: Int
    /// Whole-request time limit; large parts and downloads scale it by size.
    public let timeoutMilliseconds: Int
    private let idle = Locked<[UnsafeMutableRawPointer]>([])
    private static let globalInit: Void = { curl_global_init(Int(CURL_GLOBAL_DEFAULT)) }()

    public init(location: S3Location, credentials: AWSCredentials, maxAttempts: Int = 5, baseBackoffMilliseconds: Int = 100,
                maxBackoffMilliseconds: Int = 5_000, timeoutMilliseconds: Int = 60_000) {
        Self.globalInit
        self.location = location
        signer = SigV4(credentials: credentials, region: location.region)
        self.maxAttempts = max(1, maxAttempts)
        self.baseBackoffMilliseconds = baseBackoffMilliseconds
        self.maxBackoffMilliseconds = maxBackoffMilliseconds
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    deinit {
        for handle in idle.withLock({ $0 }) { curl_easy_cleanup(handle) }
    }

    /// One request, retried while the failure is one a retry can cure. Returns the answer for
    /// any status S3 chose deliberately (2xx–4xx); throws STORAGE_UNAVAILABLE when retries ran out.
    func request(_ method: String, key: String?, query: [(String, String)] = [], headers: [(String, String)] = [],
                 body: S3Body = .none, sink: S3Sink = .memory(limit: 1 << 20)) throws -> S3Response {
        var attempt = 0
        while true {
            attempt += 1
            if case .file(let fd) = sink { _ = ftruncate(fd, 0); _ = lseek(fd, 0, SEEK_SET) }
            var delivered = false
            let reason: String
            do {
                let response = try perform(method, key: key, query: query, headers: headers, body: body, sink: sink, delivered: &delivered)
                let code = response.status >= 300 ? S3Client.errorCode(response.body) : ""
                guard response.status == 429 || response.status >= 500 || ["SlowDown", "RequestTimeout", "InternalError"].contains(code) else {
                    return response
                }
                reason = "HTTP \(response.status) \(code)"
            } catch let failure as S3TransportError {
                reason = failure.description  // refused, reset, timed out: always worth another try
            }
            // A consumer already handed bytes cannot be handed them again.
            guard attempt < maxAttempts, !delivered else {
                throw ServiceError(.storageUnavailable, "S3 \(method) \(key ?? location.bucket) failed after \(attempt) attempt(s)", cause: reason)
            }
            let ceiling = min(maxBackoffMilliseconds, baseBackoffMilliseconds << min(attempt - 1, 20))
            let delay = Int.random(in: ceiling / 2...max(ceiling / 2, ceiling))
            usleep(useconds_t(delay * 1000))
        }
    }

    /// The `<Code>` of an S3 error document ("" when none).
    static func errorCode(_ body: [UInt8]) -> String {
        XMLText.first("Code", in: body) ?? ""
    }

    /// One signed request on a reused easy handle.
    private func perform(_ method: String, key: String?, query: [(String, String)], headers: [(String, String)],
                         body: S3Body, sink: S3Sink, delivered: inout Bool) throws -> S3Response {
        let handle = idle.withLock { $0.popLast() } ?? curl_easy_init()
        guard let easy = handle else { throw ServiceError(.internalError, "curl_easy_init failed") }
        let transfer = S3Transfer(body: body, sink: sink)
        var list: UnsafeMutablePointer<curl_slist>?
        defer {
            curl_slist_free_all(list)
            curl_easy_reset(easy)  // keeps the handle's connections for the next request
            let kept = idle.withLock { handles -> Bool in
                guard handles.count < 32 else { return false }
                handles.append(easy)
                return true
            }
            if !kept { curl_easy_cleanup(easy) }
        }
        let path = location.path(key)
        let queryText = SigV4.canonicalQuery(query)
        let url = location.scheme + "://" + location.host + path + (queryText.isEmpty ? "" : "?" + queryText)
        var signedHeaders = headers
        signedHeaders.append(("host", location.host))
        let payloadHash: String
        switch body {
        case .none: payloadHash = SigV4.emptyPayloadHash
        case .bytes(let bytes): payloadHash = Hex.encode(Digest.sha256(bytes))
        case .file(let fd, let offset, let length):
            // Over TLS the transport protects the bytes (as the AWS SDKs do); over plain HTTP the
            // payload is hashed and signed so a corrupted body is refused.
            payloadHash = location.scheme == "https" ? SigV4.unsignedPayload : try Self.hashFile(fd, offset: offset, length: length)
        }
        let now = Int(time(nil))
        var all = headers
        all += signer.sign(method: method, path: path, query: query, headers: signedHeaders, payloadHash: payloadHash, unixTime: now)
        for (name, value) in all { list = curl_slist_append(list, "\(name): \(value)") }
        list = curl_slist_append(list, "Expect:")
        _ = tm_curl_easy_setopt_str(easy, CURLOPT_URL, url)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT_MS, 10_000)
        // Slow transfers are cut by a minimum speed rather than a total time, so a 5 GB part
        // is not timed out for being large: under 16 KiB/s for the timeout's length fails.
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_LOW_SPEED_LIMIT, 16 << 10)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_LOW_SPEED_TIME, max(1, timeoutMilliseconds / 1000))
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYPEER, 1)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYHOST, 2)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_TCP_KEEPALIVE, 1)
        if method == "HEAD" {
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOBODY, 1)
        } else {
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_CUSTOMREQUEST, method)
        }
        if method == "PUT" || method == "POST" || body.length > 0 {
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_UPLOAD, 1)
            _ = tm_curl_easy_setopt_off(easy, CURLOPT_INFILESIZE_LARGE, curl_off_t(body.length))
            _ = tm_curl_easy_setopt_write(easy, CURLOPT_READFUNCTION, s3ReadCallback)
        }
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(list))
        var errorBuffer = [CChar](repeating: 0, count: Int(CURL_ERROR_SIZE))
        let context = Unmanaged.passUnretained(transfer).toOpaque()
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_READDATA, context)
        _ = tm_curl_easy_setopt_write(easy, CURLOPT_WRITEFUNCTION, s3WriteCallback)
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_WRITEDATA, context)
        _ = tm_curl_easy_setopt_write(easy, CURLOPT_HEADERFUNCTION, s3HeaderCallback)
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, context)
        let result = errorBuffer.withUnsafeMutableBytes { buffer -> CURLcode in
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, buffer.baseAddress)
            return withExtendedLifetime(transfer) { curl_easy_perform(easy) }
        }
        delivered = transfer.delivered
        if let failure = transfer.failure { throw failure }
        guard result == CURLE_OK else {
            let detail = cString(errorBuffer)
            throw S3TransportError(code: Int(result.rawValue), message: detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail)
        }
        var status = 0
        _ = tm_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
        return S3Response(status: status, headers: transfer.headers, body: transfer.memory)
    }

    /// Hex SHA-256 of a file slice, read in 256 KiB pieces.
    static func hashFile(_ fd: Int32, offset: Int, length: Int) throws -> String {
        var digest = Digest.Incremental()
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        var done = 0
        while done < length {
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, min($0.count, length - done), off_t(offset + done)) }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { throw ServiceError(.storageFailed, "the file to upload ended early") }
            buffer.withUnsafeBytes { digest.update(UnsafeRawBufferPointer(rebasing: $0[0..<got])) }
            done += got
        }
        return Hex.encode(digest.finish())
    }

    // MARK: Presigned URLs

    /// A URL that lets anyone holding it GET the object until it expires.
    public func presignedGetURL(key: String, expiresSeconds: Int, now: Int = Int(time(nil))) -> String {
        let path = location.path(key)
        let query = signer.presignedQuery(method: "GET", path: path, host: location.host, expires: expiresSeconds, unixTime: now)
        return location.scheme + "://" + location.host + path + "?" + query
    }
}

/// A transport failure (refused, reset, timed out): always worth a retry.
struct S3TransportError: Error, CustomStringConvertible {
    var code: Int
    var message: String
    var description: String { "curl error \(code): \(message)" }
}

/// One request's state, seen by curl's callbacks.
final class S3Transfer {
    let body: S3Body
    let sink: S3Sink
    var sent = 0
    var status = 0
    var headers: [String: String] = [:]
    var memory: [UInt8] = []
    var delivered = false
    var failure: (any Error)?

    init(body: S3Body, sink: S3Sink) {
        self.body = body
        self.sink = sink
    }

    /// Bytes curl asks for, from the body.
    func read(into buffer: UnsafeMutablePointer<CChar>, capacity: Int) -> Int {
        let want = min(capacity, body.length - sent)
        guard want > 0 else { return 0 }
        switch body {
        case .none: return 0
        case .bytes(let bytes):
            bytes.withUnsafeBytes { source in
                UnsafeMutableRawPointer(buffer).copyMemory(from: source.baseAddress! + sent, byteCount: want)
            }
            sent += want
            return want
        case .file(let fd, let offset, _):
            while true {
                let got = pread(fd, buffer, want, off_t(offset + sent))
                if got < 0 && errno == EINTR { continue }
                guard got > 0 else { return Int(CURL_READFUNC_ABORT) }
                sent += got
                return got
            }
        }
    }

    /// Bytes curl received, to the sink (an error answer to memory, bounded).
    func write(_ bytes: UnsafeRawBufferPointer) -> Int {
        if status >= 300 || status == 0 {
            guard memory.count + bytes.count <= 1 << 20 else { return 0 }
            memory.append(contentsOf: bytes)
            return bytes.count
        }
        switch sink {
        case .memory(let limit):
            guard memory.count + bytes.count <= limit else {
                failure = ServiceError(.storageFailed, "the object is larger than the \(limit) bytes this read allows")
                return 0
            }
            memory.append(contentsOf: bytes)
        case .file(let fd):
            var done = 0
            while done < bytes.count {
                let wrote = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
                if wrote < 0 && errno == EINTR { continue }
                guard wrote > 0 else {
                    let error = errno
                    failure = ServiceError(error == ENOSPC ? .storageFull : .storageFailed, "cannot write the downloaded object",
                                           cause: String(cString: strerror(error)))
                    return 0
                }
                done += wrote
            }
        case .consumer(let consume):
            do {
                delivered = true
                try consume(Array(bytes))
            } catch {
                failure = error
                return 0
            }
        }
        return bytes.count
    }

    /// One header line; a status line starts a new set (after `100 Continue`, say).
    func header(_ line: String) {
        if line.hasPrefix("HTTP/") {
            let parts = line.split(separator: " ")
            status = parts.count > 1 ? Int(parts[1]) ?? 0 : 0
            headers = [:]
            memory = []
        } else if let colon = line.firstIndex(of: ":") {
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingWhitespace
        }
    }
}

private let s3ReadCallback: tm_curl_write_callback = { buffer, size, count, context in
    Unmanaged<S3Transfer>.fromOpaque(context!).takeUnretainedValue().read(into: buffer!, capacity: size * count)
}

private let s3WriteCallback: tm_curl_write_callback = { data, size, count, context in
    Unmanaged<S3Transfer>.fromOpaque(context!).takeUnretainedValue().write(UnsafeRawBufferPointer(start: data, count: size * count))
}

private let s3HeaderCallback: tm_curl_write_callback = { data, size, count, context in
    let length = size * count
    let line = String(decoding: UnsafeRawBufferPointer(start: data, count: length), as: UTF8.self)
    Unmanaged<S3Transfer>.fromOpaque(context!).takeUnretainedValue().header(line)
    return length
}

/// Just enough XML for S3's answers: the text of elements by name. S3's documents are flat and
/// machine-written; this never builds a tree.
enum XMLText {
    /// The inner XML of every `<name>…</name>` in order, undecoded.
    static func elements(_ name: String, in text: Substring) -> [Substring] {
        var out: [Substring] = []
        var rest = text
        let open = "<\(name)>", close = "</\(name)>"
        while let start = rest.firstRange(of: open), let end = rest[start.upperBound...].firstRange(of: close) {
            out.append(rest[start.upperBound..<end.lowerBound])
            rest = rest[end.upperBound...]
        }
        return out
    }

    /// The decoded text of the first `<name>…</name>`.
    static func first(_ name: String, in text: Substring) -> String? { elements(name, in: text).first.map(decode) }

    static func first(_ name: String, in body: [UInt8]) -> String? { first(name, in: String(decoding: body, as: UTF8.self)[...]) }

    static func decode(_ text: Substring) -> String {
        guard text.contains("&") else { return String(text) }
        return String(text).replacing("&lt;", with: "<").replacing("&gt;", with: ">").replacing("&quot;", with: "\"")
            .replacing("&apos;", with: "'").replacing("&#34;", with: "\"").replacing("&#39;", with: "'")
            .replacing("&#xD;", with: "\r").replacing("&#xA;", with: "\n").replacing("&amp;", with: "&")
    }

    static func escape(_ text: String) -> String {
        text.replacing("&", with: "&amp;").replacing("<", with: "&lt;").replacing(">", with: "&gt;").replacing("\"", with: "&quot;")
    }
}
