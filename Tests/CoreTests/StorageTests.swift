import Foundation
import Glibc
import TalkMeshBase
import Testing
import TalkMeshCore

@Suite("Blob keys and the file store")
struct StorageTests {
    @Test("keys that could escape the root are refused", arguments: ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a b", "a\\b", "é.wav", "x/", ".", "..", "a/..", "a/.",
                                                                  String(repeating: "s", count: 256), "a/" + String(repeating: "s", count: 256) + "/b",
                                                                  String(repeating: "a/", count: 256) + "a"])
    func badKeys(text: String) {
        #expect(throws: ServiceError.self) { try BlobKey(text) }
    }

    @Test("ordinary keys pass")
    func goodKeys() throws {
        #expect(try BlobKey("jobs/abc-1/image.png").rawValue == "jobs/abc-1/image.png")
        #expect(try BlobKey("jobs/a/audio.mp3").replacingExtension(with: "chunks") == "jobs/a/audio.chunks")
        #expect(try BlobKey("jobs/a/noext").replacingExtension(with: "chunks") == "jobs/a/noext.chunks")
        for text in ["...", "a/.../b", ".hidden/x", "a/b..", "_-.x", String(repeating: "s", count: 255),
                     String(repeating: "s", count: 255) + "/" + String(repeating: "t", count: 255)] {
            #expect(try BlobKey(text).rawValue == text)
        }
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

    @Test("the store makes missing directories at any depth, its root's too, and refuses a path through a file")
    func directoriesAreMadeFromTheDeepestUp() throws {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-store-test-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: base) }
        let store = try FileBlobStore(root: base + "/a/b/c/")
        #expect(store.root == base + "/a/b/c")
        try store.put(try BlobKey("jobs/j1/parts/0000.mp4"), [7])
        try store.put(try BlobKey("jobs/j1/parts/0001.mp4"), [8])
        try store.put(try BlobKey("jobs/j2/x.bin"), [9])
        #expect(try store.get(try BlobKey("jobs/j1/parts/0001.mp4")) == [8])
        #expect(try store.list(prefix: "jobs/").map(\.key.rawValue) == ["jobs/j1/parts/0000.mp4", "jobs/j1/parts/0001.mp4", "jobs/j2/x.bin"])
        // A file where a directory must go: a clear error, not a crash or a blob half written.
        try store.put(try BlobKey("file"), [1])
        #expect(throws: ServiceError.self) { try store.put(try BlobKey("file/below"), [2]) }
        #expect(throws: ServiceError.self) { try FileBlobStore(root: base + "/a/b/c/file/root") }
    }

    @Test("readAll returns a file's bytes whatever its size, and a file whose stat size is 0 but has bytes")
    func readAllReadsWholeFiles() throws {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-read-test-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        for size in [0, 1, 65_535, 65_536, 200_001] {
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            try FileBlobStore.writeAll(base + "/f\(size)", bytes)
            #expect(try FileBlobStore.readAll(base + "/f\(size)") == bytes)
        }
        // /proc files state a size of 0 and still have bytes.
        let status = String(decoding: try FileBlobStore.readAll("/proc/self/status"), as: UTF8.self)
        #expect(status.hasPrefix("Name:") && status.contains("VmRSS"))
        #expect(throws: ServiceError.self) { try FileBlobStore.readAll(base + "/missing") }
    }

    @Test("a retired blob's file becomes the next scratch file (same inode); big ones and those past the cap are deleted")
    func retiredFilesAreReused() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("talkmesh-store-test-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try FileBlobStore(root: root)
        func inode(_ path: String) -> UInt64? {
            var info = stat()
            return stat(path, &info) == 0 ? UInt64(info.st_ino) : nil
        }
        let old = try BlobKey("jobs/x/chunks/0000.wav")
        try store.put(old, [UInt8](repeating: 7, count: 100_000))
        let retiredInode = try #require(inode(root + "/" + old.rawValue))
        try store.retire(old)
        #expect(try !store.exists(old))
        let scratch = try store.reusableScratchPath(suffix: ".mp4")
        #expect(inode(scratch) == retiredInode)
        // Written from the start and cut to its length, it is stored under a new key.
        try FileBlobStore.writeAll(scratch, [1, 2, 3])
        let new = try BlobKey("jobs/x/parts/0000.mp4")
        try store.store(new, fromFile: scratch)
        #expect(try store.get(new) == [1, 2, 3])
        #expect(inode(root + "/" + new.rawValue) == retiredInode)
        // Nothing kept: a fresh path with no file behind it.
        let fresh = try store.reusableScratchPath(suffix: ".mp4")
        #expect(inode(fresh) == nil)
        // A file over 4 MiB is deleted, not kept; past 64 kept files, the rest are deleted.
        let big = try BlobKey("big.bin")
        try store.put(big, [UInt8](repeating: 1, count: (4 << 20) + 1))
        try store.retire(big)
        #expect(inode(try store.reusableScratchPath(suffix: ".x")) == nil)
        for index in 0..<70 {
            let key = try BlobKey("many/\(index).bin")
            try store.put(key, [UInt8(index)])
            try store.retire(key)
            #expect(try !store.exists(key))
        }
        var kept = 0
        while inode(try store.reusableScratchPath(suffix: ".x")) != nil { kept += 1 }
        #expect(kept == 64)
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
