import CTalkMesh
import Glibc
import TalkMeshBase

/// Which IP addresses a request on a caller's behalf (a webhook) may reach: the public internet,
/// never this host, the cluster's private networks or a cloud's metadata service.
public enum NetworkAddress {
    /// True for a public unicast address; false for loopback, private (RFC 1918, ULA), link-local
    /// (169.254/16 holds the cloud metadata services), carrier-grade NAT, "this network",
    /// benchmarking, documentation, multicast and reserved ranges — and for anything that is not an
    /// IP address. IPv4-mapped and NAT64 IPv6 addresses are judged by the IPv4 address they carry.
    public static func isPublic(_ text: String) -> Bool {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return isPublicV4(withUnsafeBytes(of: v4.s_addr) { Array($0) })
        }
        var v6 = in6_addr()
        // A zone (fe80::1%eth0) is link-local by construction.
        guard !text.contains("%"), inet_pton(AF_INET6, text, &v6) == 1 else { return false }
        return isPublicV6(withUnsafeBytes(of: v6) { Array($0) })
    }

    static func isPublicV4(_ b: [UInt8]) -> Bool {
        switch (b[0], b[1]) {
        case (0, _), (10, _), (127, _): return false                    // this network, private, loopback
        case (100, 64...127): return false                              // carrier-grade NAT
        case (169, 254): return false                                   // link-local, cloud metadata
        case (172, 16...31), (192, 168): return false                   // private
        case (198, 18...19): return false                               // benchmarking
        case (224...255, _): return false                               // multicast, reserved, broadcast
        default: break
        }
        if b[0] == 192 && b[1] == 0 && (b[2] == 0 || b[2] == 2) { return false }  // IETF protocol assignments, TEST-NET-1
        if b[0] == 198 && b[1] == 51 && b[2] == 100 { return false }            // TEST-NET-2
        if b[0] == 203 && b[1] == 0 && b[2] == 113 { return false }             // TEST-NET-3
        return true
    }

    static func isPublicV6(_ b: [UInt8]) -> Bool {
        if b[0..<10].allSatisfy({ $0 == 0 }) {
            if b[10] == 0xFF && b[11] == 0xFF { return isPublicV4(Array(b[12..<16])) }  // ::ffff:a.b.c.d
            return false  // ::, ::1, and the deprecated IPv4-compatible forms
        }
        if b[0] == 0x00 && b[1] == 0x64 && b[2] == 0xFF && b[3] == 0x9B && b[4..<12].allSatisfy({ $0 == 0 }) {
            return isPublicV4(Array(b[12..<16]))  // NAT64 64:ff9b::/96
        }
        if b[0] & 0xFE == 0xFC { return false }                 // unique local fc00::/7
        if b[0] == 0xFE && b[1] & 0xC0 == 0x80 { return false } // link-local fe80::/10
        if b[0] == 0xFE && b[1] & 0xC0 == 0xC0 { return false } // site-local fec0::/10 (deprecated)
        if b[0] == 0xFF { return false }                        // multicast
        if b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x0D && b[3] == 0xB8 { return false }  // documentation 2001:db8::/32
        return true
    }

    /// Every address `host` resolves to (numeric forms such as `0x7f.1` included, as a resolver
    /// reads them); empty when it does not resolve. Blocks: call it off the event loops.
    public static func resolve(_ host: String) -> [String] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0 else { return [] }
        defer { freeaddrinfo(result) }
        var addresses: [String] = []
        var entry = result
        while let current = entry {
            var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            if getnameinfo(current.pointee.ai_addr, current.pointee.ai_addrlen, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST) == 0 {
                addresses.append(cString(buffer))
            }
            entry = current.pointee.ai_next
        }
        return addresses
    }
}
