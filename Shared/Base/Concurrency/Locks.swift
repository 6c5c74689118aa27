import Glibc

/// A pthread mutex (cheaper than a Foundation lock, no Foundation dependency), at a stable
/// heap address as pthreads require.
public final class PThreadMutex: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always) public func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A value only reached under a pthread mutex. Used instead of `Synchronization.Mutex`, whose
/// futex-based lock on Linux ThreadSanitizer cannot see (it intercepts pthread locks): under
/// `make sanitize` every access inside a `Mutex` was reported as a race.
public final class Locked<Value>: @unchecked Sendable {
    private let mutex = PThreadMutex()
    private var value: Value

    public init(_ value: Value) {
        self.value = value
    }

    @inline(__always) public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        mutex.lock()
        defer { mutex.unlock() }
        return try body(&value)
    }
}
