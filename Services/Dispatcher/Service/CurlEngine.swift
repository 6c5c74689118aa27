import CTalkMesh
import Glibc
import TalkMeshCore
import TalkMeshRPC

/// An HTTP exchange's result.
public struct HTTPExchange: Sendable {
    public var status: Int
    public var headers: [String: String]
    public var body: [UInt8]
}

/// libcurl's multi interface driven by one dedicated thread (never a thread per request): many
/// transfers at once, connections reused, HTTP/2 where the server offers it, TLS verified.
public final class CurlEngine: @unchecked Sendable {
    final class Transfer {
        let easy: UnsafeMutableRawPointer
        var headers: UnsafeMutablePointer<curl_slist>?
        var body: [UInt8] = []
        var responseHeaders: [String: String] = [:]
        var requestBody: [UInt8]
        var errorBuffer = [CChar](repeating: 0, count: Int(CURL_ERROR_SIZE))
        let continuation: CheckedContinuation<HTTPExchange, any Error>
        var bodyLimit: Int

        init(easy: UnsafeMutableRawPointer, requestBody: [UInt8], bodyLimit: Int, continuation: CheckedContinuation<HTTPExchange, any Error>) {
            self.easy = easy
            self.requestBody = requestBody
            self.bodyLimit = bodyLimit
            self.continuation = continuation
        }
    }

    private let multi: UnsafeMutableRawPointer
    private let mutex = PThreadMutex()
    private var incoming: [Transfer] = []
    private var running: [UnsafeMutableRawPointer: Transfer] = [:]
    private static let globalInit: Void = { curl_global_init(Int(CURL_GLOBAL_DEFAULT)) }()

    public init() {
        Self.globalInit
        multi = curl_multi_init()!
        _ = tm_curl_multi_setopt_long(multi, CURLMOPT_PIPELINING, Int(CURLPIPE_MULTIPLEX))
        var thread = pthread_t()
        pthread_create(&thread, nil, curlEngineThread, Unmanaged.passRetained(self).toOpaque())
        pthread_detach(thread)
    }

    /// Performs one request. `timeoutMilliseconds` bounds the whole transfer.
    public func perform(method: String, url: String, headers: [String] = [], body: [UInt8]? = nil,
                        timeoutMilliseconds: Int = 30_000, bodyLimit: Int = 64 << 20) async throws -> HTTPExchange {
        try await withCheckedThrowingContinuation { continuation in
            guard let easy = curl_easy_init() else {
                continuation.resume(throwing: ServiceError(.internalError, "curl_easy_init failed"))
                return
            }
            let transfer = Transfer(easy: easy, requestBody: body ?? [], bodyLimit: bodyLimit, continuation: continuation)
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_URL, url)
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_CUSTOMREQUEST, method)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_TIMEOUT_MS, timeoutMilliseconds)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT_MS, min(timeoutMilliseconds, 10_000))
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYPEER, 1)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYHOST, 2)
            for header in headers { transfer.headers = curl_slist_append(transfer.headers, header) }
            if body != nil {
                transfer.headers = curl_slist_append(transfer.headers, "Expect:")
                _ = tm_curl_easy_setopt_off(easy, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(transfer.requestBody.count))
                _ = transfer.requestBody.withUnsafeMutableBytes { tm_curl_easy_setopt_ptr(easy, CURLOPT_POSTFIELDS, $0.baseAddress) }
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(transfer.headers))
            _ = transfer.errorBuffer.withUnsafeMutableBytes { tm_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, $0.baseAddress) }
            let context = Unmanaged.passUnretained(transfer).toOpaque()
            _ = tm_curl_easy_setopt_write(easy, CURLOPT_WRITEFUNCTION) { data, size, count, context in
                let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
                let length = size * count
                if transfer.body.count + length > transfer.bodyLimit { return 0 }  // aborts: response too large
                data!.withMemoryRebound(to: UInt8.self, capacity: length) { transfer.body.append(contentsOf: UnsafeBufferPointer(start: $0, count: length)) }
                return length
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_WRITEDATA, context)
            _ = tm_curl_easy_setopt_write(easy, CURLOPT_HEADERFUNCTION) { data, size, count, context in
                let transfer = Unmanaged<Transfer>.fromOpaque(context!).takeUnretainedValue()
                let length = size * count
                let line = data!.withMemoryRebound(to: UInt8.self, capacity: length) { String(decoding: UnsafeBufferPointer(start: $0, count: length), as: UTF8.self) }
                if let colon = line.firstIndex(of: ":") {
                    let name = line[..<colon].lowercased()
                    let value = line[line.index(after: colon)...].trimmingWhitespace
                    transfer.responseHeaders[name] = value
                }
                return length
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, context)
            mutex.withLock { incoming.append(transfer) }
            curl_multi_wakeup(multi)
        }
    }

    fileprivate func loop() -> Never {
        var stillRunning: Int32 = 0
        while true {
            let added: [Transfer] = mutex.withLock {
                defer { incoming.removeAll() }
                return incoming
            }
            for transfer in added {
                running[transfer.easy] = transfer
                curl_multi_add_handle(multi, transfer.easy)
            }
            curl_multi_perform(multi, &stillRunning)
            var remaining: Int32 = 0
            while let message = curl_multi_info_read(multi, &remaining) {
                guard message.pointee.msg == CURLMSG_DONE, let easy = message.pointee.easy_handle, let transfer = running.removeValue(forKey: easy) else { continue }
                let result = message.pointee.data.result
                var status = 0
                _ = tm_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
                curl_multi_remove_handle(multi, easy)
                if result == CURLE_OK {
                    transfer.continuation.resume(returning: HTTPExchange(status: status, headers: transfer.responseHeaders, body: transfer.body))
                } else {
                    let detail = cString(transfer.errorBuffer)
                    let text = detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail
                    transfer.continuation.resume(throwing: CurlError(code: Int(result.rawValue), message: text))
                }
                curl_slist_free_all(transfer.headers)
                curl_easy_cleanup(easy)
            }
            curl_multi_poll(multi, nil, 0, 1000, nil)
        }
    }
}

/// A transport failure (connection refused, timeout, TLS) with curl's error text.
public struct CurlError: Error, Sendable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public var description: String { "curl error \(code): \(message)" }
}

private func curlEngineThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let engine = Unmanaged<CurlEngine>.fromOpaque(context!).takeRetainedValue()
    engine.loop()
}
