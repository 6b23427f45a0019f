import CKMSLinux
import CKMSOpenSSL

/// AES-GCM (128/192/256-bit keys) through OpenSSL's EVP interface.
public enum AESGCM {
    public static let tagBytes = 16
    public static let nonceBytes = 12
    /// OpenSSL's GCM accepts nonces up to 128 bytes; kmsd itself uses 12.
    public static let maxNonceBytes = 128

    /// Encrypts `plaintext`, writing the ciphertext into `out` (same length as the plaintext).
    ///
    /// Returns the tag. Throws `invalidParameter` for a bad key or nonce length.
    public static func seal(key: UnsafeRawBufferPointer, nonce: UnsafeRawBufferPointer,
                            plaintext: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer,
                            into out: UnsafeMutableRawBufferPointer, tagBytes: Int = tagBytes) throws -> [UInt8] {
        precondition(out.count >= plaintext.count)
        let ctx = try Context(key: key, nonce: nonce, encrypt: true)
        defer { EVP_CIPHER_CTX_free(ctx.raw) }
        var outLen: Int32 = 0
        if aad.count > 0 {
            guard EVP_EncryptUpdate(ctx.raw, nil, &outLen, aad.bytes, Int32(aad.count)) == 1 else { throw CryptoError.openSSL("EVP_EncryptUpdate(aad)") }
        }
        if plaintext.count > 0 {
            guard EVP_EncryptUpdate(ctx.raw, out.baseAddress!.assumingMemoryBound(to: UInt8.self), &outLen,
                                    plaintext.bytes, Int32(plaintext.count)) == 1 else { throw CryptoError.openSSL("EVP_EncryptUpdate") }
        }
        var scratch = [UInt8](repeating: 0, count: 16)
        guard EVP_EncryptFinal_ex(ctx.raw, &scratch, &outLen) == 1 else { throw CryptoError.openSSL("EVP_EncryptFinal_ex") }
        var tag = [UInt8](repeating: 0, count: tagBytes)
        guard kms_gcm_get_tag(ctx.raw, Int32(tagBytes), &tag) == 1 else { throw CryptoError.openSSL("EVP_CTRL_GCM_GET_TAG") }
        return tag
    }

    /// Decrypts and verifies, writing the plaintext into `out`.
    ///
    /// Throws `authenticationFailure` (and leaves `out` zeroed) when the tag does not verify.
    public static func open(key: UnsafeRawBufferPointer, nonce: UnsafeRawBufferPointer,
                            ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer,
                            aad: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws {
        precondition(out.count >= ciphertext.count)
        guard tag.count >= 12, tag.count <= 16 else { throw CryptoError.authenticationFailure }
        let ctx = try Context(key: key, nonce: nonce, encrypt: false)
        defer { EVP_CIPHER_CTX_free(ctx.raw) }
        var outLen: Int32 = 0
        if aad.count > 0 {
            guard EVP_DecryptUpdate(ctx.raw, nil, &outLen, aad.bytes, Int32(aad.count)) == 1 else { throw CryptoError.openSSL("EVP_DecryptUpdate(aad)") }
        }
        if ciphertext.count > 0 {
            guard EVP_DecryptUpdate(ctx.raw, out.baseAddress!.assumingMemoryBound(to: UInt8.self), &outLen,
                                    ciphertext.bytes, Int32(ciphertext.count)) == 1 else { throw CryptoError.openSSL("EVP_DecryptUpdate") }
        }
        var tagCopy = Array(tag)
        guard kms_gcm_set_tag(ctx.raw, Int32(tag.count), &tagCopy) == 1 else { throw CryptoError.openSSL("EVP_CTRL_GCM_SET_TAG") }
        var scratch = [UInt8](repeating: 0, count: 16)
        // A failed tag check fails here without an OpenSSL error code (see PITFALLS.md).
        guard EVP_DecryptFinal_ex(ctx.raw, &scratch, &outLen) == 1 else {
            if let base = out.baseAddress { kms_explicit_bzero(base, ciphertext.count) }
            ERR_clear_error()
            throw CryptoError.authenticationFailure
        }
    }

    /// Encrypts into a fresh array holding ciphertext ‖ tag.
    public static func seal(key: UnsafeRawBufferPointer, nonce: UnsafeRawBufferPointer,
                            plaintext: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: plaintext.count + tagBytes)
        try out.withUnsafeMutableBytes { o in
            let tag = try seal(key: key, nonce: nonce, plaintext: plaintext, aad: aad,
                               into: UnsafeMutableRawBufferPointer(rebasing: o[0..<plaintext.count]))
            UnsafeMutableRawBufferPointer(rebasing: o[plaintext.count...]).copyBytes(from: tag)
        }
        return out
    }

    /// Encrypts `plaintext` under a secret key; returns ciphertext ‖ tag.
    public static func seal(key: SecureBytes, nonce: [UInt8], plaintext: UnsafeRawBufferPointer, aad: [UInt8]) throws -> [UInt8] {
        try key.withUnsafeBytes { k in
            try nonce.withUnsafeBytes { n in
                try aad.withUnsafeBytes { a in try seal(key: k, nonce: n, plaintext: plaintext, aad: a) }
            }
        }
    }

    /// Convenience: opens ciphertext ‖ tag into secret memory.
    public static func open(key: SecureBytes, nonce: [UInt8], sealed: [UInt8], aad: [UInt8]) throws -> SecureBytes {
        guard sealed.count >= tagBytes else { throw CryptoError.authenticationFailure }
        let n = sealed.count - tagBytes
        let out = try SecureBytes(zeroedCount: n)
        try key.withUnsafeBytes { k in
            try nonce.withUnsafeBytes { nb in
                try sealed.withUnsafeBytes { s in
                    try aad.withUnsafeBytes { a in
                        try out.withUnsafeMutableBytes { o in
                            try open(key: k, nonce: nb, ciphertext: UnsafeRawBufferPointer(rebasing: s[0..<n]),
                                     tag: UnsafeRawBufferPointer(rebasing: s[n...]), aad: a, into: o)
                        }
                    }
                }
            }
        }
        return out
    }

    private struct Context {
        let raw: OpaquePointer

        init(key: UnsafeRawBufferPointer, nonce: UnsafeRawBufferPointer, encrypt: Bool) throws {
            guard let cipher = kms_aes_gcm(key.count) else { throw CryptoError.invalidParameter("AES-GCM key must be 16, 24 or 32 bytes") }
            guard (1...maxNonceBytes).contains(nonce.count) else {
                throw CryptoError.invalidParameter("AES-GCM nonce must be 1...\(maxNonceBytes) bytes")
            }
            guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openSSL("EVP_CIPHER_CTX_new") }
            let initFn = encrypt ? EVP_EncryptInit_ex : EVP_DecryptInit_ex
            guard initFn(ctx, cipher, nil, nil, nil) == 1,
                  kms_gcm_set_ivlen(ctx, Int32(nonce.count)) == 1,
                  initFn(ctx, nil, nil, key.bytes, nonce.bytes) == 1 else {
                EVP_CIPHER_CTX_free(ctx)
                ERR_clear_error()
                throw CryptoError.invalidParameter("AES-GCM rejected the key or nonce length")
            }
            raw = ctx
        }
    }
}

extension UnsafeRawBufferPointer {
    var bytes: UnsafePointer<UInt8>? { baseAddress?.assumingMemoryBound(to: UInt8.self) }
}
