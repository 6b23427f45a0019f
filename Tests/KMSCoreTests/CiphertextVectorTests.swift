import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// Protocol/vectors/ciphertext.json (from the independent Python reference) against the
/// implementation: exact bytes for valid vectors, InvalidCiphertextException for invalid ones.
struct CiphertextVectorTests {
    struct Valid: Decodable, CustomTestStringConvertible {
        let name, key_id, key_material_hex, salt_hex, nonce_hex, plaintext_hex: String
        let header_hex, message_key_hex, aad_hex, ciphertext_blob_hex, canonical_context_hex: String
        let key_version: UInt32
        let encryption_context: [String: String]
        var testDescription: String { name }
    }

    struct Invalid: Decodable, CustomTestStringConvertible {
        let name, key_material_hex, ciphertext_blob_hex, expected_error: String
        let encryption_context: [String: String]
        var testDescription: String { name }
    }

    struct File: Decodable { let vectors: [Valid]; let invalid: [Invalid] }

    static let file: File = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Protocol/vectors/ciphertext.json")
        return try! JSONDecoder().decode(File.self, from: Data(contentsOf: url))
    }()

    static func secret(_ hex: String) throws -> SecureBytes {
        var bytes = hex.hexBytes
        return try SecureBytes(consuming: &bytes)
    }

    @Test func thereAreEnoughVectors() {
        #expect(Self.file.vectors.count >= 8)
        #expect(Self.file.invalid.count >= 6)
    }

    @Test(arguments: file.vectors)
    func sealReproducesTheBlobAndOpenReturnsThePlaintext(_ v: Valid) throws {
        let key = try Self.secret(v.key_material_hex)
        let context = try EncryptionContext(v.encryption_context)
        #expect(context.canonicalBytes == v.canonical_context_hex.hexBytes)
        let plaintext = v.plaintext_hex.hexBytes
        let sealed = try plaintext.withUnsafeBytes {
            try SymmetricCiphertext.seal(versionKey: key, keyID: KeyID(parsing: v.key_id), keyVersion: v.key_version,
                                         plaintext: $0, context: context, salt: v.salt_hex.hexBytes, nonce: v.nonce_hex.hexBytes)
        }
        #expect(sealed.header == v.header_hex.hexBytes)
        let messageKey = try SymmetricCiphertext.deriveMessageKey(versionKey: key, salt: sealed.salt, header: sealed.header)
        #expect(messageKey.unsafeCopyToArray() == v.message_key_hex.hexBytes)
        #expect(sealed.serialized == v.ciphertext_blob_hex.hexBytes)

        let parsed = try SymmetricCiphertext(parsing: v.ciphertext_blob_hex.hexBytes)
        #expect(parsed.keyID.description == v.key_id.lowercased())
        #expect(parsed.keyVersion == v.key_version)
        #expect(try parsed.open(versionKey: key, context: context).unsafeCopyToArray() == plaintext)
    }

    @Test(arguments: file.invalid)
    func invalidBlobsAreRefusedAsInvalidCiphertext(_ v: Invalid) throws {
        let key = try Self.secret(v.key_material_hex)
        let context = try EncryptionContext(v.encryption_context)
        #expect(v.expected_error == "InvalidCiphertextException")
        #expect(throws: KMSError(.invalidCiphertext, "")) {
            let parsed = try SymmetricCiphertext(parsing: v.ciphertext_blob_hex.hexBytes)
            _ = try parsed.open(versionKey: key, context: context)
        }
    }

    @Test func contextPairsAreLengthPrefixedSoSplitsDiffer() throws {
        let a = try EncryptionContext(["ab": "c"]).canonicalBytes
        let b = try EncryptionContext(["a": "bc"]).canonicalBytes
        #expect(a != b)
        #expect(try EncryptionContext([:]).canonicalBytes == [0, 0, 0, 0])
    }

    @Test(arguments: [
        ([String: String](), true),
        (["": "x"], false),
        (Dictionary(uniqueKeysWithValues: (0..<65).map { ("k\($0)", "v") }), false),
        (["k": String(repeating: "v", count: 9000)], false),
        (["k": String(repeating: "v", count: 8000)], true),
    ])
    func contextLimits(_ pairs: [String: String], _ valid: Bool) {
        #expect(((try? EncryptionContext(pairs)) != nil) == valid)
    }

    @Test func auditKeysAreBytewiseOrderedAndEscaped() {
        #expect(EncryptionContext.auditKeys(["b": "1", "a,b": "2", "Z": "3"]) == "Z,a\\,b,b")
        // Control characters are escaped unambiguously: a NUL is not a `?`, and an escaped
        // backslash cannot be mistaken for the start of an escape.
        #expect(EncryptionContext.auditKeys(["a\u{0}b": "1", "a?b": "2"]) == "a\\x00b,a?b")
        #expect(EncryptionContext.auditKeys(["\\x00": "1", "\n": "2"]) == "\\x0a,\\\\x00")
    }

    @Test func aWrongContextAndAWrongKeyGiveTheSameError() throws {
        let key = try SecureBytes.random(count: 32), other = try SecureBytes.random(count: 32)
        let sealed = try [UInt8](repeating: 1, count: 10).withUnsafeBytes {
            try SymmetricCiphertext.seal(versionKey: key, keyID: .random(), keyVersion: 1, plaintext: $0, context: EncryptionContext(["a": "b"]))
        }
        let wrong: [(SecureBytes, [String: String])] = [(key, [:]), (key, ["a": "c"]), (other, ["a": "b"])]
        for (k, ctx) in wrong {
            #expect(throws: KMSError(.invalidCiphertext, "")) { try sealed.open(versionKey: k, context: EncryptionContext(ctx)) }
        }
        #expect(try sealed.open(versionKey: key, context: EncryptionContext(["a": "b"])).count == 10)
    }
}

extension String {
    var hexBytes: [UInt8] {
        var out: [UInt8] = []
        var it = makeIterator()
        while let a = it.next(), let b = it.next() { out.append(UInt8(String([a, b]), radix: 16)!) }
        return out
    }
}
