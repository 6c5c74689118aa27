import Glibc
import Logging
import TalkMeshBase
import TalkMeshMessages
import Testing
@testable import TalkMeshRPC

/// An in-process server on loopback whose handlers report what reached them: the metadata and
/// deadline of each call, and how many calls arrived.
final class InterceptedServer: Sendable {
    let server: RPCServer
    let port: Int
    let arrived = Locked(0)
    let seenDeadlines = Locked<[Int64?]>([])

    init() throws {
        var configuration = RPCServer.Configuration()
        configuration.host = "127.0.0.1"
        configuration.eventLoops = 1
        configuration.drainTimeoutNanoseconds = 1_000_000_000
        var registry = RPCServiceRegistry()
        let arrived = self.arrived, seenDeadlines = self.seenDeadlines
        registry.register(EchoService.echo) { request, context in
            arrived.withLock { $0 += 1 }
            seenDeadlines.withLock { $0.append(context.remainingNanoseconds) }
            var response = EchoResponse()
            response.text = request.text
            response.metadata = context.metadata.compactMap { entry in
                if case .string(let value) = entry.value { return "\(entry.key)=\(value)" }
                return nil
            }
            return response
        }
        registry.register(EchoService.hold) { request, _ in
            arrived.withLock { $0 += 1 }
            throw RPCError(code: RPCError.Code(rawValue: Int(request.failCode)), message: request.failMessage)
        }
        registry.register(EchoService.expand) { request, context, writer in
            arrived.withLock { $0 += 1 }
            for index in 0..<Int(request.count) {
                var response = EchoResponse()
                response.sequence = Int32(index)
                response.metadata = context.metadata.first("x-request-id").map { ["x-request-id=\($0)"] } ?? []
                try await writer.write(response)
            }
        }
        var logger = Logger(label: "interceptor-tests")
        logger.logLevel = .critical
        server = try RPCServer(configuration: configuration, services: registry, logger: logger)
        port = try server.bind()
        let box = Unmanaged.passRetained(server).toOpaque()
        var thread = pthread_t()
        pthread_create(&thread, nil, { context in
            let server = Unmanaged<RPCServer>.fromOpaque(context!).takeRetainedValue()
            server.run()
            return nil
        }, box)
        pthread_detach(thread)
    }

    func client(_ interceptors: [ClientInterceptor]) throws -> RPCClient {
        var configuration = RPCClient.Configuration(target: "ipv4:127.0.0.1:\(port)")
        configuration.interceptors = interceptors
        return try RPCClient(configuration: configuration)
    }

    deinit { server.shutdown() }
}

@Suite("Client interceptors")
struct ClientInterceptorTests {
    /// Records the order interceptors ran in and what they saw.
    final class Trail: Sendable {
        let events = Locked<[String]>([])
        func add(_ event: String) { events.withLock { $0.append(event) } }
        var all: [String] { events.withLock { $0 } }
    }

    static func tagging(_ name: String, _ trail: Trail) -> ClientInterceptor {
        { call, next in
            trail.add("\(name) in: \(call.path) \(call.kind)")
            var call = call
            call.options.metadata.add("x-seen-by", .string(name + "+" + (call.options.metadata.first("x-seen-by") ?? "")))
            let headers = try await next(call)
            trail.add("\(name) out")
            return headers
        }
    }

    @Test("interceptors run in order around the call, and what they add is what the server receives")
    func orderAndMetadata() async throws {
        let server = try InterceptedServer()
        let trail = Trail()
        let client = try server.client([Self.tagging("outer", trail), Self.tagging("inner", trail),
                                        ClientInterceptors.metadata { [("x-request-id", "req-1")] }])
        var request = EchoRequest()
        request.text = "hello"
        let response = try await client.unary(EchoService.echo, request)
        #expect(response.text == "hello")
        // The server saw the inner interceptor's value, built on the outer one's.
        #expect(response.metadata.contains("x-seen-by=inner+outer+"))
        #expect(response.metadata.contains("x-request-id=req-1"))
        #expect(trail.all == ["outer in: /talkmesh.testing.v1.EchoService/Echo unary", "inner in: /talkmesh.testing.v1.EchoService/Echo unary",
                              "inner out", "outer out"])
        // A request id the caller set itself is kept.
        var options = CallOptions()
        options.metadata.add("x-request-id", .string("mine"))
        let own = try await client.unary(EchoService.echo, request, options: options)
        #expect(own.metadata.contains("x-request-id=mine") && !own.metadata.contains("x-request-id=req-1"))
        client.close()
    }

    @Test("an interceptor that throws stops the call before it leaves: the server sees nothing")
    func refusal() async throws {
        let server = try InterceptedServer()
        let client = try server.client([{ _, _ in throw RPCError(code: .permissionDenied, message: "not from here") }])
        await #expect(throws: RPCError.self) { _ = try await client.unary(EchoService.echo, EchoRequest()) }
        do {
            _ = try await client.unary(EchoService.echo, EchoRequest())
        } catch let error as RPCError {
            #expect(error.code == .permissionDenied && error.message == "not from here")
        }
        #expect(server.arrived.withLock { $0 } == 0)
        // One that never calls `next` cannot invent a unary response.
        let silent = try server.client([{ _, _ in Metadata() }])
        do {
            _ = try await silent.unary(EchoService.echo, EchoRequest())
            Issue.record("a call with no response succeeded")
        } catch let error as RPCError {
            #expect(error.code == .internal)
        }
        #expect(server.arrived.withLock { $0 } == 0)
        client.close()
        silent.close()
    }

    @Test("an interceptor sees the call's failure with the server's status, once, however the client retries")
    func failures() async throws {
        let server = try InterceptedServer()
        let seen = Locked<[RPCError.Code]>([])
        let client = try server.client([{ call, next in
            do { return try await next(call) } catch let error as RPCError {
                seen.withLock { $0.append(error.code) }
                throw error
            }
        }, ClientInterceptors.logFailures(Logger(label: "client-failures"))])
        var hold = HoldRequest()
        hold.failCode = Int32(RPCError.Code.notFound.rawValue)
        hold.failMessage = "no such thing"
        await #expect(throws: RPCError.self) { _ = try await client.unary(EchoService.hold, hold) }
        // UNAVAILABLE on an idempotent call is retried inside `next`: the interceptor sees it once.
        hold.failCode = Int32(RPCError.Code.unavailable.rawValue)
        await #expect(throws: RPCError.self) { _ = try await client.unary(EchoService.hold, hold, options: .timeout(seconds: 600, idempotent: true)) }
        #expect(seen.withLock { $0 } == [.notFound, .unavailable])
        #expect(server.arrived.withLock { $0 } == 1 + 1 + client.configuration.maxRetries)
        client.close()
    }

    /// The deadlines are minutes long: only what the server saw is compared, and a test run whose
    /// cooperative pool is blocked for a while (a sanitizer run starting PostgreSQL) must not expire them.
    @Test("the deadline interceptor caps a call's deadline, and the server sees the capped one")
    func deadline() async throws {
        let server = try InterceptedServer()
        let limit = MonotonicClock.nanoseconds() + 600_000_000_000
        let client = try server.client([ClientInterceptors.deadline { limit }])
        _ = try await client.unary(EchoService.echo, EchoRequest(), options: .timeout(seconds: 1_200))
        _ = try await client.unary(EchoService.echo, EchoRequest())  // none of its own: the cap becomes its deadline
        let tight = try server.client([ClientInterceptors.deadline { limit + 600_000_000_000 }])
        _ = try await tight.unary(EchoService.echo, EchoRequest(), options: .timeout(seconds: 300))  // its own is shorter: kept
        let free = try server.client([ClientInterceptors.deadline { nil }])
        _ = try await free.unary(EchoService.echo, EchoRequest())
        let deadlines = server.seenDeadlines.withLock { $0 }
        #expect(deadlines.count == 4)
        for remaining in deadlines.prefix(2) {
            #expect(remaining != nil && remaining! > 0 && remaining! <= 600_000_000_000)
        }
        #expect(deadlines[2] != nil && deadlines[2]! > 0 && deadlines[2]! <= 300_000_000_000)
        #expect(deadlines[3] == nil)
        for client in [client, tight, free] { client.close() }
    }

    @Test("a server-streaming call passes through the chain once, when its stream opens")
    func streaming() async throws {
        let server = try InterceptedServer()
        let trail = Trail()
        let client = try server.client([Self.tagging("only", trail), ClientInterceptors.metadata { [("x-request-id", "stream-1")] }])
        var request = ExpandRequest()
        request.count = 3
        var sequences: [Int32] = []
        for try await response in try await client.serverStreaming(EchoService.expand, request) {
            sequences.append(response.sequence)
            #expect(response.metadata == ["x-request-id=stream-1"])
        }
        #expect(sequences == [0, 1, 2])
        #expect(trail.all == ["only in: /talkmesh.testing.v1.EchoService/Expand serverStreaming", "only out"])
        client.close()
    }
}
