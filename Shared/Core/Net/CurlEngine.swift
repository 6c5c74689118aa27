import CTalkMesh
import Glibc
import TalkMeshBase

/// An HTTP exchange's result.
public struct HTTPExchange: Sendable {
    public var status: Int
    public var headers: [String: String]
    public var body: [UInt8]
}

/// A request body the engine sends from where it lies, without a copy: the engine holds the
/// object until the transfer ends, and the bytes must not change until then.
public protocol RequestBytes: AnyObject, Sendable {
    var requestBytes: UnsafeRawBufferPointer { get }
}

/// libcurl's multi interface driven by one dedicated thread (never a thread per request): many
/// transfers at once, connections reused, HTTP/2 where the server offers it, TLS verified.
public final class CurlEngine: @unchecked Sendable {
    /// One request in flight. It owns its header list, request body and error buffer (libcurl
    /// keeps pointers to the last two until the transfer ends) and frees them in deinit; its easy
    /// handle goes back to the engine's pool when the transfer ends (`recycle`), else is freed here.
    final class Transfer {
        let id: UInt64
        let easy: UnsafeMutableRawPointer
        /// The handle went back to the pool: not this transfer's to free.
        var recycled = false
        var headers: UnsafeMutablePointer<curl_slist>?
        var body: [UInt8] = []
        var responseHeaders: [String: String] = [:]
        /// The bytes sent: a copy this transfer owns, or `bodyOwner`'s, borrowed.
        let requestBody: UnsafeRawBufferPointer?
        let bodyOwner: (any RequestBytes)?
        let errorBuffer: UnsafeMutablePointer<CChar>
        /// The waiting task (the engine's transfers); nil for one performed in place (`CurlHandle`).
        let continuation: CheckedContinuation<HTTPExchange, any Error>?
        var bodyLimit: Int

        init(id: UInt64, easy: UnsafeMutableRawPointer, requestBody: RequestBody?, bodyLimit: Int, continuation: CheckedContinuation<HTTPExchange, any Error>?) {
            self.id = id
            self.easy = easy
            switch requestBody {
            case .copy(let bytes):
                let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
                copy.copyBytes(from: bytes)
                self.requestBody = UnsafeRawBufferPointer(rebasing: copy[..<bytes.count])
                bodyOwner = nil
            case .borrowed(let owner):
                self.requestBody = owner.requestBytes
                bodyOwner = owner
            case nil:
                self.requestBody = nil
                bodyOwner = nil
            }
            errorBuffer = .allocate(capacity: Int(CURL_ERROR_SIZE))
            errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE))
            self.bodyLimit = bodyLimit
            self.continuation = continuation
        }

        deinit {
            if !recycled { curl_easy_cleanup(easy) }
            curl_slist_free_all(headers)
            if bodyOwner == nil { requestBody?.deallocate() }
            errorBuffer.deallocate()
        }

        var errorText: String { String(cString: errorBuffer) }

        /// The exchange, or the transport failure, once libcurl ended the transfer with `result`.
        func outcome(_ result: CURLcode) -> Result<HTTPExchange, any Error> {
            guard result == CURLE_OK else {
                let detail = errorText
                return .failure(CurlError(code: Int(result.rawValue), message: detail.isEmpty ? String(cString: curl_easy_strerror(result)) : detail))
            }
            var status = 0
            _ = tm_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
            return .success(HTTPExchange(status: status, headers: responseHeaders, body: body))
        }

        /// Sets the request on the transfer's easy handle: everything but who drives it.
        func prepare(method: String, url: String, headers: [String], timeoutMilliseconds: Int, publicOnly: Bool,
                     proxies: ProxyEnvironment = .current) {
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_URL, url)
            // Set, even when empty: libcurl then reads no environment variable for the request.
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_PROXY, proxies.proxy(for: url))
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_NOPROXY, proxies.noProxy)
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_CUSTOMREQUEST, method)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2TLS)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_TIMEOUT_MS, timeoutMilliseconds)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT_MS, min(timeoutMilliseconds, 10_000))
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYPEER, 1)
            _ = tm_curl_easy_setopt_long(easy, CURLOPT_SSL_VERIFYHOST, 2)
            _ = tm_curl_easy_setopt_str(easy, CURLOPT_PROTOCOLS_STR, "http,https")
            if publicOnly {
                _ = tm_curl_easy_setopt_prereq(easy) { _, primaryIP, _, _, _ in
                    guard let primaryIP, NetworkAddress.isPublic(String(cString: primaryIP)) else { return Int32(CURL_PREREQFUNC_ABORT) }
                    return Int32(CURL_PREREQFUNC_OK)
                }
            }
            for header in headers { self.headers = curl_slist_append(self.headers, header) }
            if let requestBody = self.requestBody {
                self.headers = curl_slist_append(self.headers, "Expect:")
                _ = tm_curl_easy_setopt_off(easy, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(requestBody.count))
                _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(mutating: requestBody.baseAddress))
                // A large body (a /run with the inputs in base64, ~250 KB) goes out in a few sends
                // instead of one per 64 KB (libcurl's default upload buffer), each with a poll.
                if requestBody.count > 64 << 10 {
                    _ = tm_curl_easy_setopt_long(easy, CURLOPT_UPLOAD_BUFFERSIZE, min(requestBody.count, 512 << 10))
                }
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, UnsafeMutableRawPointer(self.headers))
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_ERRORBUFFER, UnsafeMutableRawPointer(self.errorBuffer))
            let context = Unmanaged.passUnretained(self).toOpaque()
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
                // On the bytes: a name lower-cased in ASCII, a value without the blanks and CRLF
                // around it (a String and Character walk per header line cost more than the request).
                data!.withMemoryRebound(to: UInt8.self, capacity: length) { base in
                    let line = UnsafeBufferPointer(start: base, count: length)
                    guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else { return }
                    func blank(_ byte: UInt8) -> Bool { byte == 0x20 || byte == 0x09 || byte == 0x0D || byte == 0x0A }
                    var start = colon + 1, end = length
                    while start < end && blank(line[start]) { start += 1 }
                    while end > start && blank(line[end - 1]) { end -= 1 }
                    let name = String(decoding: line[..<colon].map { $0 >= 0x41 && $0 <= 0x5A ? $0 | 0x20 : $0 }, as: UTF8.self)
                    let value = String(decoding: UnsafeBufferPointer(rebasing: line[start..<end]), as: UTF8.self)
                    transfer.responseHeaders[name] = value
                    // The body's room at once (a video answer grew by doubling, copied each time),
                    // within its limit and at most 16 MB on a peer's word.
                    if name == "content-length", let declared = Int(value), declared > transfer.body.capacity {
                        transfer.body.reserveCapacity(min(declared, transfer.bodyLimit, 16 << 20))
                    }
                }
                return length
            }
            _ = tm_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, context)
        }
    }

    private let multi: UnsafeMutableRawPointer
    private let proxies: ProxyEnvironment
    private let mutex = PThreadMutex()
    private var incoming: [Transfer] = []
    private var running: [UnsafeMutableRawPointer: Transfer] = [:]
    /// Transfers whose task was cancelled, by id; the curl thread ends them.
    private var cancelled: [UInt64] = []
    /// Under `mutex`: the loop is in (or about to enter) `curl_multi_poll` with nothing queued, so
    /// a new transfer must wake it. While it works it finds new transfers itself: no wake-up (a
    /// send on libcurl's socket pair, and a poll that returns for it) per request.
    private var polling = false
    private var lastID: UInt64 = 0
    /// Easy handles of ended transfers, reset, for the next ones: a handle keeps its buffers (the
    /// upload buffer alone is 64 KB), which a new one per request allocated and faulted in again.
    private var idleHandles: [UnsafeMutableRawPointer] = []
    private static let maxIdleHandles = 16

    /// A request body: copied for the transfer, or borrowed from an owner that keeps it.
    enum RequestBody {
        case copy([UInt8])
        case borrowed(any RequestBytes)
    }
    static let globalInit: Void = { curl_global_init(Int(CURL_GLOBAL_DEFAULT)) }()

    /// `proxies`: the environment's, read once at start.
    public init(proxies: ProxyEnvironment = .current) {
        Self.globalInit
        self.proxies = proxies
        multi = curl_multi_init()!
        _ = tm_curl_multi_setopt_long(multi, CURLMOPT_PIPELINING, Int(CURLPIPE_MULTIPLEX))
        var thread = pthread_t()
        pthread_create(&thread, nil, curlEngineThread, Unmanaged.passRetained(self).toOpaque())
        pthread_detach(thread)
    }

    /// Performs one request. `timeoutMilliseconds` bounds the whole transfer; cancelling the
    /// calling task ends it at once (the connection is dropped) with `CancellationError`.
    /// `publicOnly`: the request is sent only to a public address — the one curl actually connected
    /// to is checked (`NetworkAddress.isPublic`) before a byte of the request leaves, so neither a
    /// name that resolves to a private address nor DNS rebinding reaches an internal service; it
    /// fails with CURLE_ABORTED_BY_CALLBACK (`CurlError.refusedAddress`) instead. Only http and https
    /// are spoken, and redirects are never followed.
    public func perform(method: String, url: String, headers: [String] = [], body: [UInt8]? = nil,
                        timeoutMilliseconds: Int = 30_000, bodyLimit: Int = 64 << 20, publicOnly: Bool = false) async throws -> HTTPExchange {
        try await perform(method: method, url: url, headers: headers, requestBody: body.map { .copy($0) }, timeoutMilliseconds: timeoutMilliseconds,
                          bodyLimit: bodyLimit, publicOnly: publicOnly)
    }

    /// `perform` with a body sent from where it lies (`RequestBytes`), not copied.
    public func perform(method: String, url: String, headers: [String] = [], borrowing body: any RequestBytes,
                        timeoutMilliseconds: Int = 30_000, bodyLimit: Int = 64 << 20, publicOnly: Bool = false) async throws -> HTTPExchange {
        try await perform(method: method, url: url, headers: headers, requestBody: .borrowed(body), timeoutMilliseconds: timeoutMilliseconds,
                          bodyLimit: bodyLimit, publicOnly: publicOnly)
    }

    private func perform(method: String, url: String, headers: [String], requestBody body: RequestBody?,
                         timeoutMilliseconds: Int, bodyLimit: Int, publicOnly: Bool) async throws -> HTTPExchange {
        try Task.checkCancellation()
        let id: UInt64 = mutex.withLock { lastID += 1; return lastID }
        return try await withTaskCancellationHandler {
            try await start(id: id, method: method, url: url, headers: headers, body: body,
                            timeoutMilliseconds: timeoutMilliseconds, bodyLimit: bodyLimit, publicOnly: publicOnly)
        } onCancel: {
            mutex.withLock { cancelled.append(id) }
            curl_multi_wakeup(multi)
        }
    }

    private func start(id: UInt64, method: String, url: String, headers: [String], body: RequestBody?,
                       timeoutMilliseconds: Int, bodyLimit: Int, publicOnly: Bool) async throws -> HTTPExchange {
        try await withCheckedThrowingContinuation { continuation in
            guard let easy = mutex.withLock({ idleHandles.popLast() }) ?? curl_easy_init() else {
                continuation.resume(throwing: ServiceError(.internalError, "curl_easy_init failed"))
                return
            }
            let transfer = Transfer(id: id, easy: easy, requestBody: body, bodyLimit: bodyLimit, continuation: continuation)
            transfer.prepare(method: method, url: url, headers: headers, timeoutMilliseconds: timeoutMilliseconds, publicOnly: publicOnly,
                             proxies: proxies)
            // A cancel that came before this point finds no transfer yet: it is seen here instead.
            let asleep = mutex.withLock {
                incoming.append(transfer)
                if Task.isCancelled { cancelled.append(id) }
                return polling
            }
            if asleep { curl_multi_wakeup(multi) }
        }
    }

    /// Handles waiting in the pool (tests).
    var idleHandleCount: Int { mutex.withLock { idleHandles.count } }

    /// An ended transfer's handle, reset to its defaults (its connections stay in the multi's
    /// cache), back to the pool while the pool has room.
    private func recycle(_ transfer: Transfer) {
        curl_easy_reset(transfer.easy)
        transfer.recycled = mutex.withLock {
            guard idleHandles.count < Self.maxIdleHandles else { return false }
            idleHandles.append(transfer.easy)
            return true
        }
    }

    fileprivate func loop() -> Never {
        var stillRunning: Int32 = 0
        while true {
            let (added, stopped): ([Transfer], [UInt64]) = mutex.withLock {
                defer { incoming.removeAll(); cancelled.removeAll() }
                return (incoming, cancelled)
            }
            for transfer in added {
                running[transfer.easy] = transfer
                curl_multi_add_handle(multi, transfer.easy)
            }
            for id in stopped {
                guard let transfer = running.values.first(where: { $0.id == id }) else { continue }  // already done
                running.removeValue(forKey: transfer.easy)
                curl_multi_remove_handle(multi, transfer.easy)
                recycle(transfer)
                transfer.continuation?.resume(throwing: CancellationError())
            }
            curl_multi_perform(multi, &stillRunning)
            var remaining: Int32 = 0
            while let message = curl_multi_info_read(multi, &remaining) {
                guard message.pointee.msg == CURLMSG_DONE, let easy = message.pointee.easy_handle, let transfer = running.removeValue(forKey: easy) else { continue }
                let outcome = transfer.outcome(message.pointee.data.result)
                curl_multi_remove_handle(multi, easy)
                recycle(transfer)
                transfer.continuation?.resume(with: outcome)
            }
            let idle = mutex.withLock {
                polling = incoming.isEmpty && cancelled.isEmpty
                return polling
            }
            if idle {
                curl_multi_poll(multi, nil, 0, 1000, nil)
                mutex.withLock { polling = false }
            }
        }
    }
}

/// One easy handle driven on the calling thread (`curl_easy_perform`), one request at a time:
/// for a thread of its own that sends requests one after another and waits for each (the span
/// exporter), without the engine's hand-offs to and from its thread. The handle keeps its
/// connection between requests. Not for many requests at once, nor from an async task.
public final class CurlHandle: @unchecked Sendable {
    private let easy: UnsafeMutableRawPointer
    private var lastID: UInt64 = 0
    private static let uploadBuffer = 512 << 10

    public init() {
        CurlEngine.globalInit
        easy = curl_easy_init()!
    }

    deinit { curl_easy_cleanup(easy) }

    /// `CurlEngine.perform`'s request, with the body sent from where it lies, blocking until it
    /// ends or `timeoutMilliseconds` pass.
    public func perform(method: String, url: String, headers: [String] = [], borrowing body: any RequestBytes,
                        timeoutMilliseconds: Int = 30_000, bodyLimit: Int = 64 << 20) throws -> HTTPExchange {
        lastID += 1
        let transfer = CurlEngine.Transfer(id: lastID, easy: easy, requestBody: .borrowed(body), bodyLimit: bodyLimit, continuation: nil)
        transfer.recycled = true  // the handle is this object's, kept for the next request
        // Not reset between requests: `prepare` sets every option a request here uses, and a
        // reset would free the upload buffer, which the next request allocated and faulted in again.
        transfer.prepare(method: method, url: url, headers: headers, timeoutMilliseconds: timeoutMilliseconds, publicOnly: false)
        // Room for the whole body at once (libcurl's default is 64 KB): one send, and one
        // wake-up of the receiver, for a batch of spans.
        _ = tm_curl_easy_setopt_long(easy, CURLOPT_UPLOAD_BUFFERSIZE, Self.uploadBuffer)
        return try transfer.outcome(curl_easy_perform(easy)).get()
    }
}

/// The proxies libcurl would take from the environment, read once: libcurl otherwise looks up
/// `no_proxy`, `<scheme>_proxy` and `all_proxy` (and their upper-case forms, but `HTTP_PROXY`) in
/// the whole environment for every request. Same rules: the scheme's variable, else `all_proxy`;
/// an empty one means none; `no_proxy` lists the hosts reached directly.
public struct ProxyEnvironment: Sendable {
    public let http: String
    public let https: String
    public let noProxy: String

    public static let current = ProxyEnvironment { name in getenv(name).map { String(cString: $0) } }

    public init(_ lookup: (String) -> String?) {
        let all = lookup("all_proxy") ?? lookup("ALL_PROXY")
        http = lookup("http_proxy") ?? all ?? ""
        https = lookup("https_proxy") ?? lookup("HTTPS_PROXY") ?? all ?? ""
        noProxy = lookup("no_proxy") ?? lookup("NO_PROXY") ?? ""
    }

    public init(_ variables: [String: String]) { self.init { variables[$0] } }

    /// The proxy for a request to `url`; empty for none.
    func proxy(for url: String) -> String {
        url.utf8.prefix(6).map { $0 | 0x20 }.elementsEqual("https:".utf8) ? https : http
    }
}

/// A transport failure (connection refused, timeout, TLS) with curl's error text.
public struct CurlError: Error, Sendable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public var description: String { "curl error \(code): \(message)" }

    /// The request was not sent: `publicOnly` and the address connected to is not public.
    public var refusedAddress: Bool { code == Int(CURLE_ABORTED_BY_CALLBACK.rawValue) }
}

private func curlEngineThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let engine = Unmanaged<CurlEngine>.fromOpaque(context!).takeRetainedValue()
    ThreadName.set("curl")
    engine.loop()
}
