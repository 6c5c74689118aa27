import ArgumentParser
import Glibc
import TalkMeshBase
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

/// `talkmesh-testclient`: drives the RPC client against EchoService servers (ours or grpcio) and
/// prints what it observed as JSON, for the integration tests and bench/rpc to check.
@main
struct TestClientCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-testclient",
        abstract: "Exercises the TalkMesh RPC client against EchoService servers.",
        subcommands: [Interop.self, Balance.self, Call.self, Stream.self, Bench.self])
}

struct ClientOptions: ParsableArguments {
    @Option(help: "Target: host:port, dns:///name:port, dns://server/name:port, ipv4:a:p,b:p.")
    var target: String
    @Option(help: "CA file: use TLS.")
    var caFile: String?
    @Option var certFile: String?
    @Option var keyFile: String?
    @Option(help: "Re-resolution interval.")
    var resolveInterval = "30s"
    @Option(help: "Keepalive PING interval (0 disables).")
    var keepaliveInterval = "30s"
    @Option(help: "Keepalive PING timeout.")
    var keepaliveTimeout = "10s"
    @Option(help: "Reconnect backoff, first delay.")
    var reconnectBackoff = "200ms"

    func makeClient() throws -> RPCClient {
        var configuration = RPCClient.Configuration(target: target)
        if let caFile { configuration.tls = try ClientTLS(caFile: caFile, certificateFile: certFile, keyFile: keyFile) }
        configuration.resolveIntervalNanoseconds = DurationSetting.parseNanoseconds(resolveInterval) ?? 30_000_000_000
        configuration.keepaliveIntervalNanoseconds = DurationSetting.parseNanoseconds(keepaliveInterval) ?? 30_000_000_000
        configuration.keepaliveTimeoutNanoseconds = DurationSetting.parseNanoseconds(keepaliveTimeout) ?? 10_000_000_000
        configuration.reconnectBackoffInitialNanoseconds = DurationSetting.parseNanoseconds(reconnectBackoff) ?? 200_000_000
        return try RPCClient(configuration: configuration)
    }
}

func json(_ value: Any) -> String {
    switch value {
    case let text as String: return JSONLogHandler.quote(text)
    case let flag as Bool: return flag ? "true" : "false"
    case let number as Int: return String(number)
    case let number as Int32: return String(number)
    case let number as Double: return String(number)
    case let list as [Any]: return "[" + list.map(json).joined(separator: ",") + "]"
    case let map as [String: Any]: return "{" + map.keys.sorted().map { "\(JSONLogHandler.quote($0)):\(json(map[$0]!))" }.joined(separator: ",") + "}"
    default: return "null"
    }
}

func describe(_ error: any Error) -> [String: Any] {
    let rpc = RPCError(from: error)
    return ["code": rpc.code.rawValue, "name": rpc.code.description, "message": rpc.message]
}

/// The interop scenarios: unary with metadata, server streaming, an error with a message, a
/// deadline, and a trace context carried to the server.
struct Interop: AsyncParsableCommand {
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let client = try options.makeClient()
        var result: [String: Any] = [:]

        var request = EchoRequest()
        request.payload = Array(repeating: 7, count: 100_000)
        request.text = "héllo"
        var metadata = Metadata()
        metadata.add("x-request-id", .string("abc-123"))
        metadata.add("trace-bin", .binary([0, 1, 0xFE, 0xFF]))
        do {
            let response = try await client.unaryCall(EchoService.echo, request, options: CallOptions(timeoutNanoseconds: 5_000_000_000, metadata: metadata))
            result["unary"] = [
                "payload_ok": response.message.payload == request.payload, "text": response.message.text,
                "metadata": response.message.metadata,
                "initial": response.initialMetadata.map { "\($0.key)=\(Self.text($0.value))" },
                "trailing": response.trailingMetadata.map { "\($0.key)=\(Self.text($0.value))" },
            ]
        } catch { result["unary"] = ["error": describe(error)] }

        do {
            var expand = ExpandRequest()
            expand.payload = Array(repeating: 1, count: 1000)
            expand.count = 25
            var sequences: [Any] = []
            for try await response in try await client.serverStreaming(EchoService.expand, expand) { sequences.append(Int(response.sequence)) }
            result["streaming"] = ["sequences": sequences]
        } catch { result["streaming"] = ["error": describe(error)] }

        do {
            var hold = HoldRequest()
            hold.failCode = 9
            hold.failMessage = "bad % input — ünïcode"
            _ = try await client.unary(EchoService.hold, hold)
            result["error"] = ["error": NSNull.self]
        } catch { result["error"] = describe(error) }

        let started = MonotonicClock.nanoseconds()
        do {
            var hold = HoldRequest()
            hold.delayMs = 5000
            _ = try await client.unary(EchoService.hold, hold, options: .timeout(seconds: 0.3))
            result["deadline"] = ["error": NSNull.self]
        } catch {
            var detail = describe(error)
            detail["elapsed_ms"] = Int((MonotonicClock.nanoseconds() - started) / 1_000_000)
            result["deadline"] = detail
        }

        let parent = TraceContext.root()
        do {
            let response = try await TraceContext.withCurrent(parent) {
                var traced = EchoRequest()
                traced.text = "log"
                return try await client.unary(EchoService.echo, traced)
            }
            result["trace"] = ["sent_trace_id": parent.traceID, "sent_span_id": parent.spanID, "server_traceparent": response.traceparent]
        } catch { result["trace"] = ["error": describe(error)] }

        print(json(result))
        client.close()
    }

    static func text(_ value: Metadata.Value) -> String {
        switch value {
        case .string(let text): return text
        case .binary(let bytes): return Base64.encode(bytes)
        }
    }
}

enum NSNull { }

/// Many unary calls from concurrent workers; counts answers per server and failures.
struct Balance: AsyncParsableCommand {
    @OptionGroup var options: ClientOptions
    @Option var calls = 3000
    @Option var concurrency = 8
    @Option(help: "Pause between one worker's calls, in milliseconds.")
    var intervalMs = 0
    @Flag var idempotent = false
    @Option(help: "Per-call timeout.")
    var timeout = "5s"

    func run() async throws {
        let client = try options.makeClient()
        let timeoutNanoseconds = DurationSetting.parseNanoseconds(timeout) ?? 5_000_000_000
        let perWorker = calls / concurrency
        let outcomes = await withTaskGroup(of: [(String?, RPCError?)].self) { group in
            for worker in 0..<concurrency {
                group.addTask {
                    var outcomes: [(String?, RPCError?)] = []
                    for index in 0..<perWorker {
                        var request = EchoRequest()
                        request.text = "\(worker)-\(index)"
                        do {
                            let response = try await client.unary(EchoService.echo, request,
                                                                  options: CallOptions(timeoutNanoseconds: timeoutNanoseconds, idempotent: idempotent))
                            outcomes.append((response.server, nil))
                        } catch {
                            outcomes.append((nil, RPCError(from: error)))
                        }
                        if intervalMs > 0 { try? await Task.sleep(for: .milliseconds(intervalMs)) }
                    }
                    return outcomes
                }
            }
            var all: [(String?, RPCError?)] = []
            for await part in group { all += part }
            return all
        }
        var byServer: [String: Any] = [:]
        var errors: [Any] = []
        for (server, error) in outcomes {
            if let server { byServer[server] = (byServer[server] as? Int ?? 0) + 1 }
            if let error, errors.count < 20 { errors.append(describe(error)) }
        }
        let failures = outcomes.filter { $0.0 == nil }.count
        let addresses = await client.addresses().map { "\($0.address)=\($0.state)" }
        // With one worker the calls are made one after another: the servers in call order.
        let order: [Any] = concurrency == 1 ? outcomes.prefix(1000).map { $0.0 ?? "-" } : []
        print(json(["by_server": byServer, "failures": failures, "errors": errors, "addresses": addresses, "order": order]))
        client.close()
    }
}

/// One unary call, for the wire tests: its deadline, idempotence, and a cancellation of the task
/// that made it after `--cancel-after` milliseconds.
struct Call: AsyncParsableCommand {
    @OptionGroup var options: ClientOptions
    @Flag var idempotent = false
    @Option(help: "The call's deadline.")
    var timeout = "5s"
    @Option(help: "Cancel the calling task after this many milliseconds (0: never).")
    var cancelAfter = 0

    func run() async throws {
        let client = try options.makeClient()
        let callOptions = CallOptions(timeoutNanoseconds: DurationSetting.parseNanoseconds(timeout) ?? 5_000_000_000, idempotent: idempotent)
        let call = Task { () -> String in
            do {
                let response = try await client.unary(EchoService.echo, EchoRequest(), options: callOptions)
                return json(["ok": true, "server": response.server])
            } catch {
                return json(["ok": false, "error": describe(error)])
            }
        }
        if cancelAfter > 0 {
            try await Task.sleep(for: .milliseconds(cancelAfter))
            call.cancel()
        }
        print(await call.value)
        // The cancellation's RST_STREAM leaves on the loop; give it a moment before closing.
        try await Task.sleep(for: .milliseconds(200))
        client.close()
    }
}

/// One long server stream; reports how it ended (the server dying, a keepalive timeout…).
struct Stream: AsyncParsableCommand {
    @OptionGroup var options: ClientOptions
    @Option var count = 1000
    @Option var intervalMs = 10

    func run() async throws {
        let client = try options.makeClient()
        var request = ExpandRequest()
        request.count = Int32(count)
        request.intervalMs = Int32(intervalMs)
        var received = 0
        let started = MonotonicClock.nanoseconds()
        var outcome: [String: Any] = [:]
        do {
            for try await _ in try await client.serverStreaming(EchoService.expand, request) {
                received += 1
                if received == 1 { StandardStream.write(1, "{\"started\":true}\n") }
            }
            outcome["error"] = NSNull.self
        } catch {
            outcome = describe(error)
        }
        outcome["received"] = received
        outcome["elapsed_ms"] = Int((MonotonicClock.nanoseconds() - started) / 1_000_000)
        print(json(outcome))
        client.close()
    }
}

/// Unary calls per second from this client (for bench/rpc).
struct Bench: AsyncParsableCommand {
    @OptionGroup var options: ClientOptions
    @Option var calls = 100_000
    @Option var concurrency = 64

    func run() async throws {
        let client = try options.makeClient()
        _ = try await client.unary(Health.check, HealthCheckRequest())
        let perWorker = calls / concurrency
        let started = MonotonicClock.nanoseconds()
        let failures = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<concurrency {
                group.addTask {
                    var failed = 0
                    for _ in 0..<perWorker {
                        do { _ = try await client.unary(Health.check, HealthCheckRequest()) } catch { failed += 1 }
                    }
                    return failed
                }
            }
            return await group.reduce(0, +)
        }
        let seconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
        print(json(["calls": perWorker * concurrency, "failures": failures, "seconds": seconds, "rate": Double(perWorker * concurrency) / seconds]))
        client.close()
    }
}
