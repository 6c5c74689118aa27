import Glibc

/// Names the calling thread as `top -H`, perf and /proc show it (at most 15 bytes are kept),
/// through `/proc/thread-self/comm`: glibc's pthread_setname_np is not visible to Swift.
public enum ThreadName {
    public static func set(_ name: String) {
        let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let bytes = Array(name.utf8.prefix(15))
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
