/// A plain HTTP request, the same whether it arrived over HTTP/1.1 or HTTP/2.
public struct HTTPRequest: Sendable {
    /// `GET`, `POST`…
    public var method: String
    /// The path without the query string.
    public var path: String
    /// The raw query string (after `?`), or empty.
    public var query: String
    /// Header fields, names lower-cased.
    public var headers: [(name: String, value: String)]
    /// The whole body.
    public var body: [UInt8]
    /// Path parameters captured by the route (`{id}`).
    public var pathParameters: [String: String] = [:]
    /// The peer's address.
    public var peer: String = ""
    /// Whether the request came over TLS (for the URLs a response gives back).
    public var isSecure = false
    /// The body as it arrives, for a route added with `addStreaming` (`body` is empty then).
    public var bodyStream: HTTPBodyStream?
    /// The route the server's router matched when the head arrived, so it is matched once;
    /// `respond` clears it before a handler sees the request.
    var routeMatch: HTTPRouter.Match?

    /// Creates a request.
    public init(method: String, path: String, query: String = "", headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
    }

    /// Creates a request from its request target (`/path?query`), split at the first `?`.
    init(method: String, target: String, headers: [(name: String, value: String)], body: [UInt8] = []) {
        if let question = target.firstIndex(of: "?") {
            self.init(method: method, path: String(target[..<question]), query: String(target[target.index(after: question)...]),
                      headers: headers, body: body)
        } else {
            self.init(method: method, path: target, headers: headers, body: body)
        }
    }

    /// The first value of a header (case-insensitive name).
    public func header(_ name: String) -> String? {
        let lowered = HTTPHeaderName.lowercased(name)
        return headers.first { $0.name == lowered }?.value
    }
}

/// A plain HTTP response.
public struct HTTPResponse: Sendable {
    /// The status code.
    public var status: Int
    /// Header fields; `content-length` is added by the server.
    public var headers: [(name: String, value: String)]
    /// The whole body.
    public var body: [UInt8]
    /// A body produced while it is sent (a download, server-sent events): `body` is ignored.
    /// With a `content-length` header the producer must write exactly that many bytes; without
    /// one HTTP/1.1 sends it chunked. Not run for HEAD.
    public var streamBody: (@Sendable (HTTPBodyWriter) async throws -> Void)?
    /// The request's server span, answered as `traceparent` (the router sets it). The server
    /// writes the field's 55 bytes straight into the header block: no String, no header entry.
    public var trace: TraceContext?

    /// Creates a response.
    public init(status: Int, headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A `text/plain` response.
    public static func text(_ status: Int, _ text: String) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("content-type", "text/plain; charset=utf-8")], body: Array(text.utf8))
    }

    /// An `application/json` response from already-encoded JSON.
    public static func json(_ status: Int, _ json: String) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("content-type", "application/json")], body: Array(json.utf8))
    }

    /// The reason phrase for the status line.
    static func reason(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 201: return "Created"
        case 202: return "Accepted"
        case 204: return "No Content"
        case 301: return "Moved Permanently"
        case 206: return "Partial Content"
        case 304: return "Not Modified"
        case 400: return "Bad Request"
        case 401: return "Unauthorized"
        case 403: return "Forbidden"
        case 404: return "Not Found"
        case 405: return "Method Not Allowed"
        case 408: return "Request Timeout"
        case 409: return "Conflict"
        case 411: return "Length Required"
        case 413: return "Content Too Large"
        case 415: return "Unsupported Media Type"
        case 416: return "Range Not Satisfiable"
        case 422: return "Unprocessable Content"
        case 429: return "Too Many Requests"
        case 431: return "Request Header Fields Too Large"
        case 500: return "Internal Server Error"
        case 501: return "Not Implemented"
        case 502: return "Bad Gateway"
        case 503: return "Service Unavailable"
        case 504: return "Gateway Timeout"
        default: return "Status \(status)"
        }
    }
}

/// Header names, lower-cased as HTTP/2 has them (and HTTP/1.1 headers are kept).
enum HTTPHeaderName {
    /// `name` lower-cased; the same string, not a copy, when it has no upper-case letter
    /// (nearly always: names are written lower-case in the code).
    static func lowercased(_ name: String) -> String {
        name.utf8.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) ? name.lowercased() : name
    }
}
