import Foundation
import KMSCrypto
import Testing

/// Every AES-GCM, HKDF and HMAC Wycheproof vector, through the crypto module's public API.
struct WycheproofTests {
    struct AEADGroup: Decodable { let ivSize: Int; let keySize: Int; let tagSize: Int; let tests: [AEADCase] }
    struct AEADCase: Decodable { let tcId: Int; let key, iv, aad, msg, ct, tag, result: String }

    @Test func aesGCM() throws {
        let file = try Wycheproof.load("aes_gcm_test.json", as: AEADGroup.self)
        var checked = 0, valid = 0, longIVs = 0
        for group in file.testGroups {
            for t in group.tests {
                checked += 1
                let key = t.key.hexBytes, iv = t.iv.hexBytes, aad = t.aad.hexBytes
                let msg = t.msg.hexBytes, ct = t.ct.hexBytes, tag = t.tag.hexBytes
                // Open: must succeed and give msg exactly for valid vectors, fail for invalid ones.
                var out = [UInt8](repeating: 0, count: ct.count)
                let opened: Bool = key.withUnsafeBytes { k in iv.withUnsafeBytes { n in ct.withUnsafeBytes { c in
                    tag.withUnsafeBytes { tg in aad.withUnsafeBytes { a in out.withUnsafeMutableBytes { o in
                        (try? AESGCM.open(key: k, nonce: n, ciphertext: c, tag: tg, aad: a, into: o)) != nil
                    } } } } } }
                if iv.count > AESGCM.maxNonceBytes {
                    // Longer than OpenSSL's GCM supports: refused, never mis-computed.
                    #expect(!opened && out.allSatisfy { $0 == 0 }, "tcId \(t.tcId) long IV must be refused")
                    longIVs += 1
                } else if t.result == "valid" {
                    valid += 1
                    #expect(opened, "tcId \(t.tcId) should open")
                    #expect(out == msg, "tcId \(t.tcId) plaintext")
                    // Seal: must reproduce ct and tag.
                    var sealed = [UInt8](repeating: 0, count: msg.count)
                    let sealedTag: [UInt8]? = key.withUnsafeBytes { k in iv.withUnsafeBytes { n in msg.withUnsafeBytes { m in
                        aad.withUnsafeBytes { a in sealed.withUnsafeMutableBytes { o in
                            try? AESGCM.seal(key: k, nonce: n, plaintext: m, aad: a, into: o, tagBytes: group.tagSize / 8)
                        } } } } }
                    #expect(sealed == ct && sealedTag == tag, "tcId \(t.tcId) seal")
                } else {
                    #expect(!opened, "tcId \(t.tcId) must not open")
                    #expect(out.allSatisfy { $0 == 0 }, "tcId \(t.tcId) must not leak plaintext")
                }
            }
        }
        #expect(checked == file.numberOfTests)
        #expect(valid > 100)
        #expect(longIVs < 10)
    }

    struct HKDFGroup: Decodable { let tests: [HKDFCase] }
    struct HKDFCase: Decodable { let tcId: Int; let ikm, salt, info: String; let size: Int; let okm, result: String }

    @Test func hkdfSHA256() throws {
        let file = try Wycheproof.load("hkdf_sha256_test.json", as: HKDFGroup.self)
        var checked = 0
        for t in file.testGroups.flatMap(\.tests) {
            checked += 1
            let ikm = t.ikm.hexBytes, salt = t.salt.hexBytes, info = t.info.hexBytes
            var out = [UInt8](repeating: 0, count: t.size)
            let ok: Bool = ikm.withUnsafeBytes { k in salt.withUnsafeBytes { s in info.withUnsafeBytes { i in
                out.withUnsafeMutableBytes { o in (try? HKDF.derive(ikm: k, salt: s, info: i, into: o)) != nil }
            } } }
            if t.result == "valid" {
                #expect(ok && out == t.okm.hexBytes, "tcId \(t.tcId)")
            } else {
                #expect(!ok, "tcId \(t.tcId) must be refused")
            }
        }
        #expect(checked == file.numberOfTests)
    }

    struct MACGroup: Decodable { let keySize: Int; let tagSize: Int; let tests: [MACCase] }
    struct MACCase: Decodable { let tcId: Int; let key, msg, tag, result: String }

    @Test(arguments: [("hmac_sha256_test.json", Digest.sha256), ("hmac_sha384_test.json", .sha384), ("hmac_sha512_test.json", .sha512)])
    func hmac(_ name: String, _ digest: Digest) throws {
        let file = try Wycheproof.load(name, as: MACGroup.self)
        var checked = 0
        for group in file.testGroups {
            for t in group.tests {
                checked += 1
                let key = t.key.hexBytes, msg = t.msg.hexBytes
                let mac = try key.withUnsafeBytes { k in try msg.withUnsafeBytes { m in try HMAC.authenticate(digest: digest, key: k, data: m) } }
                let truncated = Array(mac.prefix(group.tagSize / 8))
                #expect((truncated == t.tag.hexBytes) == (t.result == "valid"), "\(name) tcId \(t.tcId)")
            }
        }
        #expect(checked == file.numberOfTests)
    }
}
