import Testing
@testable import TalkMeshRPC

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
}
