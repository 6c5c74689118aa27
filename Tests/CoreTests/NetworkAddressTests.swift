import Glibc
import Testing
import TalkMeshCore

@Suite struct NetworkAddressTests {
    @Test(arguments: ["0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254", "127.0.0.1", "127.8.9.10",
                      "169.254.169.254", "172.16.0.1", "172.31.255.255", "192.168.0.1", "192.0.0.8", "192.0.2.1", "198.18.0.1",
                      "198.51.100.7", "203.0.113.9", "224.0.0.1", "239.1.2.3", "240.0.0.1", "255.255.255.255",
                      "::", "::1", "::ffff:127.0.0.1", "::ffff:10.1.1.1", "::127.0.0.1", "64:ff9b::a00:1", "fc00::1", "fd12:3456::1",
                      "fe80::1", "fe80::1%eth0", "febf::1", "fec0::1", "ff02::1", "2001:db8::1",
                      "", "localhost", "example.com", "1.2.3", "999.1.1.1"])
    func notPublic(address: String) {
        #expect(!NetworkAddress.isPublic(address), "\(address)")
    }

    @Test(arguments: ["1.1.1.1", "8.8.8.8", "93.184.216.34", "100.63.255.255", "100.128.0.1", "172.15.255.255", "172.32.0.1",
                      "169.253.1.1", "192.167.1.1", "192.169.0.1", "198.17.0.1", "198.20.0.1", "223.255.255.254",
                      "2606:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"])
    func isPublic(address: String) {
        #expect(NetworkAddress.isPublic(address), "\(address)")
    }

    @Test func resolvingNumericFormsFindsTheAddressTheyName() {
        #expect(NetworkAddress.resolve("0x7f000001").contains("127.0.0.1"))
        #expect(NetworkAddress.resolve("127.1").contains("127.0.0.1"))
        #expect(NetworkAddress.resolve("no-such-host.invalid").isEmpty)
    }

    /// The delivery-time check: curl connects to a listening loopback socket (the kernel accepts
    /// into the backlog), sees the address is not public and sends nothing.
    @Test func aPublicOnlyRequestToALoopbackListenerIsNotSent() async throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && listen(fd, 8) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        #expect(bound)
        let port = UInt16(bigEndian: address.sin_port)
        let engine = CurlEngine()
        do {
            _ = try await engine.perform(method: "POST", url: "http://127.0.0.1:\(port)/hook", body: [1], timeoutMilliseconds: 5_000, publicOnly: true)
            Issue.record("the request was sent")
        } catch let error as CurlError {
            #expect(error.refusedAddress, "\(error)")
        }
        // The same request without the guard reaches the listener (and times out: nobody answers).
        do {
            _ = try await engine.perform(method: "POST", url: "http://127.0.0.1:\(port)/hook", body: [1], timeoutMilliseconds: 300)
        } catch let error as CurlError {
            #expect(!error.refusedAddress, "\(error)")
        }
    }
}
