import TalkMeshBase
import Testing
import TalkMeshMessages
@testable import TalkMeshRPC

@Suite("Health service")
struct HealthServiceTests {
    @Test("the whole server is SERVING; unknown names are unregistered")
    func defaults() {
        let health = HealthService()
        #expect(health.status(of: "") == .serving)
        #expect(health.status(of: "x.Y") == nil)
        health.setStatus(.notServing, for: "x.Y")
        #expect(health.status(of: "x.Y") == .notServing)
    }

    @Test("Check answers through the registry, NOT_FOUND for unknown services")
    func check() async throws {
        let health = HealthService()
        var registry = RPCServiceRegistry()
        health.register(into: &registry)
        let method = try #require(registry.method(for: Health.check.path))
        var request = HealthCheckRequest()
        let writer = RawResponseWriter { _ in }
        let framed = try #require(try await method.run(.message(request.serializedBytes()), ServerContext(path: ""), writer))
        #expect(try HealthCheckResponse(serializedBytes: Array(framed.dropFirst(5))).status == .serving)
        request.service = "missing"
        await #expect(throws: RPCError.self) { _ = try await method.run(.message(request.serializedBytes()), ServerContext(path: ""), writer) }
    }

    @Test("Watch sends the current status, every change, and ends on shutdown")
    func watch() async throws {
        let health = HealthService()
        var registry = RPCServiceRegistry()
        health.register(into: &registry)
        let method = try #require(registry.method(for: Health.watch.path))
        let received = Collected()
        let writer = RawResponseWriter { bytes in
            let status = try HealthCheckResponse(serializedBytes: Array(bytes.dropFirst(5))).status
            await received.append(status)
        }
        var request = HealthCheckRequest()
        request.service = "svc"
        let task = Task { try await method.run(.message(request.serializedBytes()), ServerContext(path: ""), writer) }
        try await received.waitFor(count: 1)
        health.setStatus(.serving, for: "svc")
        try await received.waitFor(count: 2)
        health.enterShutdown()
        _ = try await task.value
        #expect(await received.values == [.serviceUnknown, .serving, .notServing])
        #expect(health.status(of: "") == .notServing)
    }

    actor Collected {
        var values: [HealthCheckResponse.ServingStatus] = []
        func append(_ value: HealthCheckResponse.ServingStatus) { values.append(value) }
        func waitFor(count: Int) async throws {
            for _ in 0..<500 where values.count < count { try await Task.sleep(for: .milliseconds(10)) }
            #expect(values.count >= count)
        }
    }
}

@Suite("Request metrics")
struct RequestMetricsTests {
    @Test("counts, sums and cumulative buckets merge across shards")
    func render() {
        let metrics = RequestMetrics(shards: 2, service: "svc")
        metrics.record(shard: 0, kind: .grpc, method: "/a.B/C", status: "0", seconds: 0.0002)
        metrics.record(shard: 1, kind: .grpc, method: "/a.B/C", status: "0", seconds: 0.003)
        metrics.record(shard: 1, kind: .grpc, method: "/a.B/C", status: "4", seconds: 40)
        metrics.record(shard: 0, kind: .http, method: "/healthz", status: "200", seconds: 0.01)
        let text = metrics.render()
        #expect(text.contains("talkmesh_grpc_server_requests_total{service=\"svc\",grpc_method=\"/a.B/C\",grpc_code=\"0\"} 2"))
        #expect(text.contains("talkmesh_grpc_server_request_duration_seconds_bucket{service=\"svc\",grpc_method=\"/a.B/C\",grpc_code=\"0\",le=\"0.0005\"} 1"))
        #expect(text.contains("talkmesh_grpc_server_request_duration_seconds_bucket{service=\"svc\",grpc_method=\"/a.B/C\",grpc_code=\"0\",le=\"0.005\"} 2"))
        #expect(text.contains("talkmesh_grpc_server_request_duration_seconds_bucket{service=\"svc\",grpc_method=\"/a.B/C\",grpc_code=\"4\",le=\"30.0\"} 0"))
        #expect(text.contains("talkmesh_grpc_server_request_duration_seconds_bucket{service=\"svc\",grpc_method=\"/a.B/C\",grpc_code=\"4\",le=\"+Inf\"} 1"))
        #expect(text.contains("talkmesh_http_server_requests_total{service=\"svc\",route=\"/healthz\",status=\"200\"} 1"))
        #expect(text.contains("# TYPE talkmesh_server_connections gauge"))
    }
}
