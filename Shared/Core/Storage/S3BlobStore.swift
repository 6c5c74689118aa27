import Dispatch
import Glibc
import TalkMeshBase

/// `s3://bucket/prefix`: each key is an object `prefix/key` in an S3 bucket (AWS, R2, MinIO, any
/// S3 API). Local files exist only inside the calls that need them: `withLocalFile` downloads to
/// a scratch file removed when its closure returns, and `store(_:fromFile:)` uploads a finished
/// file (in parts above `multipartThreshold`, the upload aborted on failure) before the object
/// becomes visible under its key — S3 never shows a partial object.
public final class S3BlobStore: BlobStore {
    public let client: S3Client
    /// Prepended to every key (`""` or ending in `/`).
    public let prefix: String
    public let scratchDirectory: String
    public let multipartThreshold: Int
    public let partSize: Int
    /// The largest blob `get` reads into memory.
    public let memoryReadLimit: Int

    public init(client: S3Client, prefix: String, scratchDirectory: String, multipartThreshold: Int = 16 << 20,
                partSize: Int = 8 << 20, memoryReadLimit: Int = 1 << 30) throws {
        self.client = client
        var prefix = prefix
        while prefix.hasPrefix("/") { prefix.removeFirst() }
        if !prefix.isEmpty && !prefix.hasSuffix("/") { prefix += "/" }
        self.prefix = prefix
        self.scratchDirectory = scratchDirectory
        self.multipartThreshold = max(5 << 20, multipartThreshold)
        self.partSize = max(5 << 20, partSize)  // S3's smallest part but the last
        self.memoryReadLimit = memoryReadLimit
        try FileBlobStore.makeDirectories(scratchDirectory)
    }

    func object(_ key: BlobKey) -> String { prefix + key.rawValue }

    // MARK: BlobStore

    public func withLocalFile<T>(_ key: BlobKey, _ body: (String) throws -> T) throws -> T {
        let path = try scratchPath(suffix: ".blob")
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
        defer { unlink(path) }
        do {
            defer { close(fd) }
            let response = try client.request("GET", key: object(key), sink: .file(fd: fd))
            try check(response, key)
        }
        return try body(path)
    }

    public func store(_ key: BlobKey, fromFile path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw FileBlobStore.failure("stat", path) }
        let size = Int(info.st_size)
        if size > multipartThreshold {
            try uploadInParts(key, fd: fd, size: size)
        } else {
            try check(try client.request("PUT", key: object(key), headers: [("content-type", Self.contentType(key))],
                                         body: .file(fd: fd, offset: 0, length: size)), key)
        }
        unlink(path)  // moved in, as the file store's rename does
    }

    public func put(_ key: BlobKey, _ bytes: [UInt8]) throws {
        try check(try client.request("PUT", key: object(key), headers: [("content-type", Self.contentType(key))], body: .bytes(bytes)), key)
    }

    public func get(_ key: BlobKey) throws -> [UInt8] {
        let response = try client.request("GET", key: object(key), sink: .memory(limit: memoryReadLimit))
        try check(response, key)
        return response.body
    }

    public func exists(_ key: BlobKey) throws -> Bool {
        try info(key) != nil
    }

    public func delete(_ key: BlobKey) throws {
        let response = try client.request("DELETE", key: object(key))
        if response.status != 404 { try check(response, key) }
    }

    public func scratchPath(suffix: String) throws -> String {
        var random = SystemRandomNumberGenerator()
        return "\(scratchDirectory)/\(String(UInt64.random(in: 0...UInt64.max, using: &random), radix: 36))\(suffix)"
    }

    public func info(_ key: BlobKey) throws -> BlobInfo? {
        let response = try client.request("HEAD", key: object(key))
        if response.status == 404 { return nil }
        try check(response, key)
        guard let size = response.headers["content-length"].flatMap({ Int($0) }) else {
            throw ServiceError(.storageFailed, "S3 HEAD \(key) answered without a Content-Length")
        }
        return BlobInfo(size: size, etag: response.headers["etag"] ?? "")
    }

    public func stream(_ key: BlobKey, range: Range<Int>?, _ consumer: ([UInt8]) throws -> Void) throws {
        if let range, range.isEmpty { return }
        let headers = range.map { [("range", "bytes=\($0.lowerBound)-\($0.upperBound - 1)")] } ?? []
        try withoutActuallyEscaping(consumer) { consumer in
            let response = try client.request("GET", key: object(key), headers: headers, sink: .consumer(consumer))
            try check(response, key)
        }
    }

    public func list(prefix listed: String) throws -> [BlobListing] {
        var out: [BlobListing] = []
        var token: String?
        repeat {
            var query = [("list-type", "2"), ("prefix", prefix + listed)]
            if let token { query.append(("continuation-token", token)) }
            let response = try client.request("GET", key: nil, query: query, sink: .memory(limit: 16 << 20))
            try check(response, nil)
            let text = String(decoding: response.body, as: UTF8.self)[...]
            for contents in XMLText.elements("Contents", in: text) {
                guard let name = XMLText.first("Key", in: contents), name.hasPrefix(prefix),
                      let key = try? BlobKey(String(name.dropFirst(prefix.count))) else { continue }
                out.append(BlobListing(key: key, size: XMLText.first("Size", in: contents).flatMap { Int($0) } ?? 0))
            }
            token = XMLText.first("IsTruncated", in: text) == "true" ? XMLText.first("NextContinuationToken", in: text) : nil
        } while token != nil
        return out
    }

    public func presignedURL(_ key: BlobKey, expiresSeconds: Int) -> String? {
        client.presignedGetURL(key: object(key), expiresSeconds: expiresSeconds)
    }

    // MARK: Multipart

    /// Parts sent at once (each read from the file as curl sends it: no part is held in memory).
    static let partConcurrency = 4

    /// Create → one PUT per part (up to `partConcurrency` at once), read from the file as sent →
    /// complete; any failure aborts the upload so S3 keeps no orphaned parts.
    private func uploadInParts(_ key: BlobKey, fd: Int32, size: Int) throws {
        let name = object(key)
        let created = try client.request("POST", key: name, query: [("uploads", "")], headers: [("content-type", Self.contentType(key))])
        try check(created, key)
        guard let uploadID = XMLText.first("UploadId", in: created.body), !uploadID.isEmpty else {
            throw ServiceError(.storageFailed, "S3 did not start a multipart upload for \(key)")
        }
        do {
            let count = (size + partSize - 1) / partSize
            // Workers take the next part number until none is left or one failed.
            let state = Locked<(next: Int, etags: [String?], failure: (any Error)?)>((0, Array(repeating: nil, count: count), nil))
            DispatchQueue.concurrentPerform(iterations: min(Self.partConcurrency, count)) { _ in
                while true {
                    let index: Int? = state.withLock { state in
                        guard state.failure == nil, state.next < count else { return nil }
                        defer { state.next += 1 }
                        return state.next
                    }
                    guard let index else { return }
                    let offset = index * partSize
                    do {
                        let part = try client.request("PUT", key: name, query: [("partNumber", String(index + 1)), ("uploadId", uploadID)],
                                                      body: .file(fd: fd, offset: offset, length: min(partSize, size - offset)))
                        try check(part, key)
                        guard let etag = part.headers["etag"] else {
                            throw ServiceError(.storageFailed, "S3 accepted a part of \(key) without an ETag")
                        }
                        state.withLock { $0.etags[index] = etag }
                    } catch {
                        state.withLock { if $0.failure == nil { $0.failure = error } }
                        return
                    }
                }
            }
            let (etagsOrNil, failure) = state.withLock { ($0.etags, $0.failure) }
            if let failure { throw failure }
            let etags = etagsOrNil.compactMap { $0 }
            var document = "<CompleteMultipartUpload>"
            for (index, etag) in etags.enumerated() {
                document += "<Part><PartNumber>\(index + 1)</PartNumber><ETag>\(XMLText.escape(etag))</ETag></Part>"
            }
            document += "</CompleteMultipartUpload>"
            let completed = try client.request("POST", key: name, query: [("uploadId", uploadID)], headers: [("content-type", "application/xml")],
                                               body: .bytes(Array(document.utf8)))
            try check(completed, key)
            // S3 may answer 200 and still fail the completion, in the body.
            if XMLText.first("Code", in: completed.body) != nil && XMLText.first("ETag", in: completed.body) == nil {
                throw ServiceError(.storageFailed, "S3 could not complete the upload of \(key)", cause: XMLText.first("Message", in: completed.body))
            }
        } catch {
            _ = try? client.request("DELETE", key: name, query: [("uploadId", uploadID)])
            throw error
        }
    }

    // MARK: Errors

    /// A non-2xx answer as a ServiceError with S3's own code and message.
    private func check(_ response: S3Response, _ key: BlobKey?) throws {
        guard !(200..<300).contains(response.status) else { return }
        let code = S3Client.errorCode(response.body)
        let message = XMLText.first("Message", in: response.body) ?? ""
        let cause = "HTTP \(response.status)" + (code.isEmpty ? "" : " \(code)") + (message.isEmpty ? "" : ": \(message)")
        let target = key.map { "blob \($0)" } ?? "bucket \(client.location.bucket)"
        if response.status == 404 && (code == "NoSuchKey" || code.isEmpty) { throw ServiceError(.notFound, "no \(target)", cause: cause) }
        if response.status == 416 { throw ServiceError(.invalidArgument, "the range is outside \(target)", cause: cause) }
        throw ServiceError(.storageFailed, "S3 refused a request for \(target)", cause: cause)
    }

    static func contentType(_ key: BlobKey) -> String {
        switch key.rawValue.split(separator: ".").last.map({ $0.lowercased() }) {
        case "mp4": "video/mp4"
        case "png": "image/png"
        case "jpg", "jpeg": "image/jpeg"
        case "webp": "image/webp"
        case "wav": "audio/wav"
        case "m4a": "audio/mp4"
        case "mp3": "audio/mpeg"
        default: "application/octet-stream"
        }
    }
}
