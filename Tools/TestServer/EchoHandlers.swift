import Glibc
import Logging
import TalkMeshBase
import TalkMeshMessages
import TalkMeshRPC

/// Counts what happened to `Hold` calls, by tag, so tests can see a cancellation reach a handler.
final class CallCounters: @unchecked Sendable {
    private let lock = PThreadMutex()
    private var counts: [String: StatsResponse] = [:]

    func update(_ tag: String, _ change: (inout StatsResponse) -> Void) {
        lock.withLock { change(&counts[tag, default: StatsResponse()]) }
    }

    func stats(_ tag: String) -> StatsResponse {
        lock.withLock { counts[tag] ?? StatsResponse() }
    }
}

/// The EchoService handlers.
struct EchoHandlers {
    let counters: CallCounters
    /// Names this server in responses (balancing tests count answers per server).
    let serverID: String
    let logger: Logger

    func register(into registry: inout RPCServiceRegistry) {
        registry.register(EchoService.echo) { request, context in
            var response = EchoResponse()
            response.payload = request.payload
            response.text = request.text
            response.server = serverID
            // Propagation tests send a traceparent and read back the handler's; a call that brought
            // none gets none back (a traced server's answers stay the size of an untraced one's).
            if let trace = context.trace, trace.parentSpanIDValue != 0 { response.traceparent = trace.traceparent }
            if request.text == "log" { logger.info("echo asked to log") }
            response.metadata = context.metadata.map { entry in
                switch entry.value {
                case .string(let text): return "\(entry.key)=\(text)"
                case .binary(let bytes): return "\(entry.key)=\(Base64.encode(bytes))"
                }
            }
            return response
        }
        registry.register(EchoService.expand) { request, _, writer in
            for index in 0..<max(0, Int(request.count)) {
                if request.intervalMs > 0 { try await Task.sleep(for: .milliseconds(Int(request.intervalMs))) }
                var response = EchoResponse()
                response.payload = request.payload
                response.sequence = Int32(index)
                response.server = serverID
                try await writer.write(response)
            }
        }
        registry.register(EchoService.hold) { [counters] request, _ in
            counters.update(request.tag) { $0.started += 1 }
            do {
                try await Task.sleep(for: .milliseconds(Int(request.delayMs)))
            } catch {
                counters.update(request.tag) { $0.cancelled += 1 }
                throw error
            }
            counters.update(request.tag) { $0.completed += 1 }
            if request.failCode != 0 {
                throw RPCError(code: RPCError.Code(rawValue: Int(request.failCode)), message: request.failMessage)
            }
            var response = EchoResponse()
            response.text = request.tag
            response.server = serverID
            return response
        }
        registry.register(EchoService.stats) { [counters] request, _ in
            counters.stats(request.tag)
        }
    }
}
