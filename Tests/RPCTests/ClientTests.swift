import TalkMeshBase
import Testing
@testable import TalkMeshRPC

@Suite("Client targets")
struct ClientTargetTests {
    @Test("gRPC naming forms parse")
    func forms() throws {
        #expect(try ClientTarget("dns:///media.talkmesh.svc:50051").kind == .dns(host: "media.talkmesh.svc", port: 50051, server: nil))
        #expect(try ClientTarget("dns://10.0.0.10:53/media:50051").kind == .dns(host: "media", port: 50051, server: "10.0.0.10:53"))
        #expect(try ClientTarget("localhost:8080").kind == .dns(host: "localhost", port: 8080, server: nil))
        #expect(try ClientTarget("api.example.com").kind == .dns(host: "api.example.com", port: 443, server: nil))
        guard case .addresses(let list) = try ClientTarget("ipv4:127.0.0.2:1,127.0.0.3:2").kind else {
            Issue.record("expected a static list")
            return
        }
        #expect(list.map(\.description) == ["127.0.0.2:1", "127.0.0.3:2"])
        guard case .addresses(let v6) = try ClientTarget("ipv6:[::1]:50051").kind else {
            Issue.record("expected a static list")
            return
        }
        #expect(v6.map(\.description) == ["[::1]:50051"])
        #expect(try ClientTarget("ipv4:127.0.0.2:1").authority == "127.0.0.2:1")
    }

    @Test("malformed targets are INVALID_ARGUMENT", arguments: ["ipv4:", "ipv4:localhost:1", "host:0", "host:70000", "dns://x", ":50051", "ipv4:1.2.3.4"])
    func malformed(text: String) {
        do {
            _ = try ClientTarget(text)
            Issue.record("\(text) should not parse")
        } catch let error as RPCError {
            #expect(error.code == .invalidArgument)
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test("DNS queries are well formed and answers parse, ignoring other types and ids")
    func dnsWire() {
        let query = DNSQuery.buildQuery(id: 0x1234, name: "echo.test", type: 1)
        #expect(Array(query.prefix(4)) == [0x12, 0x34, 0x01, 0x00])
        #expect(Array(query[12...]) == [4] + Array("echo".utf8) + [4] + Array("test".utf8) + [0, 0, 1, 0, 1])
        var reply = query
        reply[2] = 0x81; reply[3] = 0x80; reply[7] = 2  // response, two answers
        reply += [0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 2]
        reply += [0xC0, 0x0C, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 0x0C]  // a CNAME, skipped
        let answers = DNSQuery.parseAnswers(reply, id: 0x1234, type: 1, port: 50051)
        #expect(answers.map(\.description) == ["127.0.0.2:50051"])
        #expect(DNSQuery.parseAnswers(reply, id: 0x9999, type: 1, port: 1).isEmpty)
    }

    @Test("HTTP statuses without grpc-status map as gRPC specifies")
    func httpMapping() {
        #expect(ClientCall.codeForHTTP(400) == .internal)
        #expect(ClientCall.codeForHTTP(401) == .unauthenticated)
        #expect(ClientCall.codeForHTTP(403) == .permissionDenied)
        #expect(ClientCall.codeForHTTP(404) == .unimplemented)
        #expect(ClientCall.codeForHTTP(503) == .unavailable)
        #expect(ClientCall.codeForHTTP(500) == .unknown)
    }
}

@Suite("W3C trace context")
struct TraceContextTests {
    @Test("traceparent round-trips; children keep the trace id")
    func roundTrip() throws {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        let parsed = try #require(TraceContext.parse(traceparent: header))
        #expect(parsed.traceID == "4bf92f3577b34da6a3ce929d0e0e4736")
        #expect(parsed.spanID == "00f067aa0ba902b7")
        #expect(parsed.flags == 1)
        #expect(parsed.traceparent == header)
        let child = parsed.child()
        #expect(child.traceID == parsed.traceID && child.spanID != parsed.spanID && child.parentSpanID == parsed.spanID)
        let root = TraceContext.root()
        #expect(root.traceID.count == 32 && root.spanID.count == 16)
        #expect(TraceContext.parse(traceparent: root.traceparent) == TraceContext(traceID: root.traceID, spanID: root.spanID, parentSpanID: nil, flags: 1))
    }

    @Test("invalid traceparent values are ignored", arguments: [
        "", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ])
    func invalid(header: String) {
        #expect(TraceContext.parse(traceparent: header) == nil)
    }

    @Test("ids are unique, never 0, across threads (each thread has its own generator)")
    func unique() async {
        let perTask = 20_000, tasks = 4
        let all = await withTaskGroup(of: [UInt64].self) { group in
            for _ in 0..<tasks {
                group.addTask {
                    (0..<perTask).flatMap { _ in
                        let root = TraceContext.root()
                        return [root.traceIDHigh, root.traceIDLow, root.spanIDValue]
                    }
                }
            }
            return await group.reduce(into: [UInt64]()) { $0 += $1 }
        }
        #expect(all.count == 3 * perTask * tasks && !all.contains(0))
        #expect(Set(all).count == all.count)
    }
}
