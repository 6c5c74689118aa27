import CTalkMesh
import TalkMeshBase

/// SHA-256 and HMAC-SHA256 through libcrypto: the SigV4 signer, webhook signatures, ETags and
/// API-key hashes all use these.
public enum Digest {
    public static let sha256Length = Int(SHA256_DIGEST_LENGTH)

    /// SHA-256 of bytes.
    public static func sha256(_ bytes: some Collection<UInt8>) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: sha256Length)
        let done: Void? = bytes.withContiguousStorageIfAvailable { _ = SHA256($0.baseAddress, $0.count, &digest) }
        if done == nil { _ = Array(bytes).withUnsafeBufferPointer { SHA256($0.baseAddress, $0.count, &digest) } }
        return digest
    }

    /// Lower-case hex SHA-256 of a string's UTF-8.
    public static func sha256Hex(_ text: String) -> String { Hex.encode(sha256(text.utf8)) }

    /// HMAC-SHA256 of `data` under `key`.
    public static func hmacSHA256(key: [UInt8], _ data: some Collection<UInt8>) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: sha256Length)
        var length: UInt32 = 0
        let bytes = Array(data)
        key.withUnsafeBufferPointer { k in
            bytes.withUnsafeBufferPointer { d in
                _ = HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), d.baseAddress, d.count, &out, &length)
            }
        }
        return out
    }

    /// Compares two byte strings in time that depends only on their length.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { y in CRYPTO_memcmp(x.baseAddress, y.baseAddress, x.count) == 0 } }
    }

    /// An incremental SHA-256 for data read in slices (a file part before upload), on OpenSSL 3's
    /// EVP interface (the SHA256_Init family is deprecated); the context is freed with the value.
    public struct Incremental: ~Copyable {
        private let context: OpaquePointer
        public init() {
            guard let context = EVP_MD_CTX_new() else { fatalError("EVP_MD_CTX_new: out of memory") }
            EVP_DigestInit_ex(context, EVP_sha256(), nil)
            self.context = context
        }
        deinit { EVP_MD_CTX_free(context) }
        public mutating func update(_ bytes: UnsafeRawBufferPointer) { _ = EVP_DigestUpdate(context, bytes.baseAddress, bytes.count) }
        public consuming func finish() -> [UInt8] {
            var digest = [UInt8](repeating: 0, count: Digest.sha256Length)
            var length: UInt32 = 0
            EVP_DigestFinal_ex(context, &digest, &length)
            return digest
        }
    }
}
