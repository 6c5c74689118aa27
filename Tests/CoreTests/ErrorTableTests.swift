import TalkMeshBase
import Testing
@testable import TalkMeshCore
import Glibc

@Suite struct ErrorTableTests {
    @Test func everyCodeMapsToAStatusAndBack() {
        #expect(ErrorCode.all.count >= 30)
        for code in ErrorCode.all {
            #expect(code.grpcCode != .unknown && code.grpcCode != .ok, "\(code)")
            #expect((400...599).contains(code.httpStatus), "\(code)")
            let sent = ServiceError(code, "message").rpcError
            #expect(ServiceError.code(in: sent) == code)
            #expect(ServiceError(received: sent)?.message == "message")
        }
    }

    @Test func aStatusWithoutAKnownCodeIsNotReadAsOne() {
        #expect(ServiceError(received: RPCError(code: .unavailable, message: "connection refused")) == nil)
        #expect(ServiceError(received: RPCError(code: .internal, message: "NOT_A_CODE: x")) == nil)
        #expect(ServiceError(received: RPCError(code: .invalidArgument, message: "INVALID_IMAGE:  no image "))?.message == "no image")
    }

    @Test func theDispatchersCodesAreInTheTable() {
        for code in [ErrorCode.runpodJobFailed, .runpodResultMissing, .runpodUnavailable, .jobNotFound, .jobTerminal, .jobTimedOut,
                     .illegalTransition, .storeUnavailable, .storeConflict] {
            #expect(ErrorCode.all.contains(code), "\(code)")
        }
        #expect(ErrorCode.jobTerminal.httpStatus == 409 && ErrorCode.jobTerminal.grpcCode == .failedPrecondition)
    }

    @Test("a cause reaches the caller only for the codes that send it; the server keeps it for its log")
    func causesStayInside() throws {
        let stored = FileBlobStore.failure("rename", "/var/lib/talkmesh/blobs/jobs/a", EACCES)
        #expect(stored.code == .storageFailed && !stored.code.sendsCause)
        let sent = stored.rpcError
        #expect(!sent.message.contains("/var/lib") && !sent.message.contains("denied"), "\(sent.message)")
        #expect(!stored.httpError.message.contains("/var/lib"))
        let kept = try #require(sent.cause as? ServiceError)
        #expect(kept.cause?.contains("/var/lib/talkmesh/blobs/jobs/a") == true)
        let image = ServiceError(.invalidImage, "cannot open the input", cause: "Invalid data found when processing input")
        #expect(image.rpcError.message == "INVALID_IMAGE: cannot open the input: Invalid data found when processing input")
        #expect(image.httpError == (400, "INVALID_IMAGE", "cannot open the input: Invalid data found when processing input"))
        let sending = Set(ErrorCode.allCases.filter(\.sendsCause))
        #expect(sending == [.invalidImage, .invalidAudio, .emptyAudio, .invalidVideo])
    }
}
