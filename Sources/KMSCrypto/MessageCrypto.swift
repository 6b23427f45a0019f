import CKMSOpenSSL

/// The cryptography of one version-1 symmetric message (PROTOCOL.md §9) in one C call each way
/// (`kms_v1_seal`, `kms_v1_open`): message key = HKDF-SHA256(version key, salt, label ‖ header)
/// in locked memory, then AES-256-GCM under it with the header's nonce and AAD = header ‖
/// `aadTail`. The blob's layout is the format's: a 66-byte header with the salt at bytes 22..<54
/// and the nonce at 54..<66, then ciphertext, then the 16-byte tag. Every request's Encrypt and
/// Decrypt come here; nothing is allocated between the steps.
public enum V1MessageCrypto {
    public static let headerBytes = 66

    /// Encrypts `plaintext` into `blob`, whose first 66 bytes already hold the header and which
    /// has room for exactly the ciphertext and tag after it.
    public static func seal(versionKey: SecureBytes, label: [UInt8], aadTail: [UInt8],
                            plaintext: UnsafeRawBufferPointer, blob: UnsafeMutableBufferPointer<UInt8>) throws {
        precondition(blob.count == headerBytes + plaintext.count + AESGCM.tagBytes)
        let messageKey = try SecureBytes(zeroedCount: 32)
        let ok = versionKey.withUnsafeBytes { k in
            messageKey.withUnsafeMutableBytes { mk in
                aadTail.withUnsafeBufferPointer { c in
                    label.withUnsafeBufferPointer { l in
                        kms_v1_seal(k.bytes, k.count, l.baseAddress, l.count, c.baseAddress, c.count,
                                    plaintext.bytes, plaintext.count, blob.baseAddress,
                                    mk.baseAddress!.assumingMemoryBound(to: UInt8.self))
                    }
                }
            }
        }
        guard ok == 1 else { throw CryptoError.openSSL("AES-GCM seal") }
    }

    /// Decrypts `blob` into secret memory; throws `authenticationFailure` for a blob too short
    /// or a tag that does not verify.
    public static func open(versionKey: SecureBytes, label: [UInt8], aadTail: [UInt8],
                            blob: UnsafeBufferPointer<UInt8>) throws -> SecureBytes {
        guard blob.count >= headerBytes + AESGCM.tagBytes else { throw CryptoError.authenticationFailure }
        let out = try SecureBytes(zeroedCount: blob.count - headerBytes - AESGCM.tagBytes)
        let messageKey = try SecureBytes(zeroedCount: 32)
        let ok = versionKey.withUnsafeBytes { k in
            messageKey.withUnsafeMutableBytes { mk in
                out.withUnsafeMutableBytes { o in
                    aadTail.withUnsafeBufferPointer { c in
                        label.withUnsafeBufferPointer { l in
                            kms_v1_open(k.bytes, k.count, l.baseAddress, l.count, c.baseAddress, c.count,
                                        blob.baseAddress, blob.count, o.baseAddress?.assumingMemoryBound(to: UInt8.self),
                                        mk.baseAddress!.assumingMemoryBound(to: UInt8.self))
                        }
                    }
                }
            }
        }
        guard ok == 1 else { throw CryptoError.authenticationFailure }
        return out
    }
}
