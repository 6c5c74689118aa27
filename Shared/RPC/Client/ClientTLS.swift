import CTalkMesh
import Glibc

/// A client TLS context: verifies the server against a CA file (or the system store), offers ALPN
/// `h2`, and presents a client certificate for mutual TLS when one is configured.
public final class ClientTLS: @unchecked Sendable {
    let context: OpaquePointer

    /// `caFile` nil: the system's trusted roots.
    public init(caFile: String?, certificateFile: String? = nil, keyFile: String? = nil) throws {
        guard let context = SSL_CTX_new(TLS_client_method()) else { throw TLSContext.Failure(description: TLSContext.lastError("SSL_CTX_new")) }
        self.context = context
        _ = tm_ssl_ctx_set_min_tls12(context)
        if let caFile {
            guard SSL_CTX_load_verify_locations(context, caFile, nil) == 1 else {
                throw TLSContext.Failure(description: TLSContext.lastError("cannot load the CA \(caFile)"))
            }
        } else {
            SSL_CTX_set_default_verify_paths(context)
        }
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
        if let certificateFile, let keyFile {
            guard SSL_CTX_use_certificate_chain_file(context, certificateFile) == 1,
                  SSL_CTX_use_PrivateKey_file(context, keyFile, SSL_FILETYPE_PEM) == 1 else {
                throw TLSContext.Failure(description: TLSContext.lastError("cannot load the client certificate \(certificateFile)"))
            }
        }
        let alpn: [UInt8] = [2, UInt8(ascii: "h"), UInt8(ascii: "2")]
        _ = SSL_CTX_set_alpn_protos(context, alpn, UInt32(alpn.count))
    }

    deinit { SSL_CTX_free(context) }

    /// A new SSL object that checks the server's name (SNI and certificate name).
    func newSSL(serverName: String) -> OpaquePointer? {
        guard let ssl = SSL_new(context) else { return nil }
        var name = serverName
        if name.hasPrefix("[") { name = String(name.dropFirst().prefix { $0 != "]" }) }
        if ResolvedAddress(numericHost: name, port: 1) == nil { _ = tm_ssl_set_sni(ssl, name) }
        let param = SSL_get0_param(ssl)
        if ResolvedAddress(numericHost: name, port: 1) != nil {
            X509_VERIFY_PARAM_set1_ip_asc(param, name)
        } else {
            SSL_set1_host(ssl, name)
        }
        return ssl
    }
}
