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
}
