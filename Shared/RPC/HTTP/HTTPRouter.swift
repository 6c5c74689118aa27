import Instrumentation
import Logging

/// Routes plain HTTP requests (over HTTP/1.1 or HTTP/2) to async handlers by method and path
/// pattern; `{name}` segments capture path parameters.
public struct HTTPRouter: Sendable {
    /// A REST handler.
    public typealias Handler = @Sendable (HTTPRequest) async throws -> HTTPResponse

    /// A class: a match hands it on by one reference (each request's match is kept and copied).
    final class Route: Sendable {
        let method: String
        let pattern: String
        /// Each segment's bytes, or nil where a `{name}` captures (names in `parameterNames`).
        let segments: [[UInt8]?]
        let parameterNames: [String?]
        /// nil: the server's MAX_BODY_BYTES for methods that carry a body, none for the others.
        let maxBodyBytes: Int?
        /// The handler starts once the head arrived and reads the body as it comes (`bodyStream`).
        let streamsBody: Bool
        let handler: Handler
        /// Probes and scrapes (`/healthz`, `/readyz`, `/metrics`, `/health`) get no span.
        let traced: Bool
        /// The span name and encoded attributes of the route's requests.
        let span: (name: KeptBytes, attributes: KeptBytes)

        init(method: String, pattern: String, segments: [[UInt8]?], parameterNames: [String?], maxBodyBytes: Int?, streamsBody: Bool,
             handler: @escaping Handler, traced: Bool, span: (name: KeptBytes, attributes: KeptBytes)) {
            self.method = method
            self.pattern = pattern
            self.segments = segments
            self.parameterNames = parameterNames
            self.maxBodyBytes = maxBodyBytes
            self.streamsBody = streamsBody
            self.handler = handler
            self.traced = traced
            self.span = span
        }
    }

    private var routes: [Route] = []

    /// The answer to what the router itself refuses (404, 405, 413) and to a thrown error: a
    /// status, a stable code and a message. Plain text unless a service sets its own format.
    public var errorResponse: @Sendable (_ status: Int, _ code: String, _ message: String) -> HTTPResponse = { status, _, message in
        HTTPResponse.text(status, message + "\n")
    }

    /// What a handler's thrown error becomes; by default `describe(_:)` through `errorResponse`,
    /// logged once on `logger` (at error level for a 5xx, info otherwise) with its full detail.
    public var thrownResponse: (@Sendable (any Error) -> HTTPResponse)?

    /// Where the default `thrownResponse` logs a failed request; set by the server.
    public var logger: Logger?

    /// Runs around every request, matched or not (`route` is the pattern, or "other"): auth,
    /// limits, request ids, access logs. The first added is the outermost; each calls `next`
    /// to go on, or answers itself.
    public typealias Interceptor = @Sendable (_ request: HTTPRequest, _ route: String, _ next: @Sendable (HTTPRequest) async throws -> HTTPResponse) async throws -> HTTPResponse
    public var interceptors: [Interceptor] = []

    public init() {}

    /// Adds a route, e.g. `add("GET", "/v1/jobs/{id}") { request in … }`. `maxBodyBytes` is the
    /// largest body the route reads; by default POST, PUT and PATCH take up to the server's
    /// MAX_BODY_BYTES and every other method takes none. A body past the limit is refused (413)
    /// from the request's head or its first byte over, before anything is buffered or dispatched.
    public mutating func add(_ method: String, _ pattern: String, maxBodyBytes: Int? = nil, _ handler: @escaping Handler) {
        routes.append(Self.route(method, pattern, maxBodyBytes: maxBodyBytes, streamsBody: false, handler: handler))
    }

    private static func route(_ method: String, _ pattern: String, maxBodyBytes: Int?, streamsBody: Bool, handler: @escaping Handler) -> Route {
        let parts = pattern.split(separator: "/", omittingEmptySubsequences: true)
        let names = parts.map { $0.first == "{" && $0.last == "}" ? String($0.dropFirst().dropLast()) : nil }
        return Route(method: method.uppercased(), pattern: pattern,
                     segments: zip(parts, names).map { $1 == nil ? Array($0.utf8) : nil }, parameterNames: names,
                     maxBodyBytes: maxBodyBytes, streamsBody: streamsBody, handler: handler, traced: !untraced.contains(pattern),
                     span: RPCSpans.httpRoute(method: method.uppercased(), route: pattern))
    }

    /// Adds a route whose handler starts as soon as the request's head arrived and reads the body
    /// from `request.bodyStream` as it comes (uploads far larger than memory should hold). Past
    /// `maxBodyBytes` the stream throws `HTTPBodyError.tooLarge` and the server reads no more;
    /// a response sent before the body's end closes the HTTP/1.1 connection (or resets the
    /// HTTP/2 stream) once it is out.
    public mutating func addStreaming(_ method: String, _ pattern: String, maxBodyBytes: Int, _ handler: @escaping Handler) {
        routes.append(Self.route(method, pattern, maxBodyBytes: maxBodyBytes, streamsBody: true, handler: handler))
    }

    /// What a request may carry, decided from its head alone: the body limit, and the answer when
    /// the body goes past it (413 for a route; the 404 or 405 itself when nothing matches, as such
    /// a request is answered without reading its body). The refusal is built only when needed.
    /// `match`: the request's match, kept for `respond` (a request is matched once).
    func bodyPolicy(method: String, target: String, serverLimit: Int)
        -> (limit: Int, refusal: @Sendable () -> HTTPResponse, streams: Bool, match: Match) {
        let match = match(method: method, path: target)  // stops at a `?`
        guard case .found(let route, _) = match else {
            let response = unmatchedResponse(match)
            return (0, { response }, false, match)
        }
        let limit = route.maxBodyBytes ?? (method == "POST" || method == "PUT" || method == "PATCH" ? serverLimit : 0)
        // The refusal keeps the error format, not a copy of the whole router.
        let errorResponse = self.errorResponse
        return (limit, { Self.tooLarge(limit: limit, errorResponse) }, route.streamsBody, match)
    }

    /// The 413 for a body past `limit`.
    public func tooLarge(limit: Int) -> HTTPResponse { Self.tooLarge(limit: limit, errorResponse) }

    static func tooLarge(limit: Int, _ errorResponse: (_ status: Int, _ code: String, _ message: String) -> HTTPResponse) -> HTTPResponse {
        errorResponse(413, "PAYLOAD_TOO_LARGE", limit == 0 ? "this route takes no request body" : "request body too large (limit \(limit) bytes)")
    }

    /// The outcome of matching a request.
    enum Match: Sendable {
        case found(Route, parameters: [String: String])
        case methodNotAllowed(allowed: [String])
        case notFound
    }

    /// The 404 or 405 answer when nothing matched.
    func unmatchedResponse(_ match: Match) -> HTTPResponse {
        guard case .methodNotAllowed(let allowed) = match else { return errorResponse(404, "NOT_FOUND", "not found") }
        var response = errorResponse(405, "METHOD_NOT_ALLOWED", "method not allowed")
        response.headers.append(("allow", allowed.joined(separator: ", ")))
        return response
    }

    /// Matches on the path's bytes (every request is matched, some twice: no String slicing).
    func match(method: String, path: String) -> Match {
        var path = path
        return path.withUTF8 { bytes in
            var parts: [Range<Int>] = []
            parts.reserveCapacity(8)
            var start = 0
            let end = bytes.firstIndex(of: UInt8(ascii: "?")) ?? bytes.count  // a target's query is not the path
            for index in 0...end where index == end || bytes[index] == UInt8(ascii: "/") {
                if index > start { parts.append(start..<index) }
                start = index + 1
            }
            var allowed: [String] = []
            for route in routes where Self.fits(route, bytes, parts) {
                if route.method == method || (method == "HEAD" && route.method == "GET") {
                    var parameters: [String: String] = [:]
                    for (name, part) in zip(route.parameterNames, parts) {
                        if let name { parameters[name] = String(decoding: UnsafeBufferPointer(rebasing: bytes[part]), as: UTF8.self) }
                    }
                    return .found(route, parameters: parameters)
                }
                allowed.append(route.method)
            }
            return allowed.isEmpty ? .notFound : .methodNotAllowed(allowed: allowed)
        }
    }

    private static func fits(_ route: Route, _ bytes: UnsafeBufferPointer<UInt8>, _ parts: [Range<Int>]) -> Bool {
        guard route.segments.count == parts.count else { return false }
        for (segment, part) in zip(route.segments, parts) {
            if let segment, !segment.elementsEqual(bytes[part]) { return false }
        }
        return true
    }

    /// Runs the matching handler, answering 404/405 itself; a thrown error becomes
    /// `thrownResponse` (by default 500).
    func respond(to request: HTTPRequest) async -> (HTTPResponse, route: String) {
        // The server matched the head with this same router (`bodyPolicy`); a request built
        // elsewhere, or handed on by a handler (which never carries one), is matched here.
        let match = request.routeMatch ?? self.match(method: request.method, path: request.path)
        var request = request
        request.routeMatch = nil
        let pattern: String
        var handler: Handler
        var traced = true
        var spanOfRoute: (name: KeptBytes, attributes: KeptBytes)?
        if case .found(let route, let parameters) = match {
            request.pathParameters = parameters
            pattern = route.pattern
            handler = route.handler
            traced = route.traced
            spanOfRoute = route.span
        } else {
            let unmatched = unmatchedResponse(match)
            pattern = "other"
            handler = { _ in unmatched }
        }
        for interceptor in interceptors.reversed() {
            let next = handler
            handler = { request in try await interceptor(request, pattern, next) }
        }
        // Probes and scrapes are not traced. Every other request gets a server span, a child of its
        // traceparent, and answers its own traceparent so a caller can find the trace; while the
        // process records no spans (no exporter), a request without a traceparent starts none:
        // there would be nothing to find.
        let traceparent = request.header("traceparent")
        guard traced, traceparent != nil || TalkMeshTracer.withShared({ $0.records }) else {
            do { return (try await handler(request), pattern) } catch { return (response(for: error), pattern) }
        }
        let span = RPCSpans.http(traceparent: traceparent, tracestate: traceparent == nil ? nil : request.header("tracestate"))
        var answer: HTTPResponse
        do {
            let traced = request, run = handler
            answer = try await TraceContext.withCurrent(span.trace) { try await run(traced) }
        } catch {
            answer = response(for: error)
        }
        answer.trace = span.trace
        if let spanOfRoute {
            RPCSpans.end(span, name: spanOfRoute.name, attributes: spanOfRoute.attributes, httpStatus: answer.status)
        } else {
            RPCSpans.end(span, method: request.method, route: pattern, httpStatus: answer.status)
        }
        return (answer, pattern)
    }

    static let untraced: Set<String> = ["/healthz", "/readyz", "/metrics", "/health"]

    /// The answer to a thrown error (`thrownResponse`, by default `describe(_:)`).
    public func response(for error: any Error) -> HTTPResponse {
        if let thrownResponse { return thrownResponse(error) }
        let (status, code, message) = Self.describe(error)
        logger?.log(level: status >= 500 ? .error : .info, "request failed",
                    metadata: ["status": "\(status)", "code": "\(code)", "error": "\(error)"])
        return errorResponse(status, code, message)
    }
}
