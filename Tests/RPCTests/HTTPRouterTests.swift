import Logging
import TalkMeshBase
import Testing
@testable import TalkMeshRPC

/// Keeps every line logged through it.
final class CapturingLogHandler: LogHandler, Sendable {
    struct Line: Sendable { var level: Logger.Level; var message: String; var metadata: [String: String] }
    let lines = Locked<[Line]>([])
    var metadata: Logger.Metadata { get { [:] } set {} }
    var logLevel: Logger.Level { get { .trace } set {} }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? { get { nil } set {} }
    func log(event: LogEvent) {
        let line = Line(level: event.level, message: "\(event.message)", metadata: (event.metadata ?? [:]).mapValues { "\($0)" })
        lines.withLock { $0.append(line) }
    }
    var captured: [Line] { lines.withLock { $0 } }
}

struct Refusal: HTTPErrorConvertible {
    var httpError: (status: Int, code: String, message: String) { (422, "TOO_ODD", "the request is too odd") }
}

struct Secret: Error, CustomStringConvertible {
    var description: String { "open /var/lib/talkmesh/secret: Permission denied" }
}

@Suite("HTTP router")
struct HTTPRouterTests {
    func router() -> HTTPRouter {
        var router = HTTPRouter()
        router.add("GET", "/v1/jobs/{id}") { request in .text(200, "job \(request.pathParameters["id"]!)") }
        router.add("POST", "/v1/jobs") { request in .text(201, "created \(request.body.count)") }
        router.add("GET", "/fail") { _ in throw RPCError(code: .internal, message: "boom") }
        return router
    }

    @Test("path parameters are captured")
    func parameters() async {
        let (response, route) = await router().respond(to: HTTPRequest(method: "GET", path: "/v1/jobs/abc"))
        #expect(response.status == 200)
        #expect(String(decoding: response.body, as: UTF8.self) == "job abc")
        #expect(route == "/v1/jobs/{id}")
    }

    @Test("a known path with another method is 405 with Allow")
    func methodNotAllowed() async {
        let (response, _) = await router().respond(to: HTTPRequest(method: "DELETE", path: "/v1/jobs"))
        #expect(response.status == 405)
        #expect(response.headers.contains { $0.name == "allow" && $0.value == "POST" })
    }

    @Test("unknown paths are 404; HEAD is served by GET routes")
    func notFoundAndHead() async {
        #expect(await router().respond(to: HTTPRequest(method: "GET", path: "/v1/jobs/a/b")).0.status == 404)
        #expect(await router().respond(to: HTTPRequest(method: "HEAD", path: "/v1/jobs/x")).0.status == 200)
    }

    @Test("a throwing handler becomes 500")
    func throwing() async {
        #expect(await router().respond(to: HTTPRequest(method: "GET", path: "/fail")).0.status == 500)
    }

    @Test("a thrown error answers with its own status and code; its detail is logged once, never sent")
    func thrownErrorsMap() async throws {
        let handler = CapturingLogHandler()
        var router = HTTPRouter()
        router.logger = Logger(label: "test") { _ in handler }
        router.add("GET", "/odd") { _ in throw Refusal() }
        router.add("GET", "/down") { _ in throw RPCError(code: .unavailable, message: "the store is down") }
        router.add("GET", "/secret") { _ in throw Secret() }
        router.add("GET", "/body") { _ in throw HTTPBodyError.tooLarge(limit: 10) }
        let odd = await router.respond(to: HTTPRequest(method: "GET", path: "/odd")).0
        #expect(odd.status == 422 && String(decoding: odd.body, as: UTF8.self) == "the request is too odd\n")
        #expect(await router.respond(to: HTTPRequest(method: "GET", path: "/down")).0.status == 503)
        #expect(await router.respond(to: HTTPRequest(method: "GET", path: "/body")).0.status == 413)
        let secret = await router.respond(to: HTTPRequest(method: "GET", path: "/secret")).0
        #expect(secret.status == 500 && String(decoding: secret.body, as: UTF8.self) == "internal error\n")
        let lines = handler.captured
        #expect(lines.count == 4)
        let logged = try #require(lines.last)
        #expect(logged.level == .error && logged.metadata["error"] == Secret().description && logged.metadata["status"] == "500")
        #expect(lines[0].level == .info && lines[0].metadata["code"] == "TOO_ODD")
    }

    @Test("gRPC statuses map to HTTP as gRPC's HTTP mapping gives them")
    func grpcToHTTP() {
        let expected: [(RPCError.Code, Int)] = [(.invalidArgument, 400), (.notFound, 404), (.unauthenticated, 401), (.permissionDenied, 403),
                                                (.resourceExhausted, 429), (.unavailable, 503), (.deadlineExceeded, 504), (.internal, 500),
                                                (.unimplemented, 501), (.aborted, 409), (.cancelled, 499)]
        for (code, status) in expected { #expect(code.httpStatus == status, "\(code)") }
    }
}
