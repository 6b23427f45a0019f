import Foundation
import KMSCrypto
import Testing

/// HKDF with every digest kmsd offers against OpenSSL's own EVP_KDF "HKDF" (in process, and
/// through the `openssl kdf … HKDF` command), a separate implementation from ours, for the shapes Wycheproof covers only for
/// SHA-256: keys and salts longer than the digest's block, an empty salt or info, outputs of
/// several blocks and of the 255-block maximum. (SHA-256 is also checked by every Wycheproof
/// vector in WycheproofTests.)
@Suite struct HKDFTests {
    struct Shape: Sendable, CustomTestStringConvertible {
        let digest: Digest, ikm: Int, salt: Int, info: Int, out: Int
        var testDescription: String { "\(digest) ikm \(ikm) salt \(salt) info \(info) → \(out)" }
    }

    static let shapes: [Shape] = [Digest.sha256, .sha384, .sha512].flatMap { d in [
        Shape(digest: d, ikm: 32, salt: 32, info: 40, out: 32),
        Shape(digest: d, ikm: 200, salt: 200, info: 1, out: d.byteCount * 3 + 5),  // both past the block size
        Shape(digest: d, ikm: 1, salt: 0, info: 0, out: 1),                        // no salt, no info
        Shape(digest: d, ikm: 64, salt: 128, info: 300, out: 255 * d.byteCount),   // the longest output
    ] }

    @Test(arguments: shapes)
    func matchesOpenSSLKDF(_ shape: Shape) throws {
        var rng = SystemRandomNumberGenerator()
        func random(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) } }
        let ikm = random(shape.ikm), salt = random(shape.salt), info = random(shape.info)
        var ours = [UInt8](repeating: 0, count: shape.out)
        try ikm.withUnsafeBytes { k in try salt.withUnsafeBytes { s in try info.withUnsafeBytes { i in
            try ours.withUnsafeMutableBytes { o in try HKDF.derive(digest: shape.digest, ikm: k, salt: s, info: i, into: o) }
        } } }

        // OpenSSL's EVP_KDF in process …
        var evp = [UInt8](repeating: 0, count: shape.out)
        try ikm.withUnsafeBytes { k in try salt.withUnsafeBytes { s in try info.withUnsafeBytes { i in
            try evp.withUnsafeMutableBytes { o in try HKDF.deriveWithOpenSSLKDF(digest: shape.digest, ikm: k, salt: s, info: i, into: o) }
        } } }
        #expect(evp == ours)
        // … and the openssl command.
        let name = switch shape.digest { case .sha256: "SHA256"; case .sha384: "SHA384"; case .sha512: "SHA512" }
        var args = ["kdf", "-keylen", "\(shape.out)", "-kdfopt", "digest:\(name)", "-kdfopt", "hexkey:\(hex(ikm))"]
        if !salt.isEmpty { args += ["-kdfopt", "hexsalt:\(hex(salt))"] }
        if !info.isEmpty { args += ["-kdfopt", "hexinfo:\(hex(info))"] }
        args.append("HKDF")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let printed = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let theirs = printed.filter(\.isHexDigit).lowercased()
        #expect(theirs.count == 2 * shape.out)
        #expect(hex(ours) == theirs)
    }

    @Test(arguments: [Digest.sha256, .sha384, .sha512])
    func refusesTooLongOutput(_ digest: Digest) {
        var out = [UInt8](repeating: 0, count: 255 * digest.byteCount + 1)
        let key: [UInt8] = [1, 2, 3]
        #expect(throws: CryptoError.self) {
            try key.withUnsafeBytes { k in try out.withUnsafeMutableBytes { o in
                try HKDF.derive(digest: digest, ikm: k, salt: UnsafeRawBufferPointer(start: nil, count: 0),
                                info: UnsafeRawBufferPointer(start: nil, count: 0), into: o)
            } }
        }
    }

    private func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
}
