import CTalkMesh
import Glibc
import TalkMeshBase

/// A minimal DNS client (A and AAAA over UDP) for `dns://SERVER/name` targets, where gRPC's naming
/// says to ask that server rather than the system resolver.
enum DNSQuery {
    static func resolve(host: String, port: Int, server: String, timeoutMilliseconds: Int32 = 2000) throws -> [ResolvedAddress] {
        let serverTarget = try ClientTarget("ipv4:" + (server.contains(":") ? server : server + ":53"))
        guard case .addresses(let servers) = serverTarget.kind, let dnsServer = servers.first else {
            throw RPCError(code: .invalidArgument, message: "bad DNS server \(server)")
        }
        var addresses: [ResolvedAddress] = []
        for type: UInt16 in [1, 28] {  // A, AAAA
            let id = UInt16.random(in: 0...UInt16.max)
            let query = buildQuery(id: id, name: host, type: type)
            let reply = try exchange(query, with: dnsServer, timeoutMilliseconds: timeoutMilliseconds)
            addresses += parseAnswers(reply, id: id, type: type, port: port)
        }
        if addresses.isEmpty { throw RPCError(code: .unavailable, message: "\(host): no A or AAAA records at \(server)") }
        return addresses
    }

    static func buildQuery(id: UInt16, name: String, type: UInt16) -> [UInt8] {
        var out: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") {
            out.append(UInt8(min(label.utf8.count, 63)))
            out += label.utf8.prefix(63)
        }
        out += [0, UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
        return out
    }

    static func parseAnswers(_ reply: [UInt8], id: UInt16, type: UInt16, port: Int) -> [ResolvedAddress] {
        guard reply.count >= 12, UInt16(reply[0]) << 8 | UInt16(reply[1]) == id, reply[3] & 0x0F == 0 else { return [] }
        let questions = Int(reply[4]) << 8 | Int(reply[5])
        let answers = Int(reply[6]) << 8 | Int(reply[7])
        var offset = 12
        func skipName() -> Bool {
            while offset < reply.count {
                let length = Int(reply[offset])
                if length == 0 { offset += 1; return true }
                if length & 0xC0 == 0xC0 { offset += 2; return true }
                offset += 1 + length
            }
            return false
        }
        for _ in 0..<questions {
            guard skipName() else { return [] }
            offset += 4
        }
        var result: [ResolvedAddress] = []
        for _ in 0..<answers {
            guard skipName(), offset + 10 <= reply.count else { break }
            let recordType = UInt16(reply[offset]) << 8 | UInt16(reply[offset + 1])
            let length = Int(reply[offset + 8]) << 8 | Int(reply[offset + 9])
            offset += 10
            guard offset + length <= reply.count else { break }
            let data = Array(reply[offset..<(offset + length)])
            offset += length
            guard recordType == type else { continue }
            var text = [CChar](repeating: 0, count: 64)
            let family = type == 1 ? AF_INET : AF_INET6
            guard (type == 1 && length == 4) || (type == 28 && length == 16),
                  inet_ntop(family, data, &text, socklen_t(text.count)) != nil,
                  let address = ResolvedAddress(numericHost: cString(text), port: port) else { continue }
            result.append(address)
        }
        return result
    }

    private static func exchange(_ query: [UInt8], with server: ResolvedAddress, timeoutMilliseconds: Int32) throws -> [UInt8] {
        let fd = socket(server.isIPv6 ? AF_INET6 : AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw RPCError(code: .unavailable, message: "DNS socket: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        let connected = server.withSockaddr { connect(fd, $0, $1) }
        guard connected == 0 else { throw RPCError(code: .unavailable, message: "DNS connect: \(String(cString: strerror(errno)))") }
        _ = query.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, timeoutMilliseconds) == 1 else {
            throw RPCError(code: .unavailable, message: "DNS server \(server) did not answer")
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = recv(fd, &buffer, buffer.count, 0)
        guard count > 0 else { throw RPCError(code: .unavailable, message: "DNS receive failed") }
        return Array(buffer[0..<count])
    }
}
