import Testing
import TalkMeshCore
import TalkMeshRPC
@testable import TalkMeshDispatcherService

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
}
