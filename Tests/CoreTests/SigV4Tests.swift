import Testing
import TalkMeshBase
import TalkMeshCore

/// SigV4 against the examples of AWS's S3 documentation (the values botocore's signer gives for
/// the same requests), so our signatures are right before any server sees them.
@Suite("SigV4 signing")
struct SigV4Tests {
    let example = SigV4(credentials: AWSCredentials(accessKeyID: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
                        region: "us-east-1")
    let may24 = 1_369_353_600  // 2013-05-24T00:00:00Z

    @Test func aGetWithARangeIsSignedInItsHeaders() {
        let headers = example.sign(method: "GET", path: "/test.txt", query: [],
                                   headers: [("host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9")],
                                   payloadHash: SigV4.emptyPayloadHash, unixTime: may24)
        let authorization = headers.first { $0.0 == "authorization" }?.1
        #expect(authorization == "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                + "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
        #expect(headers.contains { $0 == ("x-amz-date", "20130524T000000Z") })
        #expect(headers.contains { $0 == ("x-amz-content-sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") })
    }

    @Test func aPresignedURLMatchesTheDocumentedOne() {
        let query = example.presignedQuery(method: "GET", path: "/test.txt", host: "examplebucket.s3.amazonaws.com", expires: 86_400, unixTime: may24)
        #expect(query == "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
                + "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
                + "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    }

    @Test func aSessionTokenAnEncodedPathAndQueryValuesAreSigned() {
        // botocore: PUT http://127.0.0.1:9000/bucket/a%20b/c.mp4?partNumber=2&uploadId=x~y%2Fz, eu-west-1, a session token.
        let signer = SigV4(credentials: AWSCredentials(accessKeyID: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                                                       sessionToken: "TOKEN/with+chars"), region: "eu-west-1")
        let headers = signer.sign(method: "PUT", path: "/bucket/" + SigV4.encode("a b/c.mp4", keepSlash: true),
                                  query: [("uploadId", "x~y/z"), ("partNumber", "2")],
                                  headers: [("host", "127.0.0.1:9000"), ("content-length", "5")], payloadHash: SigV4.emptyPayloadHash, unixTime: may24)
        #expect(headers.first { $0.0 == "authorization" }?.1.hasSuffix("Signature=20e4480da17292913760489f0232e3805ff54c376fc9fff596a528db1d575e71") == true)
        #expect(headers.contains { $0 == ("x-amz-security-token", "TOKEN/with+chars") })
    }

    @Test func encodingKeepsOnlyUnreservedCharacters() {
        #expect(SigV4.encode("a b+c/d~e_f.g-h") == "a%20b%2Bc%2Fd~e_f.g-h")
        #expect(SigV4.encode("a b/c", keepSlash: true) == "a%20b/c")
        #expect(SigV4.canonicalQuery([("uploads", ""), ("b", "2"), ("a", "1")]) == "a=1&b=2&uploads=")
    }

    @Test func theIncrementalDigestEqualsTheOneShotOverAnySlicing() {
        // FIPS 180-2's "abc" vector, then a megabyte in uneven slices against the one-shot digest.
        var abc = Digest.Incremental()
        Array("abc".utf8).withUnsafeBytes { abc.update($0) }
        #expect(Hex.encode(abc.finish()) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let data = (0..<1_000_003).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        var sliced = Digest.Incremental()
        var offset = 0
        for size in [1, 64, 65_537, 300_000, 1_000_003].cycled(until: data.count) {
            let end = min(data.count, offset + size)
            data[offset..<end].withUnsafeBytes { sliced.update($0) }
            offset = end
        }
        #expect(sliced.finish() == Digest.sha256(data))
    }
}

extension Array where Element == Int {
    /// The sizes again and again until they add up to at least `total`.
    func cycled(until total: Int) -> [Int] {
        var out: [Int] = []
        var sum = 0
        while sum < total {
            for size in self where sum < total {
                out.append(size)
                sum += size
            }
        }
        return out
    }
}
