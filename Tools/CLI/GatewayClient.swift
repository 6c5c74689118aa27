import CTalkMesh
import Foundation
import TalkMeshCore

/// A blocking libcurl client for the Gateway's REST API. The CLI makes one request at a time, so
/// an easy handle per request is all it needs; bodies stream (multipart uploads are read from
/// the files by libcurl, downloads go straight to disk, the events stream is handed over as it
/// arrives).
struct GatewayClient {
    struct Response {
        var status: Int
        var headers: [String: String]
        var body: [UInt8]

        /// The body as a JSON object (empty when it is not one).
        var object: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:] }
    }

    /// How a request failed, and the exit code the CLI reports it with.
    struct Failure: Error, CustomStringConvertible {
        var code: String
        var message: String
        var exitCode: Int32

        var description: String { "\(code): \(message)" }

        /// The Gateway's `{"error": {"code", "message"}}`, or the status when the body is not that.
        init(_ response: Response) {
            let error = response.object["error"] as? [String: Any]
            code = error?["code"] as? String ?? "HTTP_\(response.status)"
            message = error?["message"] as? String ?? String(decoding: response.body.prefix(300), as: UTF8.self)
            exitCode = 3
        }

        init(code: String, message: String, exitCode: Int32) {
            self.code = code
            self.message = message
            self.exitCode = exitCode
        }
    }

    var baseURL: String
    var apiKey: String
    var caFile: String?
    /// Seconds a request without a streamed body may take.
    var timeout = 60

    /// A JSON request; the answer whatever its status (callers decide what an error is).
    func send(_ method: String, _ path: String, json: [UInt8]? = nil) throws -> Response {
        try perform(method, path, sink: nil) { easy, transfer in
            if let json {
                transfer.headers = curl_slist_append(transfer.headers, "content-type: application/json")
                transfer.requestBody = json
                _ = tm_curl_easy_setopt_off(easy, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(json.count))
                _ = transfer.requestBody.withUnsafeMutableBytes { tm_curl_easy_setopt_ptr(easy, CURLOPT_POSTFIELDS, $0.baseAddress) }
            }
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_TIMEOUT, timeout)
        }
    }

    /// `POST /v1/jobs` as multipart/form-data: the two files are streamed from disk.
    func createJob(image: String, audio: String, fields: [(String, String)], idempotencyKey: String?) throws -> Response {
        try perform("POST", "/v1/jobs", sink: nil) { easy, transfer in
            let mime = curl_mime_init(easy)
            transfer.mime = mime
            for (name, file) in [("image", image), ("audio", audio)] {
                let part = curl_mime_addpart(mime)
                curl_mime_name(part, name)
                guard curl_mime_filedata(part, file) == CURLE_OK else {
                    throw Failure(code: "FILE_UNREADABLE", message: "cannot read \(file)", exitCode: 1)
                }
            }
            for (name, value) in fields {
                let part = curl_mime_addpart(mime)
                curl_mime_name(part, name)
                curl_mime_data(part, value, CURL_ZERO_TERMINATED)
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_MIMEPOST, UnsafeMutableRawPointer(mime))
            if let idempotencyKey { transfer.headers = curl_slist_append(transfer.headers, "idempotency-key: \(idempotencyKey)") }
        }
    }

    /// A GET whose 200 body goes to `file` (written beside it, then renamed, so a failed download
    /// never leaves a truncated file under the name); any other answer is returned in memory.
    func download(_ path: String, to file: String) throws -> Response {
        let partial = file + ".part"
        guard let handle = fopen(partial, "wb") else {
            throw Failure(code: "FILE_UNWRITABLE", message: "cannot write \(partial): \(String(cString: strerror(errno)))", exitCode: 1)
        }
        var writeFailed = false
        let response: Response
        do {
            response = try perform("GET", path, sink: { status, bytes in
                guard status == 200 else { return nil }  // an error body: kept in memory
                if fwrite(bytes.baseAddress, 1, bytes.count, handle) != bytes.count { writeFailed = true; return false }
                return true
            }) { _, _ in }
        } catch {
            fclose(handle)
            unlink(partial)
            throw error
        }
        let closed = fclose(handle) == 0
        guard response.status == 200 else { unlink(partial); return response }
        guard closed, !writeFailed, rename(partial, file) == 0 else {
            unlink(partial)
            throw Failure(code: "FILE_UNWRITABLE", message: "cannot write \(file): \(String(cString: strerror(errno)))", exitCode: 1)
        }
        return response
    }

    /// A GET whose 200 body is handed to `onData` as it arrives until it returns false (then the
    /// transfer stops, and that is not an error). Other answers are returned in memory.
    func stream(_ path: String, headers: [String] = [], onData: @escaping (UnsafeRawBufferPointer) -> Bool) throws -> Response {
        var stopped = false
        do {
            return try perform("GET", path, sink: { status, bytes in
                guard status == 200 else { return nil }
                if !onData(bytes) { stopped = true; return false }
                return true
            }) { _, transfer in
                for header in headers { transfer.headers = curl_slist_append(transfer.headers, header) }
            }
        } catch let failure as Failure where stopped && failure.code == "CURL_\(CURLE_WRITE_ERROR.rawValue)" {
            return Response(status: 200, headers: [:], body: [])
        }
    }

    /// Runs one transfer. `sink` (given the status) takes the body as it arrives: true to go on,
    /// false to stop, nil to keep it in memory instead.
    private func perform(_ method: String, _ path: String, sink: ((Int, UnsafeRawBufferPointer) -> Bool?)?,
                         configure: (UnsafeMutableRawPointer, Transfer) throws -> Void) throws -> Response {
        GatewayClient.globalInit
        guard let easy = curl_easy_init() else { throw Failure(code: "INTERNAL", message: "curl_easy_init failed", exitCode: 1) }
        let transfer = Transfer(easy: easy, sink: sink)
        defer { transfer.release() }
        _ = tm_curl_easy_setopt_str(easy, CURLOPT_URL, baseURL + path)
        _ = tm_curl_easy_setopt_str(easy, CURLOPT_CUSTOMREQUEST, method)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT, 10)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS)
        if let caFile { _ = tm_curl_easy_setopt_str(easy, CURLOPT_CAINFO, caFile) }
        transfer.headers = curl_slist_append(transfer.headers, "authorization: Bearer \(apiKey)")
        transfer.headers = curl_slist_append(transfer.headers, "expect:")
        try configure(easy, transfer)
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(transfer.headers))
        _ = transfer.errorBuffer.withUnsafeMutableBytes { tm_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, $0.baseAddress) }
        let context = Unmanaged.passUnretained(transfer).toOpaque()
        _ = tm_curl_easy_setopt_write(easy, CURLOPT_WRITEFUNCTION) { data, size, count, context in
            let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
            let bytes = UnsafeRawBufferPointer(start: data, count: size * count)
            return transfer.receive(bytes) ? size * count : 0
        }
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_WRITEDATA, context)
        _ = tm_curl_easy_setopt_write(easy, CURLOPT_HEADERFUNCTION) { data, size, count, context in
            let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
            transfer.header(UnsafeRawBufferPointer(start: data, count: size * count))
            return size * count
        }
        _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, context)
        let result = curl_easy_perform(easy)
        guard result == CURLE_OK else {
            let detail = transfer.errorBuffer.withUnsafeBytes { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            let message = detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail
            let unreachable = [CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST, CURLE_OPERATION_TIMEDOUT].contains(result)
            throw Failure(code: unreachable ? "GATEWAY_UNREACHABLE" : "CURL_\(result.rawValue)",
                          message: unreachable ? "\(baseURL): \(message) (is `talkmesh up` running?)" : message, exitCode: unreachable ? 2 : 3)
        }
        return Response(status: transfer.status, headers: transfer.responseHeaders, body: transfer.body)
    }

    private static let globalInit: Void = { curl_global_init(Int(CURL_GLOBAL_DEFAULT)) }()
}

/// One transfer's state, reached from libcurl's callbacks.
private final class Transfer {
    let easy: UnsafeMutableRawPointer
    let sink: ((Int, UnsafeRawBufferPointer) -> Bool?)?
    var headers: UnsafeMutablePointer<curl_slist>?
    var mime: OpaquePointer?
    var requestBody: [UInt8] = []
    var errorBuffer = [UInt8](repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
    var responseHeaders: [String: String] = [:]
    var body: [UInt8] = []
    var status = 0
    /// An in-memory answer (JSON, an error) is small; a larger one is not the Gateway's.
    static let memoryLimit = 16 << 20

    init(easy: UnsafeMutableRawPointer, sink: ((Int, UnsafeRawBufferPointer) -> Bool?)?) {
        self.easy = easy
        self.sink = sink
    }

    func header(_ line: UnsafeRawBufferPointer) {
        let text = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if text.hasPrefix("HTTP/") {
            responseHeaders = [:]  // a new response (after a 100 Continue, say)
            status = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
        } else if let colon = text.firstIndex(of: ":") {
            responseHeaders[text[..<colon].lowercased()] = text[text.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
    }

    func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        if let sink, let goOn = sink(status, bytes) { return goOn }
        guard body.count + bytes.count <= Self.memoryLimit else { return false }
        body.append(contentsOf: bytes)
        return true
    }

    func release() {
        curl_easy_cleanup(easy)
        curl_slist_free_all(headers)
        if let mime { curl_mime_free(mime) }
    }
}
