import Glibc
import TalkMeshCore

/// Writes a file piece by piece (decoded bytes as they come), from its start; a file already there
/// is written over in place and cut to what was written by `finish` (not emptied first: blocks
/// already allocated are reused, and ext4 flushes a file emptied and written again when it is
/// closed). Its one owner closes the descriptor when it goes, thrown out of or not. A failed
/// write is kept and thrown again by every later `write`.
final class FileHandleWriter {
    private let fd: Int32
    let path: String
    private var failure: ServiceError?
    private var length = 0

    init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
    }

    /// Cuts the file to what was written; throws the first failed write, if one failed.
    func finish() throws(ServiceError) {
        if let failure { throw failure }
        guard ftruncate(fd, off_t(length)) == 0 else { throw FileBlobStore.failure("truncate", path) }
    }

    deinit { Glibc.close(fd) }

    func write(_ bytes: [UInt8]) throws(ServiceError) {
        if let failure { throw failure }
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failure = FileBlobStore.failure("write", path)
                    return
                }
                offset += written
            }
            length += offset
        }
        if let failure { throw failure }
    }
}
