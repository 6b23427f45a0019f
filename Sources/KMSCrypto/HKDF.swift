import CKMSOpenSSL

/// Digests usable with HKDF and HMAC.
public enum Digest: Sendable {
    case sha256, sha384, sha512

    var openSSLName: UnsafePointer<CChar> {
        switch self {
        case .sha256: kms_sha256()
        case .sha384: kms_sha384()
        case .sha512: kms_sha512()
        }
    }

    public var byteCount: Int {
        switch self {
        case .sha256: 32
        case .sha384: 48
        case .sha512: 64
        }
    }
}

/// HKDF (RFC 5869): HMACs on OpenSSL's digest (`kms_hkdf_derive` in CKMSOpenSSL's shim).
public enum HKDF {
    /// Derives `count` bytes into `out` from `ikm`, `salt` (empty = none) and `info`.
    ///
    /// Throws `invalidParameter` when `count` exceeds 255 hash lengths.
    public static func derive(digest: Digest = .sha256, ikm: UnsafeRawBufferPointer, salt: UnsafeRawBufferPointer,
                              info: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws {
        guard out.count > 0, out.count <= 255 * digest.byteCount else {
            throw CryptoError.invalidParameter("HKDF output length must be 1...\(255 * digest.byteCount)")
        }
        let ok = kms_hkdf_derive(digest.openSSLName, ikm.bytes, ikm.count, salt.bytes, salt.count,
                                 info.bytes, info.count,
                                 out.baseAddress!.assumingMemoryBound(to: UInt8.self), out.count)
        guard ok == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("HKDF")
        }
    }

    /// The same derivation through OpenSSL's EVP_KDF "HKDF" instead of kmsd's HMACs: a
    /// reference for kmsbench (the C cost of HKDF as OpenSSL's API offers it) and for tests.
    public static func deriveWithOpenSSLKDF(digest: Digest = .sha256, ikm: UnsafeRawBufferPointer, salt: UnsafeRawBufferPointer,
                                            info: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws {
        guard out.count > 0, out.count <= 255 * digest.byteCount else {
            throw CryptoError.invalidParameter("HKDF output length must be 1...\(255 * digest.byteCount)")
        }
        guard kms_hkdf_evp_kdf(digest.openSSLName, ikm.bytes, ikm.count, salt.bytes, salt.count, info.bytes, info.count,
                               out.baseAddress!.assumingMemoryBound(to: UInt8.self), out.count) == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_KDF_derive(HKDF)")
        }
    }

    /// Derives a secret key of `count` bytes from a secret input key.
    public static func deriveKey(digest: Digest = .sha256, from ikm: SecureBytes, salt: [UInt8], info: [UInt8],
                                 count: Int = 32) throws -> SecureBytes {
        let out = try SecureBytes(zeroedCount: count)
        try ikm.withUnsafeBytes { k in
            try salt.withUnsafeBytes { s in
                try info.withUnsafeBytes { i in
                    try out.withUnsafeMutableBytes { o in try derive(digest: digest, ikm: k, salt: s, info: i, into: o) }
                }
            }
        }
        return out
    }
}

/// HMAC through OpenSSL's EVP_MAC.
public enum HMAC {
    /// The MAC of `data` under `key`.
    public static func authenticate(digest: Digest = .sha256, key: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 64)
        var len = 0
        let ok = kms_hmac_compute(digest.openSSLName, key.bytes, key.count, data.bytes, data.count, &out, out.count, &len)
        guard ok == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC(HMAC)")
        }
        return Array(out[0..<len])
    }

    public static func authenticate(digest: Digest = .sha256, key: SecureBytes, data: [UInt8]) throws -> [UInt8] {
        try key.withUnsafeBytes { k in try data.withUnsafeBytes { d in try authenticate(digest: digest, key: k, data: d) } }
    }

    /// True when `mac` is the MAC of `data` (compared in constant time).
    public static func isValid(_ mac: [UInt8], digest: Digest = .sha256, key: SecureBytes, data: [UInt8]) throws -> Bool {
        ConstantTime.equals(try authenticate(digest: digest, key: key, data: data), mac)
    }
}

/// Many HMACs under one key in a row (a startup scan of the keystore): the key is set once.
/// OpenSSL keeps the key in its secure heap and frees the context with its memory cleansed;
/// hold one only for the span of the work (never for the daemon's life).
public final class KeyedHMAC {
    private let ctx: OpaquePointer
    public let digest: Digest

    public init(key: SecureBytes, digest: Digest = .sha256) throws {
        self.digest = digest
        let made = key.withUnsafeBytes { k in kms_hmac_keyed_new(digest.openSSLName, k.bytes, k.count) }
        guard let made else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC_init(HMAC)")
        }
        ctx = made
    }

    deinit { EVP_MAC_CTX_free(ctx) }

    /// Starts a MAC over data given in pieces (`update`, then `finish`).
    public func begin() throws {
        guard EVP_MAC_init(ctx, nil, 0, nil) == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC_init(HMAC)")
        }
    }

    public func update(_ data: UnsafeRawBufferPointer) throws {
        guard data.count > 0 else { return }
        guard EVP_MAC_update(ctx, data.bytes, data.count) == 1 else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC_update(HMAC)")
        }
    }

    public func update(_ data: [UInt8]) throws { try data.withUnsafeBytes { try update($0) } }

    /// The MAC of everything given since `begin`.
    public func finish() throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: digest.byteCount)
        var len = 0
        guard EVP_MAC_final(ctx, &out, &len, out.count) == 1, len == digest.byteCount else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC_final(HMAC)")
        }
        return out
    }

    /// The MAC of `data` into `out` (at least `digest.byteCount` bytes).
    public func authenticate(_ data: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws {
        precondition(out.count >= digest.byteCount)
        var len = 0
        guard kms_hmac_keyed_compute(ctx, data.bytes, data.count, out.baseAddress!.assumingMemoryBound(to: UInt8.self), out.count, &len) == 1,
              len == digest.byteCount else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_MAC(HMAC)")
        }
    }
}
