import Foundation
import KMSCrypto
import Testing

/// Ed25519 against Wycheproof, X25519 against RFC 7748's worked example; both for the
/// replication identities.
struct Curve25519Tests {
    struct EdGroup: Decodable { struct Key: Decodable { let pk: String }; let publicKey: Key; let tests: [EdCase] }
    struct EdCase: Decodable { let tcId: Int; let msg, sig, result: String }

    @Test func wycheproofEd25519Verify() throws {
        let file = try Wycheproof.load("ed25519_test.json", as: EdGroup.self)
        var valid = 0, invalid = 0
        for group in file.testGroups {
            for t in group.tests {
                let ok = Ed25519.verify(t.sig.hexBytes, of: t.msg.hexBytes, publicKey: group.publicKey.pk.hexBytes)
                if t.result == "valid" { #expect(ok, "tcId \(t.tcId)"); valid += 1 } else { #expect(!ok, "tcId \(t.tcId) must not verify"); invalid += 1 }
            }
        }
        #expect(valid >= 50 && invalid >= 50)
    }

    @Test func ed25519SignsWhatItsPublicKeyVerifies() throws {
        let (priv, pub) = try Ed25519.generate()
        #expect(try Ed25519.publicKey(of: priv) == pub)
        let message = Array("replicate key".utf8)
        let sig = try Ed25519.sign(message, privateKey: priv)
        #expect(Ed25519.verify(sig, of: message, publicKey: pub))
        #expect(!Ed25519.verify(sig, of: message + [0], publicKey: pub))
        var bad = sig
        bad[10] ^= 1
        #expect(!Ed25519.verify(bad, of: message, publicKey: pub))
    }

    /// RFC 7748 §6.1: Alice's and Bob's keys and their shared secret.
    @Test func x25519MatchesRFC7748() throws {
        var alice = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a".hexBytes
        var bob = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb".hexBytes
        let a = try SecureBytes(consuming: &alice), b = try SecureBytes(consuming: &bob)
        #expect(try X25519.publicKey(of: a) == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a".hexBytes)
        #expect(try X25519.publicKey(of: b) == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f".hexBytes)
        let shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742".hexBytes
        #expect(try X25519.sharedSecret(a, peer: X25519.publicKey(of: b)).unsafeCopyToArray() == shared)
        #expect(try X25519.sharedSecret(b, peer: X25519.publicKey(of: a)).unsafeCopyToArray() == shared)
        // A low-order peer key (all zeros) gives no secret.
        #expect(throws: (any Error).self) { _ = try X25519.sharedSecret(a, peer: [UInt8](repeating: 0, count: 32)) }
    }
}
