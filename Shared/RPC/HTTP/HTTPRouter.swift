/// Routes plain HTTP requests (over HTTP/1.1 or HTTP/2) to async handlers by method and path
/// pattern; `{name}` segments capture path parameters.
public struct HTTPRouter: Sendable {
    /// A REST handler.
    public typealias Handler = @Sendable (HTTPRequest) async throws -> HTTPResponse

    struct Route: Sendable {
        let method: String
        let pattern: String
        let segments: [Substring]
        /// nil: the server's MAX_BODY_BYTES for methods that carry a body, none for the others.
        let maxBodyBytes: Int?
        let handler: Handler
    }

    private var routes: [Route] = []

    public init() {}

    /// Adds a route, e.g. `add("GET", "/v1/jobs/{id}") { request in … }`. `maxBodyBytes` is the
    /// largest body the route reads; by default POST, PUT and PATCH take up to the server's
    /// MAX_BODY_BYTES and every other method takes none. A body past the limit is refused (413)
    /// from the request's head or its first byte over, before anything is buffered or dispatched.
    public mutating func add(_ method: String, _ pattern: String, maxBodyBytes: Int? = nil, _ handler: @escaping Handler) {
        routes.append(Route(method: method.uppercased(), pattern: pattern,
                            segments: pattern.split(separator: "/", omittingEmptySubsequences: true),
                            maxBodyBytes: maxBodyBytes, handler: handler))
    }

    /// What a request may carry, decided from its head alone: the body limit, and the answer when
    /// the body goes past it (413 for a route; the 404 or 405 itself when nothing matches, as such
    /// a request is answered without reading its body).
    func bodyPolicy(method: String, target: String, serverLimit: Int) -> (limit: Int, refusal: HTTPResponse) {
        let path = target.firstIndex(of: "?").map { String(target[..<$0]) } ?? target
        let match = match(method: method, path: path)
        guard case .found(let route, _) = match else { return (0, match.unmatchedResponse) }
        let limit = route.maxBodyBytes ?? (["POST", "PUT", "PATCH"].contains(method) ? serverLimit : 0)
        return (limit, HTTPResponse.text(413, limit == 0 ? "this route takes no request body\n" : "request body too large (limit \(limit) bytes)\n"))
    }

    /// The outcome of matching a request.
    enum Match {
        case found(Route, parameters: [String: String])
        case methodNotAllowed(allowed: [String])
        case notFound

        /// The 404 or 405 answer when nothing matched.
        var unmatchedResponse: HTTPResponse {
            guard case .methodNotAllowed(let allowed) = self else { return HTTPResponse.text(404, "not found\n") }
            var response = HTTPResponse.text(405, "method not allowed\n")
            response.headers.append(("allow", allowed.joined(separator: ", ")))
            return response
        }
    }

    func match(method: String, path: String) -> Match {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        var allowed: [String] = []
        for route in routes {
            guard let parameters = Self.capture(route.segments, parts) else { continue }
            if route.method == method || (method == "HEAD" && route.method == "GET") {
                return .found(route, parameters: parameters)
            }
            allowed.append(route.method)
        }
        return allowed.isEmpty ? .notFound : .methodNotAllowed(allowed: allowed)
    }

    private static func capture(_ pattern: [Substring], _ parts: [Substring]) -> [String: String]? {
        guard pattern.count == parts.count else { return nil }
        var parameters: [String: String] = [:]
        for (segment, part) in zip(pattern, parts) {
            if segment.first == "{", segment.last == "}" {
                parameters[String(segment.dropFirst().dropLast())] = String(part)
            } else if segment != part {
                return nil
            }
        }
        return parameters
    }

    /// Runs the matching handler, answering 404/405 itself; errors become 500.
    func respond(to request: HTTPRequest) async -> (HTTPResponse, route: String) {
        let match = match(method: request.method, path: request.path)
        guard case .found(let route, let parameters) = match else { return (match.unmatchedResponse, "other") }
        var request = request
        request.pathParameters = parameters
        do {
            return (try await route.handler(request), route.pattern)
        } catch {
            return (HTTPResponse.text(500, "internal error: \(error)\n"), route.pattern)
        }
    }
}
