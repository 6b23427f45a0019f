import CKMSOpenSSL

/// X25519 key agreement (RFC 7748) with raw 32-byte keys; the private key in locked memory.
public enum X25519 {
    public static let keyBytes = 32

    /// A new key pair: the private key (locked) and the public key.
    public static func generate() throws -> (privateKey: SecureBytes, publicKey: [UInt8]) {
        try generatePair(ed: false)
    }

    /// The public key of `privateKey`.
    public static func publicKey(of privateKey: SecureBytes) throws -> [UInt8] {
        try derivePublic(privateKey, ed: false)
    }

    /// The shared secret of `privateKey` and `peer` (locked); fails for a peer key of low order.
    public static func sharedSecret(_ privateKey: SecureBytes, peer: [UInt8]) throws -> SecureBytes {
        guard privateKey.count == keyBytes, peer.count == keyBytes else { throw CryptoError.invalidParameter("X25519 keys are 32 bytes") }
        let out = try SecureBytes(zeroedCount: keyBytes)
        let ok = privateKey.withUnsafeBytes { k in
            peer.withUnsafeBufferPointer { p in
                out.withUnsafeMutableBytes { o in kms_x25519(k.bytes, p.baseAddress, o.baseAddress!.assumingMemoryBound(to: UInt8.self)) }
            }
        }
        guard ok == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("X25519 (a peer key of low order?)")
        }
        return out
    }
}

/// Ed25519 signatures (RFC 8032) with raw 32-byte keys; the private key in locked memory.
public enum Ed25519 {
    public static let keyBytes = 32
    public static let signatureBytes = 64

    public static func generate() throws -> (privateKey: SecureBytes, publicKey: [UInt8]) {
        try generatePair(ed: true)
    }

    public static func publicKey(of privateKey: SecureBytes) throws -> [UInt8] {
        try derivePublic(privateKey, ed: true)
    }

    public static func sign(_ message: [UInt8], privateKey: SecureBytes) throws -> [UInt8] {
        guard privateKey.count == keyBytes else { throw CryptoError.invalidParameter("Ed25519 private keys are 32 bytes") }
        var signature = [UInt8](repeating: 0, count: signatureBytes)
        let ok = privateKey.withUnsafeBytes { k in
            message.withUnsafeBufferPointer { m in kms_ed25519_sign(k.bytes, m.baseAddress, m.count, &signature) }
        }
        guard ok == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("Ed25519 sign")
        }
        return signature
    }

    /// True when `signature` is `publicKey`'s valid signature of `message`.
    public static func verify(_ signature: [UInt8], of message: [UInt8], publicKey: [UInt8]) -> Bool {
        guard publicKey.count == keyBytes, signature.count == signatureBytes else { return false }
        return message.withUnsafeBufferPointer { m in
            kms_ed25519_verify(publicKey, m.baseAddress, m.count, signature, signature.count)
        } == 1
    }
}

private func generatePair(ed: Bool) throws -> (privateKey: SecureBytes, publicKey: [UInt8]) {
    let priv = try SecureBytes(zeroedCount: 32)
    var pub = [UInt8](repeating: 0, count: 32)
    let ok = priv.withUnsafeMutableBytes { p in kms_ecx_generate(ed ? 1 : 0, p.baseAddress!.assumingMemoryBound(to: UInt8.self), &pub) }
    guard ok == 1 else {
        ERR_clear_error()
        throw CryptoError.openSSL(ed ? "Ed25519 keygen" : "X25519 keygen")
    }
    return (priv, pub)
}

private func derivePublic(_ priv: SecureBytes, ed: Bool) throws -> [UInt8] {
    guard priv.count == 32 else { throw CryptoError.invalidParameter("private keys are 32 bytes") }
    var pub = [UInt8](repeating: 0, count: 32)
    let ok = priv.withUnsafeBytes { p in kms_ecx_public(ed ? 1 : 0, p.bytes, &pub) }
    guard ok == 1 else {
        ERR_clear_error()
        throw CryptoError.openSSL(ed ? "Ed25519 public key" : "X25519 public key")
    }
    return pub
}
