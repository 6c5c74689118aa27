import Foundation
import Glibc
import TalkMeshBase
import Testing
import TalkMeshCore

@Suite("Blob keys and the file store")
struct StorageTests {
    @Test("keys that could escape the root are refused", arguments: ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a b", "a\\b", "é.wav", "x/"])
    func badKeys(text: String) {
        #expect(throws: ServiceError.self) { try BlobKey(text) }
    }

    @Test("ordinary keys pass")
    func goodKeys() throws {
        #expect(try BlobKey("jobs/abc-1/image.png").rawValue == "jobs/abc-1/image.png")
        #expect(try BlobKey("jobs/a/audio.mp3").replacingExtension(with: "chunks") == "jobs/a/audio.chunks")
        #expect(try BlobKey("jobs/a/noext").replacingExtension(with: "chunks") == "jobs/a/noext.chunks")
    }

    @Test("put, get, exists, delete; writes are atomic (no partial file left)")
    func fileStore() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-store-test-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try FileBlobStore(root: root)
        let key = try BlobKey("jobs/x/data.bin")
        #expect(try !store.exists(key))
        #expect(throws: ServiceError.self) { try store.get(key) }
        try store.put(key, [1, 2, 3])
        #expect(try store.get(key) == [1, 2, 3])
        try store.put(key, [4])
        #expect(try store.get(key) == [4])
        #expect(try store.withLocalFile(key) { $0 } == root + "/jobs/x/data.bin")
        try store.delete(key)
        #expect(try !store.exists(key))
        // Nothing is left in the scratch directory.
        let scratch = try #require(opendir(root + "/.tmp"))
        var names: [String] = []
        while let entry = readdir(scratch) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(scratch)
        #expect(names.isEmpty)
    }

    @Test("the error table maps each code to one gRPC and one HTTP status")
    func table() {
        #expect(ErrorCode.invalidAudio.grpcCode == .invalidArgument && ErrorCode.invalidAudio.httpStatus == 400)
        #expect(ErrorCode.notFound.grpcCode == .notFound)
        #expect(ErrorCode.storageFull.grpcCode == .resourceExhausted)
        let error = ServiceError(.emptyAudio, "no samples").rpcError
        #expect(error.message == "EMPTY_AUDIO: no samples")
        #expect(ServiceError.code(in: error) == .emptyAudio)
    }

    @Test("the work pool runs jobs and stops cancelled ones")
    func pool() async throws {
        let pool = BlockingWorkPool(threads: 1)
        #expect(try await pool.run { _ in 21 * 2 } == 42)
        let task = Task {
            try await pool.run { flag -> Int in
                while !flag.isCancelled { usleep(1000) }
                try flag.check()
                return 0
            }
        }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        await #expect(throws: ServiceError.self) { try await task.value }
        #expect(try await pool.run { _ in 7 } == 7)
    }
}
