/// Routes plain HTTP requests (over HTTP/1.1 or HTTP/2) to async handlers by method and path
/// pattern; `{name}` segments capture path parameters.
public struct HTTPRouter: Sendable {
    /// A REST handler.
    public typealias Handler = @Sendable (HTTPRequest) async throws -> HTTPResponse

    struct Route: Sendable {
        let method: String
        let pattern: String
        let segments: [Substring]
        let handler: Handler
    }

    private var routes: [Route] = []

    public init() {}

    /// Adds a route, e.g. `add("GET", "/v1/jobs/{id}") { request in … }`.
    public mutating func add(_ method: String, _ pattern: String, _ handler: @escaping Handler) {
        routes.append(Route(method: method.uppercased(), pattern: pattern,
                            segments: pattern.split(separator: "/", omittingEmptySubsequences: true), handler: handler))
    }

    /// The outcome of matching a request.
    enum Match {
        case found(Handler, pattern: String, parameters: [String: String])
        case methodNotAllowed(allowed: [String])
        case notFound
    }

    func match(method: String, path: String) -> Match {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        var allowed: [String] = []
        for route in routes {
            guard let parameters = Self.capture(route.segments, parts) else { continue }
            if route.method == method || (method == "HEAD" && route.method == "GET") {
                return .found(route.handler, pattern: route.pattern, parameters: parameters)
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
        switch match(method: request.method, path: request.path) {
        case .found(let handler, let pattern, let parameters):
            var request = request
            request.pathParameters = parameters
            do {
                return (try await handler(request), pattern)
            } catch {
                return (HTTPResponse.text(500, "internal error: \(error)\n"), pattern)
            }
        case .methodNotAllowed(let allowed):
            var response = HTTPResponse.text(405, "method not allowed\n")
            response.headers.append(("allow", allowed.joined(separator: ", ")))
            return (response, "other")
        case .notFound:
            return (HTTPResponse.text(404, "not found\n"), "other")
        }
    }
}
