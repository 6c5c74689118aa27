import Foundation
import Glibc
import TalkMeshBase
import Testing
@testable import TalkMeshRPC

/// A DNS server on loopback that answers no A query until `needed` of them wait at once, then
/// answers them all with 127.0.0.1 (AAAA queries get an empty answer at once).
final class GatheringDNSServer: @unchecked Sendable {  // the socket is used by its own thread only
    let port: Int
    private let fd: Int32
    private let needed: Int
    private let mostPending = Locked(0)

    init(needed: Int) throws {
        self.needed = needed
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw RPCError(code: .internal, message: "cannot bind a UDP socket") }
        self.fd = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        var timeout = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The most A queries that were waiting at one time.
    var mostWaiting: Int { mostPending.withLock { $0 } }

    /// Serves until `seconds` have passed; a plain thread, so a stalled task pool cannot stall it.
    func serve(seconds: Double) {
        let thread = Thread { [self] in
            var pending: [(query: [UInt8], peer: sockaddr_storage)] = []
            let end = Date().addingTimeInterval(seconds)
            while Date() < end {
                var buffer = [UInt8](repeating: 0, count: 512)
                var peer = sockaddr_storage()
                var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let count = withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &peerLength) }
                }
                if count < 12 { continue }
                let query = Array(buffer.prefix(count))
                if query[count - 3] == 28 {  // AAAA: no records
                    reply(to: query, peer: peer, address: nil)
                    continue
                }
                pending.append((query, peer))
                mostPending.withLock { $0 = max($0, pending.count) }
                if pending.count >= needed {
                    for (query, peer) in pending { reply(to: query, peer: peer, address: [127, 0, 0, 1]) }
                    pending.removeAll()
                }
            }
            close(fd)
        }
        thread.start()
    }

    private func reply(to query: [UInt8], peer: sockaddr_storage, address: [UInt8]?) {
        var answer = query
        answer[2] = 0x81; answer[3] = 0x80
        if let address {
            answer[7] = 1
            answer += [0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4] + address
        }
        var peer = peer
        _ = withUnsafeMutablePointer(to: &peer) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, answer, answer.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
    }
}

@Suite("Name resolution")
struct ResolverPoolTests {
    /// Swift's cooperative pool has one thread per core. Were lookups run on it, no more than that
    /// many could wait at once, and the server below would never answer.
    @Test("lookups block off Swift's task pool: more of them wait at once than there are cores")
    func lookupsLeaveThePoolFree() async throws {
        let clients = ProcessInfo.processInfo.activeProcessorCount + 3
        let server = try GatheringDNSServer(needed: clients)
        server.serve(seconds: 20)
        let loop = EventLoop.startThread()
        var started: [RPCClient] = []
        for _ in 0..<clients {
            started.append(try RPCClient(configuration: .init(target: "dns://127.0.0.1:\(server.port)/gathering.test:1"), loop: loop))
        }
        var resolved = 0
        for _ in 0..<200 where resolved < clients {  // 10 s at most
            try await Task.sleep(for: .milliseconds(50))
            resolved = 0
            for client in started where await client.addresses().contains(where: { $0.address == "127.0.0.1:1" }) { resolved += 1 }
        }
        #expect(server.mostWaiting >= clients)
        #expect(resolved == clients)
        for client in started { client.close() }
    }
}
