import CTalkMesh
import Glibc
import TalkMeshBase

/// A server TLS context: certificate and key from PEM files, TLS 1.2 or later, ALPN `h2` then
/// `http/1.1`; optionally requires client certificates signed by a CA (mutual TLS).
public final class TLSContext: @unchecked Sendable {
    let context: OpaquePointer

    /// A TLS setup failure with OpenSSL's own message.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Loads the certificate chain and key; `clientCAFile` turns on client certificate checks.
    public init(certificateFile: String, keyFile: String, clientCAFile: String? = nil) throws {
        guard let context = SSL_CTX_new(TLS_server_method()) else { throw Failure(description: TLSContext.lastError("SSL_CTX_new")) }
        self.context = context
        _ = tm_ssl_ctx_set_min_tls12(context)
        _ = tm_ssl_ctx_set_mode_release_buffers(context)
        guard SSL_CTX_use_certificate_chain_file(context, certificateFile) == 1 else {
            throw Failure(description: TLSContext.lastError("cannot load the certificate \(certificateFile)"))
        }
        guard SSL_CTX_use_PrivateKey_file(context, keyFile, SSL_FILETYPE_PEM) == 1 else {
            throw Failure(description: TLSContext.lastError("cannot load the private key \(keyFile)"))
        }
        guard SSL_CTX_check_private_key(context) == 1 else {
            throw Failure(description: TLSContext.lastError("the private key does not match the certificate"))
        }
        if let clientCAFile {
            guard SSL_CTX_load_verify_locations(context, clientCAFile, nil) == 1 else {
                throw Failure(description: TLSContext.lastError("cannot load the client CA \(clientCAFile)"))
            }
            SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
        }
        SSL_CTX_set_alpn_select_cb(context, { _, out, outLength, input, inputLength, _ in
            // Prefer h2, then http/1.1, among the client's offers.
            for wanted in ["h2", "http/1.1"] {
                var offset = 0
                while offset < Int(inputLength) {
                    let length = Int(input![offset])
                    let candidate = UnsafeBufferPointer(start: input! + offset + 1, count: length)
                    if candidate.elementsEqual(wanted.utf8) {
                        out!.pointee = input! + offset + 1
                        outLength!.pointee = UInt8(length)
                        return SSL_TLSEXT_ERR_OK
                    }
                    offset += 1 + length
                }
            }
            return SSL_TLSEXT_ERR_NOACK
        }, nil)
    }

    deinit { SSL_CTX_free(context) }

    func newSSL() -> OpaquePointer? { SSL_new(context) }

    static func lastError(_ what: String) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let code = ERR_get_error()
        if code == 0 { return what }
        ERR_error_string_n(code, &buffer, buffer.count)
        return "\(what): \(cString(buffer))"
    }
}
