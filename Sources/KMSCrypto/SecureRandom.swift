import CKMSOpenSSL

/// Random bytes from OpenSSL's CSPRNG.
public enum SecureRandom {
    /// Fills `buffer`; throws when OpenSSL's generator fails.
    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0 else { return }
        guard RAND_bytes(buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(buffer.count)) == 1 else {
            throw CryptoError.openSSL("RAND_bytes")
        }
    }

    /// `count` random bytes in ordinary memory (for salts, nonces, ids: never for keys).
    public static func bytes(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try fill($0) }
        return out
    }

    /// Fills `buffer` with random bytes that become public at once (a ciphertext's salt and
    /// nonce), from a per-thread pool that OpenSSL's generator refills 4 KiB at a time
    /// (`kms_public_random_bytes`): one generator call costs about as much as the request's
    /// AES-GCM, whatever its size. Each byte is handed out once and then zeroed in the pool; a
    /// fork makes every pool refill first. Never for keys, tokens or anything else that stays
    /// secret: those take `fill` or `bytes`.
    public static func fillPublic(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0 else { return }
        guard kms_public_random_bytes(buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), buffer.count) == 1 else {
            throw CryptoError.openSSL("RAND_bytes")
        }
    }

    /// Fills `buffer` (locked memory: a SecureBytes) with random bytes for a secret, from a
    /// per-thread pool in a locked, dont-dump, wipe-on-fork page that OpenSSL's generator
    /// refills 4 KiB at a time (`kms_secret_random_bytes`), for data keys (one per
    /// GenerateDataKey). Each byte is handed out once and zeroed in the pool as it is.
    public static func fillSecret(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0 else { return }
        guard kms_secret_random_bytes(buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), buffer.count) == 1 else {
            throw CryptoError.openSSL("RAND_bytes")
        }
    }

    /// Whether this thread's public pool, and its secret pool, would hand out bytes without
    /// refilling from the generator (a forked child's must not: the fork test asks).
    static var publicPoolReady: Bool { kms_public_pool_ready() == 1 }
    static var secretPoolReady: Bool { kms_secret_pool_ready() == 1 }
}
