import Glibc
import Synchronization

/// An HTTP/1.1 server on loopback for the export path's tests: keep-alive, each request read whole
/// (by Content-Length) and kept; the answer's body is the request body's length in decimal.
/// One thread per connection, plain blocking sockets; `stop()` ends it.
final class LoopbackHTTPServer: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    let requests = Mutex<[(head: String, body: [UInt8])]>([])
    /// Connections accepted so far.
    let connections = Atomic<Int>(0)

    init() {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        listener = fd
        port = UInt16(bigEndian: address.sin_port)
        Self.spawn { [self] in
            while true {
                let connection = accept(listener, nil, nil)
                if connection < 0 {
                    close(listener)  // here, not in stop(): no close while accept() runs
                    return
                }
                connections.add(1, ordering: .relaxed)
                Self.spawn { [self] in serve(connection) }
            }
        }
    }

    /// Ends the accept loop (which closes the listener); open connections end with their peers.
    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
    }

    private func serve(_ connection: Int32) {
        defer { close(connection) }
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        func fill() -> Bool {
            let got = chunk.withUnsafeMutableBytes { recv(connection, $0.baseAddress, $0.count, 0) }
            if got <= 0 { return false }
            pending += chunk[..<got]
            return true
        }
        while true {
            var end: Int?
            while true {
                end = pending.indices.dropLast(3).first { pending[$0] == 13 && pending[$0 + 1] == 10 && pending[$0 + 2] == 13 && pending[$0 + 3] == 10 }
                if end != nil { break }
                guard fill() else { return }
            }
            let head = String(decoding: pending[..<end!], as: UTF8.self)
            let length = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
                .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: " ")) } ?? 0
            pending.removeFirst(end! + 4)
            while pending.count < length { guard fill() else { return } }
            let body = Array(pending[..<length])
            pending.removeFirst(length)
            requests.withLock { $0.append((head, body)) }
            let answer = Array("\(length)".utf8)
            let response = Array("HTTP/1.1 200 OK\r\ncontent-length: \(answer.count)\r\n\r\n".utf8) + answer
            _ = response.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        }
    }

    /// A detached thread running `body`.
    private static func spawn(_ body: @escaping @Sendable () -> Void) {
        final class Box { let body: @Sendable () -> Void; init(_ body: @escaping @Sendable () -> Void) { self.body = body } }
        var thread = pthread_t()
        pthread_create(&thread, nil, { context in
            Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().body()
            return nil
        }, Unmanaged.passRetained(Box(body)).toOpaque())
        pthread_detach(thread)
    }
}

private extension Substring {
    func trimmingCharacters(in blank: Character) -> Substring {
        var text = self
        while text.first == blank { text = text.dropFirst() }
        while text.last == blank { text = text.dropLast() }
        return text
    }
}
