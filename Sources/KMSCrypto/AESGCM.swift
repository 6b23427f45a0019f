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
            // 12 bytes is GCM's default nonce length: cipher, key and nonce in one call (each
            // control call is a parameter lookup by name in OpenSSL 3).
            let ready = nonce.count == nonceBytes
                ? initFn(ctx, cipher, nil, key.bytes, nonce.bytes) == 1
                : initFn(ctx, cipher, nil, nil, nil) == 1 && kms_gcm_set_ivlen(ctx, Int32(nonce.count)) == 1
                    && initFn(ctx, nil, nil, key.bytes, nonce.bytes) == 1
            guard ready else {
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

/// One AES-GCM key kept expanded in an OpenSSL context, for many messages in a row under the
/// same key (the chunks of a file envelope): the key schedule is computed once, each message
/// only sets its nonce. Encrypts and decrypts in place. OpenSSL cleanses the context when it
/// is freed; hold one only for the span of the work.
public final class AESGCMKey {
    private let ctx: OpaquePointer
    private let encrypting: Bool
    public static let nonceBytes = 12

    /// `key` is 16, 24 or 32 bytes; `encrypting` chooses seal or open for the key's life.
    public init(key: SecureBytes, encrypting: Bool) throws {
        guard let cipher = kms_aes_gcm(key.count) else { throw CryptoError.invalidParameter("AES-GCM key must be 16, 24 or 32 bytes") }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openSSL("EVP_CIPHER_CTX_new") }
        let initFn = encrypting ? EVP_EncryptInit_ex : EVP_DecryptInit_ex
        let ok = key.withUnsafeBytes { k in
            initFn(ctx, cipher, nil, nil, nil) == 1
                && kms_gcm_set_ivlen(ctx, Int32(Self.nonceBytes)) == 1
                && initFn(ctx, nil, nil, k.bytes, nil) == 1
        }
        guard ok else {
            EVP_CIPHER_CTX_free(ctx)
            ERR_clear_error()
            throw CryptoError.invalidParameter("AES-GCM rejected the key")
        }
        self.ctx = ctx
        self.encrypting = encrypting
    }

    deinit { EVP_CIPHER_CTX_free(ctx) }

    /// Encrypts `data` in place and writes the 16-byte tag into `tag`.
    public func seal(nonce: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer,
                     inPlace data: UnsafeMutableRawBufferPointer, tag: UnsafeMutableRawBufferPointer) throws {
        precondition(encrypting && nonce.count == Self.nonceBytes && tag.count == AESGCM.tagBytes)
        var outLen: Int32 = 0
        guard EVP_EncryptInit_ex(ctx, nil, nil, nil, nonce.bytes) == 1 else { throw CryptoError.openSSL("EVP_EncryptInit_ex(iv)") }
        if aad.count > 0 {
            guard EVP_EncryptUpdate(ctx, nil, &outLen, aad.bytes, Int32(aad.count)) == 1 else { throw CryptoError.openSSL("EVP_EncryptUpdate(aad)") }
        }
        if data.count > 0 {
            let p = data.baseAddress!.assumingMemoryBound(to: UInt8.self)
            guard EVP_EncryptUpdate(ctx, p, &outLen, p, Int32(data.count)) == 1 else { throw CryptoError.openSSL("EVP_EncryptUpdate") }
        }
        var scratch: (UInt64, UInt64) = (0, 0)
        let finalOK = withUnsafeMutableBytes(of: &scratch) { s in
            EVP_EncryptFinal_ex(ctx, s.baseAddress!.assumingMemoryBound(to: UInt8.self), &outLen) == 1
        }
        guard finalOK else { throw CryptoError.openSSL("EVP_EncryptFinal_ex") }
        guard kms_gcm_get_tag(ctx, Int32(AESGCM.tagBytes), tag.baseAddress!) == 1 else { throw CryptoError.openSSL("EVP_CTRL_GCM_GET_TAG") }
    }

    /// Decrypts `data` in place after checking `tag`; on a tag mismatch zeroes `data` and
    /// throws `authenticationFailure`.
    public func open(nonce: UnsafeRawBufferPointer, aad: UnsafeRawBufferPointer,
                     inPlace data: UnsafeMutableRawBufferPointer, tag: UnsafeRawBufferPointer) throws {
        precondition(!encrypting && nonce.count == Self.nonceBytes)
        guard tag.count == AESGCM.tagBytes else { throw CryptoError.authenticationFailure }
        var outLen: Int32 = 0
        guard EVP_DecryptInit_ex(ctx, nil, nil, nil, nonce.bytes) == 1 else { throw CryptoError.openSSL("EVP_DecryptInit_ex(iv)") }
        if aad.count > 0 {
            guard EVP_DecryptUpdate(ctx, nil, &outLen, aad.bytes, Int32(aad.count)) == 1 else { throw CryptoError.openSSL("EVP_DecryptUpdate(aad)") }
        }
        if data.count > 0 {
            let p = data.baseAddress!.assumingMemoryBound(to: UInt8.self)
            guard EVP_DecryptUpdate(ctx, p, &outLen, p, Int32(data.count)) == 1 else { throw CryptoError.openSSL("EVP_DecryptUpdate") }
        }
        var tagCopy: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &tagCopy) { $0.copyMemory(from: tag) }
        let tagSet = withUnsafeMutableBytes(of: &tagCopy) { kms_gcm_set_tag(ctx, Int32(AESGCM.tagBytes), $0.baseAddress!) == 1 }
        guard tagSet else { throw CryptoError.openSSL("EVP_CTRL_GCM_SET_TAG") }
        var scratch: (UInt64, UInt64) = (0, 0)
        let verified = withUnsafeMutableBytes(of: &scratch) { s in
            EVP_DecryptFinal_ex(ctx, s.baseAddress!.assumingMemoryBound(to: UInt8.self), &outLen) == 1
        }
        guard verified else {
            if let base = data.baseAddress { kms_explicit_bzero(base, data.count) }
            ERR_clear_error()
            throw CryptoError.authenticationFailure
        }
    }
}
