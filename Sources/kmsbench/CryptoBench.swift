import Foundation
import Glibc
import KMSCore
import KMSCrypto

/// The crypto of one Encrypt, in this process on one core: the floor under kmsd's CPU per
/// request.
enum CryptoBench {
    struct Result: Codable, Sendable {
        /// HKDF-SHA256 (32-byte salt, a 66-byte info) then AES-256-GCM of 64 bytes with a
        /// 100-byte AAD, straight through OpenSSL's EVP calls (EVP_KDF "HKDF", EVP AES-GCM):
        /// the C cost issue 10 names ("about 4 µs"), and the baseline of its targets.
        let hkdfGCMMicroseconds: Double
        /// The same with kmsd's HKDF (HMACs on SHA-256's block functions, `KMSCrypto.HKDF`), a
        /// fraction of EVP_KDF's cost: the crypto floor of kmsd's own requests.
        let kmsdHKDFGCMMicroseconds: Double
        /// kmsd's whole sealing step (`SymmetricCiphertext.seal`: fresh salt and nonce, header,
        /// context, HKDF, GCM, the blob).
        let sealMicroseconds: Double
        var hkdfGCMPerSecond: Double { hkdfGCMMicroseconds > 0 ? 1e6 / hkdfGCMMicroseconds : 0 }
    }

    static func measure(seconds: Double = 2) throws -> Result {
        let versionKey = try SecureBytes.random(count: 32)
        let plaintext = [UInt8](repeating: 0x5a, count: 64)
        let salt = try SecureRandom.bytes(32), nonce = try SecureRandom.bytes(12)
        let info = [UInt8](repeating: 7, count: 66), aad = [UInt8](repeating: 9, count: 100)
        var key = [UInt8](repeating: 0, count: 32)
        var out = [UInt8](repeating: 0, count: 64)
        func hkdfGCM(openSSLKDF: Bool) throws {
            try versionKey.withUnsafeBytes { ikm in
                try salt.withUnsafeBytes { s in
                    try info.withUnsafeBytes { i in
                        try key.withUnsafeMutableBytes { k in
                            if openSSLKDF {
                                try HKDF.deriveWithOpenSSLKDF(ikm: ikm, salt: s, info: i, into: k)
                            } else {
                                try HKDF.derive(ikm: ikm, salt: s, info: i, into: k)
                            }
                        }
                    }
                }
            }
            _ = try key.withUnsafeBytes { k in
                try nonce.withUnsafeBytes { n in
                    try plaintext.withUnsafeBytes { p in
                        try aad.withUnsafeBytes { a in
                            try out.withUnsafeMutableBytes { o in try AESGCM.seal(key: k, nonce: n, plaintext: p, aad: a, into: o) }
                        }
                    }
                }
            }
        }
        let raw = try time(seconds) { try hkdfGCM(openSSLKDF: true) }
        let ours = try time(seconds) { try hkdfGCM(openSSLKDF: false) }
        let keyID = KeyID.random()
        let context = try EncryptionContext(BenchOperation.context)
        let seal = try time(seconds) {
            _ = try plaintext.withUnsafeBytes { p in
                try SymmetricCiphertext.seal(versionKey: versionKey, keyID: keyID, keyVersion: 1, plaintext: p, context: context)
            }
        }
        return Result(hkdfGCMMicroseconds: raw, kmsdHKDFGCMMicroseconds: ours, sealMicroseconds: seal)
    }

    /// Microseconds of this thread's CPU time per call of `body`: the least of five rounds of
    /// about `seconds` / 5 each, after a short warm-up. CPU time, as kmsd's figures are (time
    /// the virtual machine's host takes away is not counted against either), and the fastest
    /// round, so that a moment of interference does not make the baseline, and so the targets,
    /// easier.
    private static func time(_ seconds: Double, _ body: () throws -> Void) throws -> Double {
        for _ in 0..<1000 { try body() }
        var best = Double.infinity
        for _ in 0..<5 {
            var calls = 0
            let wallEnd = monotonicNanos() + UInt64(seconds / 5 * 1e9)
            let start = threadCPUNanos()
            while monotonicNanos() < wallEnd {
                for _ in 0..<256 { try body() }
                calls += 256
            }
            best = min(best, Double(threadCPUNanos() - start) / 1000 / Double(calls))
        }
        return best
    }

    static func threadCPUNanos() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }
}
