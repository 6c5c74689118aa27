import CTalkMesh
import Glibc
import TalkMeshBase

/// Where a client sends calls, in gRPC's naming syntax:
/// - `dns:///name:port` (all A/AAAA records, re-resolved periodically), or `dns://SERVER/name:port`
///   to ask a given DNS server;
/// - `ipv4:127.0.0.1:50051,127.0.0.2:50051` and `ipv6:[::1]:50051` (a static list);
/// - a plain `host:port` (resolved like `dns:///`).
public struct ClientTarget: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        case dns(host: String, port: Int, server: String?)
        case addresses([ResolvedAddress])
    }

    public let kind: Kind
    public let description: String

    /// The `:authority` to send and the name TLS verifies.
    public var authority: String {
        switch kind {
        case .dns(let host, let port, _): return "\(host):\(port)"
        case .addresses(let list): return list.first.map { "\($0.host):\($0.port)" } ?? ""
        }
    }

    /// Parses a target; throws INVALID_ARGUMENT with the reason.
    public init(_ text: String, defaultPort: Int = 443) throws {
        description = text
        if text.hasPrefix("ipv4:") || text.hasPrefix("ipv6:") {
            let list = try text.dropFirst(5).split(separator: ",").map { try Self.hostPort(String($0), defaultPort: nil) }
            guard !list.isEmpty else { throw RPCError(code: .invalidArgument, message: "target \(text) lists no address") }
            kind = .addresses(try list.map { host, port in
                guard let address = ResolvedAddress(numericHost: host, port: port) else {
                    throw RPCError(code: .invalidArgument, message: "target \(text): \(host) is not a numeric address")
                }
                return address
            })
            return
        }
        var rest = Substring(text)
        var server: String?
        if rest.hasPrefix("dns:") {
            rest = rest.dropFirst(4)
            if rest.hasPrefix("//") {
                rest = rest.dropFirst(2)
                guard let slash = rest.firstIndex(of: "/") else {
                    throw RPCError(code: .invalidArgument, message: "target \(text): expected dns://[server]/name:port")
                }
                let authority = String(rest[..<slash])
                server = authority.isEmpty ? nil : authority
                rest = rest[rest.index(after: slash)...]
            }
        }
        let (host, port) = try Self.hostPort(String(rest), defaultPort: defaultPort)
        kind = .dns(host: host, port: port, server: server)
    }

    private static func hostPort(_ text: String, defaultPort: Int?) throws -> (String, Int) {
        var host = Substring(text)
        var portText: Substring?
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { throw RPCError(code: .invalidArgument, message: "bad address \(text)") }
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if after.hasPrefix(":") { portText = after.dropFirst() }
        } else if let colon = host.lastIndex(of: ":"), host.filter({ $0 == ":" }).count == 1 {
            portText = host[host.index(after: colon)...]
            host = host[..<colon]
        }
        guard !host.isEmpty else { throw RPCError(code: .invalidArgument, message: "target \(text) has no host") }
        let port: Int? = portText != nil ? portText.flatMap { Int($0) } : defaultPort
        guard let port, (1...65535).contains(port) else {
            throw RPCError(code: .invalidArgument, message: "target \(text) needs a port in 1…65535")
        }
        return (String(host), port)
    }

    /// Resolves to the current list of addresses (blocking: call off the event loop).
    func resolve() throws -> [ResolvedAddress] {
        switch kind {
        case .addresses(let list):
            return list
        case .dns(let host, let port, let server):
            if let numeric = ResolvedAddress(numericHost: host, port: port) { return [numeric] }
            if let server {
                return try DNSQuery.resolve(host: host, port: port, server: server)
            }
            return try Self.getaddrinfo(host: host, port: port)
        }
    }

    private static func getaddrinfo(host: String, port: Int) throws -> [ResolvedAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV
        var result: UnsafeMutablePointer<addrinfo>?
        let rv = Glibc.getaddrinfo(host, String(port), &hints, &result)
        guard rv == 0 else {
            throw RPCError(code: .unavailable, message: "cannot resolve \(host): \(String(cString: gai_strerror(rv)))")
        }
        defer { freeaddrinfo(result) }
        var addresses: [ResolvedAddress] = []
        var cursor = result
        while let info = cursor {
            if let address = ResolvedAddress(sockaddr: info.pointee.ai_addr, host: host), !addresses.contains(address) {
                addresses.append(address)
            }
            cursor = info.pointee.ai_next
        }
        return addresses
    }
}

/// One resolved backend address.
public struct ResolvedAddress: Sendable, Hashable, CustomStringConvertible {
    /// Numeric host (`127.0.0.1`, `::1`).
    public let host: String
    public let port: Int
    let isIPv6: Bool

    public var description: String { isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }

    init?(numericHost host: String, port: Int) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            isIPv6 = false
        } else if inet_pton(AF_INET6, host, &v6) == 1 {
            isIPv6 = true
        } else {
            return nil
        }
        self.host = host
        self.port = port
    }

    init?(sockaddr address: UnsafeMutablePointer<sockaddr>?, host: String) {
        guard let address else { return nil }
        let text = RPCServer.describe(address)
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
        self.init(numericHost: String(text[..<colon]), port: port)
    }

    /// Calls `body` with this address as a `sockaddr`.
    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        if isIPv6 {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = UInt16(port).bigEndian
            inet_pton(AF_INET6, host, &address.sin6_addr)
            return withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, host, &address.sin_addr)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
}
