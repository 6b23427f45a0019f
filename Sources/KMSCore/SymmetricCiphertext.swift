import Foundation
import KMSCrypto
import KMSProtocol

/// The self-describing symmetric ciphertext, format version 1 (Protocol/PROTOCOL.md).
///
/// `version(1) ‖ algorithm(1) ‖ key id(16) ‖ key version(u32be) ‖ salt(32) ‖ nonce(12) ‖
/// ciphertext ‖ tag(16)`. The per-message key is HKDF-SHA256(version key, salt,
/// "kmsd/v1/symmetric-message-key" ‖ header); AAD = header ‖ canonical context.
public struct SymmetricCiphertext: Sendable, Equatable {
    public static let formatVersion: UInt8 = 1
    public static let algorithmAES256GCMHKDF: UInt8 = 1
    public static let headerBytes = 66
    public static let overheadBytes = headerBytes + AESGCM.tagBytes
    public static let saltBytes = 32
    public static let messageKeyLabel = Array("kmsd/v1/symmetric-message-key".utf8)

    public let keyID: KeyID
    public let keyVersion: UInt32
    /// The whole blob: header, ciphertext, tag.
    public let serialized: [UInt8]

    /// The salt and the header, for the tests that check the message key against the vectors'.
    var salt: [UInt8] { Array(serialized[22..<54]) }
    var header: [UInt8] { Array(serialized[..<Self.headerBytes]) }

    /// Parses a blob's header without decrypting.
    ///
    /// Throws InvalidCiphertextException for anything that is not a version-1 blob.
    public init(parsing blob: [UInt8]) throws(KMSError) {
        guard blob.count >= Self.overheadBytes, blob.count <= KMSLimits.maxCiphertextBlobBytes,
              blob[0] == Self.formatVersion, blob[1] == Self.algorithmAES256GCMHKDF else {
            throw Self.invalid
        }
        keyID = KeyID(bytes: blob[2..<18])
        keyVersion = blob.readBigEndianUInt32(at: 18)
        guard keyVersion >= 1 else { throw Self.invalid }
        serialized = blob
    }

    /// The key and version a blob names, when it parses as `init(parsing:)` would accept it;
    /// read in place (Decrypt's routing, access decision and audit record each need them).
    public static func keyReference(of blob: some ContiguousBytes) -> (keyID: KeyID, keyVersion: UInt32)? {
        blob.withUnsafeBytes { b -> (KeyID, UInt32)? in
            guard b.count >= overheadBytes, b.count <= KMSLimits.maxCiphertextBlobBytes,
                  b[0] == formatVersion, b[1] == algorithmAES256GCMHKDF else { return nil }
            let version = UInt32(b[18]) << 24 | UInt32(b[19]) << 16 | UInt32(b[20]) << 8 | UInt32(b[21])
            guard version >= 1 else { return nil }
            return (KeyID(bytes: UnsafeRawBufferPointer(rebasing: b[2..<18])), version)
        }
    }

    /// Encrypts `plaintext` under a key version's material, with fresh random salt and nonce
    /// unless given (fixed values are for test vectors only).
    ///
    /// The blob is written in place: the header, then HKDF and AES-GCM in one C call
    /// (`kms_v1_seal`), the message key only in locked memory.
    public static func seal(versionKey: SecureBytes, keyID: KeyID, keyVersion: UInt32,
                            plaintext: UnsafeRawBufferPointer, context: EncryptionContext,
                            salt: [UInt8]? = nil, nonce: [UInt8]? = nil) throws -> SymmetricCiphertext {
        precondition(salt.map { $0.count == saltBytes } ?? true && nonce.map { $0.count == AESGCM.nonceBytes } ?? true)
        let total = overheadBytes + plaintext.count
        let blob = try [UInt8](unsafeUninitializedCapacity: total) { out, count in
            out[0] = formatVersion
            out[1] = algorithmAES256GCMHKDF
            keyID.write(into: UnsafeMutableRawBufferPointer(UnsafeMutableBufferPointer(rebasing: out[2..<18])))
            for i in 0..<4 { out[18 + i] = UInt8(truncatingIfNeeded: keyVersion >> (24 - 8 * UInt32(i))) }
            // Salt and nonce, public in the blob, from the thread's pool of generator output
            // (given ones are for test vectors).
            if salt == nil || nonce == nil { try SecureRandom.fillPublic(UnsafeMutableRawBufferPointer(UnsafeMutableBufferPointer(rebasing: out[22..<66]))) }
            if let salt { UnsafeMutableBufferPointer(rebasing: out[22..<54]).update(fromContentsOf: salt) }
            if let nonce { UnsafeMutableBufferPointer(rebasing: out[54..<66]).update(fromContentsOf: nonce) }
            try V1MessageCrypto.seal(versionKey: versionKey, label: messageKeyLabel, aadTail: context.canonicalBytes,
                                     plaintext: plaintext, blob: UnsafeMutableBufferPointer(rebasing: out[0..<total]))
            count = total
        }
        return SymmetricCiphertext(keyID: keyID, keyVersion: keyVersion, serialized: blob)
    }

    /// Decrypts into secret memory.
    ///
    /// Throws InvalidCiphertextException for a wrong key, a wrong or missing context, or a
    /// forged blob: one answer for all, so none is an oracle.
    public func open(versionKey: SecureBytes, context: EncryptionContext) throws(KMSError) -> SecureBytes {
        do {
            return try serialized.withUnsafeBufferPointer { b in
                try V1MessageCrypto.open(versionKey: versionKey, label: Self.messageKeyLabel, aadTail: context.canonicalBytes, blob: b)
            }
        } catch CryptoError.authenticationFailure {
            throw Self.invalid
        } catch {
            throw KMSError(.internalError, "decryption failed inside kmsd (\(error)); see the daemon's log")
        }
    }

    /// The message key alone, through the general HKDF (the tests compare it with the vectors').
    static func deriveMessageKey(versionKey: SecureBytes, salt: [UInt8], header: [UInt8]) throws -> SecureBytes {
        try HKDF.deriveKey(from: versionKey, salt: salt, info: messageKeyLabel + header, count: 32)
    }

    private init(keyID: KeyID, keyVersion: UInt32, serialized: [UInt8]) {
        self.keyID = keyID
        self.keyVersion = keyVersion
        self.serialized = serialized
    }

    static let invalid = KMSError(.invalidCiphertext,
        "the ciphertext could not be decrypted: it is damaged, was not produced by kmsd, or the encryption context differs from the one used to encrypt")
}
