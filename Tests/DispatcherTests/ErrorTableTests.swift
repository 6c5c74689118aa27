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
        }
    }

    @Test func theDispatchersCodesAreInTheTable() {
        for code in [ErrorCode.runpodJobFailed, .runpodResultMissing, .runpodUnavailable, .jobNotFound, .jobTerminal, .jobTimedOut,
                     .illegalTransition, .storeUnavailable, .storeConflict] {
            #expect(ErrorCode.all.contains(code), "\(code)")
        }
        #expect(ErrorCode.jobTerminal.httpStatus == 409 && ErrorCode.jobTerminal.grpcCode == .failedPrecondition)
    }
}
