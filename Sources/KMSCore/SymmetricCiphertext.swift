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
    public let salt: [UInt8]
    public let nonce: [UInt8]
    /// Ciphertext followed by the 16-byte tag.
    public let sealed: [UInt8]

    public var header: [UInt8] {
        var h: [UInt8] = [Self.formatVersion, Self.algorithmAES256GCMHKDF]
        h.reserveCapacity(Self.headerBytes)
        h += keyID.bytes
        h.appendBigEndian(keyVersion)
        h += salt
        h += nonce
        return h
    }

    public var serialized: [UInt8] { header + sealed }

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
        salt = Array(blob[22..<54])
        nonce = Array(blob[54..<66])
        sealed = Array(blob[66...])
    }

    /// Encrypts `plaintext` under a key version's material, with fresh random salt and nonce
    /// unless given (fixed values are for test vectors only).
    public static func seal(versionKey: SecureBytes, keyID: KeyID, keyVersion: UInt32,
                            plaintext: UnsafeRawBufferPointer, context: EncryptionContext,
                            salt: [UInt8]? = nil, nonce: [UInt8]? = nil) throws -> SymmetricCiphertext {
        // Salt and nonce from one call to the generator (given ones are for test vectors).
        let fresh = try SecureRandom.bytes(saltBytes + AESGCM.nonceBytes)
        let salt = salt ?? Array(fresh[..<saltBytes])
        let nonce = nonce ?? Array(fresh[saltBytes...])
        precondition(salt.count == saltBytes && nonce.count == AESGCM.nonceBytes)
        let shell = SymmetricCiphertext(keyID: keyID, keyVersion: keyVersion, salt: salt, nonce: nonce, sealed: [])
        let header = shell.header
        let messageKey = try deriveMessageKey(versionKey: versionKey, salt: salt, header: header)
        let sealed = try AESGCM.seal(key: messageKey, nonce: nonce, plaintext: plaintext, aad: header + context.canonicalBytes)
        return SymmetricCiphertext(keyID: keyID, keyVersion: keyVersion, salt: salt, nonce: nonce, sealed: sealed)
    }

    /// Decrypts into secret memory.
    ///
    /// Throws InvalidCiphertextException for a wrong key, a wrong or missing context, or a
    /// forged blob: one answer for all, so none is an oracle.
    public func open(versionKey: SecureBytes, context: EncryptionContext) throws(KMSError) -> SecureBytes {
        do {
            let header = self.header
            let messageKey = try Self.deriveMessageKey(versionKey: versionKey, salt: salt, header: header)
            return try AESGCM.open(key: messageKey, nonce: nonce, sealed: sealed, aad: header + context.canonicalBytes)
        } catch CryptoError.authenticationFailure {
            throw Self.invalid
        } catch let error as CryptoError {
            throw KMSError(.internalError, "decryption failed inside kmsd (\(error)); see the daemon's log")
        } catch {
            throw KMSError(.internalError, "decryption failed inside kmsd")
        }
    }

    static func deriveMessageKey(versionKey: SecureBytes, salt: [UInt8], header: [UInt8]) throws -> SecureBytes {
        try HKDF.deriveKey(from: versionKey, salt: salt, info: messageKeyLabel + header, count: 32)
    }

    private init(keyID: KeyID, keyVersion: UInt32, salt: [UInt8], nonce: [UInt8], sealed: [UInt8]) {
        self.keyID = keyID
        self.keyVersion = keyVersion
        self.salt = salt
        self.nonce = nonce
        self.sealed = sealed
    }

    static let invalid = KMSError(.invalidCiphertext,
        "the ciphertext could not be decrypted: it is damaged, was not produced by kmsd, or the encryption context differs from the one used to encrypt")
}
