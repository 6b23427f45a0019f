import Foundation
import KMSCrypto
import Testing

/// RSAES-OAEP (Wycheproof) and AES key wrap with padding (RFC 5649), the two halves of the
/// wrapping algorithms ImportKeyMaterial accepts.
struct RSAAndKeyWrapTests {
    struct OAEPGroup: Decodable { let privateKeyPkcs8: String; let tests: [OAEPCase] }
    struct OAEPCase: Decodable { let tcId: Int; let msg, ct, label, result: String }

    @Test func wycheproofOAEPSHA256() throws {
        let file = try Wycheproof.load("rsa_oaep_2048_sha256_mgf1sha256_test.json", as: OAEPGroup.self)
        var valid = 0, invalid = 0
        for group in file.testGroups {
            let key = try RSAPrivateKey(der: group.privateKeyPkcs8.hexBytes)
            #expect(key.bits == 2048)
            for t in group.tests where t.label.isEmpty {  // kmsd uses the empty label only
                let opened = try? key.decryptOAEP(t.ct.hexBytes, digest: .sha256)
                if t.result == "invalid" {
                    #expect(opened == nil, "tcId \(t.tcId) must not decrypt")
                    invalid += 1
                } else {
                    #expect(opened?.unsafeCopyToArray() == t.msg.hexBytes, "tcId \(t.tcId)")
                    valid += 1
                }
            }
        }
        #expect(valid >= 10 && invalid >= 5)
    }

    @Test(arguments: [2048, 3072])
    func generatedKeyRoundTrip(bits: Int) throws {
        let key = try RSAPrivateKey.generate(bits: bits)
        #expect(key.bits == bits)
        let der = try key.publicKeyDER()
        let material: [UInt8] = Array(0..<32)
        for digest in [OAEPDigest.sha1, .sha256] {
            let ct = try material.withUnsafeBytes { try RSAPublicKey(der: der).encryptOAEP($0, digest: digest) }
            #expect(ct.count == bits / 8)
            #expect(try key.decryptOAEP(ct, digest: digest).unsafeCopyToArray() == material)
            // The other digest, or one flipped bit, does not decrypt.
            #expect(throws: CryptoError.authenticationFailure) { try key.decryptOAEP(ct, digest: digest == .sha1 ? .sha256 : .sha1) }
            var flipped = ct
            flipped[7] ^= 1
            #expect(throws: CryptoError.authenticationFailure) { try key.decryptOAEP(flipped, digest: digest) }
        }
        #expect(throws: CryptoError.self) { try RSAPublicKey(der: der + [0]) }
    }

    @Test func unsupportedSizesAreRefused() {
        #expect(throws: CryptoError.self) { try RSAPrivateKey.generate(bits: 1024) }
    }

    /// RFC 5649 section 6, both examples (a 192-bit KEK).
    @Test(arguments: [
        ("c37b7e6492584340bed122078089411550 68f738", "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"),
        ("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"),
    ])
    func rfc5649(key: String, wrapped: String) throws {
        let kek = "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8".hexBytes
        let plain = key.replacingOccurrences(of: " ", with: "").hexBytes
        #expect(try kek.withUnsafeBytes { k in try plain.withUnsafeBytes { try AESKeyWrap.wrap(key: k, plaintext: $0) } } == wrapped.hexBytes)
        let secureKEK = try kek.withUnsafeBytes { try SecureBytes(copying: $0) }
        #expect(try AESKeyWrap.unwrap(key: secureKEK, wrapped: wrapped.hexBytes).unsafeCopyToArray() == plain)
        var bad = wrapped.hexBytes
        bad[bad.count - 1] ^= 0x80
        #expect(throws: CryptoError.authenticationFailure) { try AESKeyWrap.unwrap(key: secureKEK, wrapped: bad) }
        #expect(throws: CryptoError.authenticationFailure) { try AESKeyWrap.unwrap(key: secureKEK, wrapped: Array(wrapped.hexBytes.dropLast(8))) }
    }

    /// With the secure heap set up, a generated key's private parts live there (locked memory).
    @Test func privatePartsInSecureHeap() throws {
        guard SecureHeap.initialize(bytes: 1 << 20) else {
            Issue.record("OpenSSL's secure heap could not be set up (RLIMIT_MEMLOCK?)")
            return
        }
        let before = SecureHeap.bytesInUse
        let key = try RSAPrivateKey.generate(bits: 2048)
        #expect(SecureHeap.bytesInUse > before)
        _ = key.bits
    }
}
