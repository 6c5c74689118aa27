import Foundation
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// `talkmesh.v1.DispatcherService` for gRPC clients outside the mesh, forwarded to the
/// Dispatcher on the same keys, limits and jobs as the REST API: the key comes from
/// `authorization: Bearer KEY` (or `x-api-key`) metadata, the owner is always the key's id, and a
/// key sees and changes only its own jobs. `CreateJob` may name only this key's uploads (the
/// `image_key` and `audio_key` of its earlier jobs: a new size or prompt without uploading again).
extension Gateway {
    public func installGRPC(into registry: inout RPCServiceRegistry) {
        registry.interceptors.append { [self] context, next in try await authenticatedCall(context, next) }
        let timeout = CallOptions(timeoutNanoseconds: 30_000_000_000)
        registry.register(DispatcherService.createJob) { [self] request, context in
            let key = try Self.caller()
            try await checkJobBudget(key)
            var create = request
            create.owner = key.id
            // The webhook key is the one every job of this API key is signed with, never the caller's pick.
            create.webhookSecret = create.options?.webhookUrl.isEmpty == false
                ? Self.webhookSecret(authorization: context.metadata.first("authorization"), apiKey: context.metadata.first("x-api-key")) : ""
            let folder = Self.uploadFolder(of: key)
            for (field, blob) in [("image_key", create.imageKey), ("audio_key", create.audioKey)] {
                let exists = try? await blobIO.run { [blobs] _ in try blobs.exists(try BlobKey(blob)) }
                guard blob.hasPrefix(folder), !blob.contains(".."), exists == true else {
                    throw ServiceError(.invalidArgument, "\(field) must name one of this key's uploads (the \(field) of one of its jobs)")
                }
            }
            return try await dispatcher.unary(DispatcherService.createJob, create, options: timeout)
        }
        registry.register(DispatcherService.getJob) { [self] request, _ in
            try await ownJob(request.id, includingTimeline: request.includeTimeline)
        }
        registry.register(DispatcherService.listJobs) { [self] request, _ in
            var list = request
            list.owner = try Self.caller().id
            return try await dispatcher.unary(DispatcherService.listJobs, list, options: timeout)
        }
        registry.register(DispatcherService.cancelJob) { [self] request, _ in
            let job = try await ownJob(request.id)
            return try await dispatcher.unary(DispatcherService.cancelJob, CancelJobRequest.with(id: job.id), options: timeout)
        }
        registry.register(DispatcherService.watchJob) { [self] request, _, writer in
            _ = try await ownJob(request.id)
            let stream = try await dispatcher.serverStreaming(DispatcherService.watchJob, request, options: CallOptions())
            for try await update in stream {
                jobCache.store(update)
                try await writer.write(update)
            }
        }
    }

    /// The key from the call's metadata, then its request budget; the handler runs with the key
    /// in scope. Health checks need no key. One access-log line per call.
    private func authenticatedCall(_ context: ServerContext, _ next: @Sendable (ServerContext) async throws -> Void) async throws {
        if context.path.hasPrefix("/grpc.health.v1.Health/") { return try await next(context) }
        let started = MonotonicClock.nanoseconds()
        var keyID = "-"
        var outcome = "OK"
        defer {
            logger.info("call", metadata: [
                "key_id": "\(keyID)", "method": "\(context.path)", "status": "\(outcome)", "trace_id": "\(context.trace?.traceID ?? "-")",
                "duration_ms": "\(Double((MonotonicClock.nanoseconds() - started) / 10_000) / 100)",
            ])
        }
        do {
            let secret = Self.secret(authorization: context.metadata.first("authorization"), apiKey: context.metadata.first("x-api-key"))
            guard let secret, !secret.isEmpty else {
                metrics.authFailures.increment(["missing"])
                throw RPCError(code: .unauthenticated, message: "UNAUTHORIZED: an API key is required (authorization: Bearer KEY metadata)")
            }
            guard let key = keys.authenticate(secret) else {
                metrics.authFailures.increment(["invalid"])
                throw RPCError(code: .unauthenticated, message: "UNAUTHORIZED: the API key is not valid")
            }
            keyID = key.id
            let decision = await limiter.take("req:" + key.id, rate: key.rate, burst: key.burst)
            guard decision.allowed else {
                metrics.rateLimited.increment([key.id, "requests"])
                throw RPCError(code: .resourceExhausted, message: "RATE_LIMITED: request rate limit exceeded; retry after \(decision.retryAfterSeconds) s")
            }
            let given = context.metadata.first("x-request-id") ?? ""
            let info = RequestInfo(id: Self.validRequestID(given) ? given : Self.newRequestID())
            info.keyID = key.id
            try await Self.$key.withValue(key) {
                try await Self.$info.withValue(info) {
                    try await Self.$callerDeadline.withValue(context.deadline) { try await next(context) }
                }
            }
        } catch let refusal as RateLimitRefusal {
            outcome = "RESOURCE_EXHAUSTED"
            throw RPCError(code: .resourceExhausted, message: "RATE_LIMITED: \(refusal.message)")
        } catch {
            outcome = (error as? RPCError).map { "\($0.code)" } ?? (error as? ServiceError).map { $0.code.rawValue } ?? "INTERNAL"
            throw error
        }
    }

    /// What wraps every call to the Dispatcher: the caller's deadline goes on (a gRPC caller's,
    /// from `authenticatedCall`), the request id goes along as `x-request-id` (the REST request's,
    /// or a gRPC caller's), and a failed call is logged once.
    public static func dispatcherInterceptors(logger: Logger) -> [ClientInterceptor] {
        [ClientInterceptors.deadline { Gateway.callerDeadline },
         ClientInterceptors.metadata { Gateway.info.map { [("x-request-id", $0.id)] } ?? [] },
         ClientInterceptors.logFailures(logger)]
    }
}

extension CancelJobRequest {
    static func with(id: String) -> CancelJobRequest {
        var request = CancelJobRequest()
        request.id = id
        return request
    }
}
