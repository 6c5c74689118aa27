import Glibc
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

/// `talkmesh-testserver`: hosts `talkmesh.testing.v1.EchoService` on the real runtime, so tests and
/// benchmarks exercise it from real clients (grpcio, h2load, curl, raw sockets).
@main
enum TestServerCommand {
    static func main() {
        ServiceRunner.run(name: "talkmesh-testserver", abstract: "Serves talkmesh.testing.v1.EchoService for the runtime's tests and benchmarks.",
                          defaultPort: 50099) { setup, _ in
            let serverID = ProcessEnvironment.current()["SERVER_ID"] ?? "testserver"
            EchoHandlers(counters: CallCounters(), serverID: serverID, logger: setup.logger).register(into: &setup.services)
            // A REST route that answers with the request body, for HTTP/1.1 and HTTP/2 body tests.
            setup.router.add("POST", "/echo") { request in
                HTTPResponse(status: 200, headers: [("content-type", "application/octet-stream")], body: request.body)
            }
            setup.router.add("GET", "/items/{id}") { request in
                .json(200, "{\"id\":\"\(request.pathParameters["id"] ?? "")\",\"query\":\"\(request.query)\"}")
            }
        }
    }
}
