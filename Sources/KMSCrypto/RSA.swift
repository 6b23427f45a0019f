import CKMSLinux
import CKMSOpenSSL
import Glibc

/// The digest of RSAES-OAEP (and of its MGF1), as the AWS wrapping algorithms name it.
public enum OAEPDigest: Sendable {
    case sha1, sha256

    var openSSLName: UnsafePointer<CChar> {
        switch self {
        case .sha1: kms_md_sha1()
        case .sha256: kms_md_sha256()
        }
    }
}

/// An RSA private key in OpenSSL; used to unwrap imported key material.
///
/// When `SecureHeap.initialize` has run, OpenSSL keeps the private parts in its secure heap
/// (locked, zeroed when freed). The key is freed when this object goes.
public final class RSAPrivateKey: @unchecked Sendable {
    let pkey: OpaquePointer

    private init(_ pkey: OpaquePointer) { self.pkey = pkey }
    deinit { EVP_PKEY_free(pkey) }

    /// A fresh key of `bits` (2048, 3072 or 4096).
    public static func generate(bits: Int) throws -> RSAPrivateKey {
        guard [2048, 3072, 4096].contains(bits) else { throw CryptoError.invalidParameter("RSA key size must be 2048, 3072 or 4096 bits") }
        guard let k = kms_rsa_generate(Int32(bits)) else {
            ERR_clear_error()
            throw CryptoError.openSSL("EVP_PKEY_generate(RSA)")
        }
        return RSAPrivateKey(k)
    }

    /// A key from DER (PKCS#8 or PKCS#1); for tests against published vectors.
    public convenience init(der: [UInt8]) throws {
        guard let k = der.withUnsafeBufferPointer({ kms_private_key_from_der($0.baseAddress, $0.count) }) else {
            ERR_clear_error()
            throw CryptoError.invalidParameter("not a DER private key")
        }
        guard kms_pkey_is_rsa(k) == 1 else {
            EVP_PKEY_free(k)
            throw CryptoError.invalidParameter("not an RSA key")
        }
        self.init(k)
    }

    public var bits: Int { Int(EVP_PKEY_get_bits(pkey)) }

    /// The public key as DER SubjectPublicKeyInfo, the form AWS KMS returns.
    public func publicKeyDER() throws -> [UInt8] {
        var out: UnsafeMutablePointer<UInt8>? = nil
        let n = kms_public_key_der(pkey, &out)
        guard n > 0, let out else { ERR_clear_error(); throw CryptoError.openSSL("i2d_PUBKEY") }
        defer { kms_openssl_free(out) }
        return Array(UnsafeBufferPointer(start: out, count: Int(n)))
    }

    /// RSAES-OAEP decryption (MGF1 over the same digest, empty label) into locked memory.
    /// Any failure is `authenticationFailure`, whatever its cause, so nothing tells a padding
    /// error from another.
    public func decryptOAEP(_ ciphertext: [UInt8], digest: OAEPDigest) throws -> SecureBytes {
        let size = Int(EVP_PKEY_get_size(pkey))
        guard ciphertext.count == size else { throw CryptoError.authenticationFailure }
        let scratch = try SecureBytes(zeroedCount: size)
        var length = size
        let ok = scratch.withUnsafeMutableBytes { out in
            ciphertext.withUnsafeBufferPointer { c in
                kms_rsa_oaep(0, pkey, digest.openSSLName, c.baseAddress, c.count,
                             out.baseAddress!.assumingMemoryBound(to: UInt8.self), &length)
            }
        }
        guard ok == 1, length <= size else { ERR_clear_error(); throw CryptoError.authenticationFailure }
        return try scratch.withUnsafeBytes { try SecureBytes(copying: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
    }
}

/// An RSA public key from DER SubjectPublicKeyInfo; encrypts with RSAES-OAEP. kmsd itself
/// only decrypts; this is for clients and tests.
public final class RSAPublicKey: @unchecked Sendable {
    let pkey: OpaquePointer
    deinit { EVP_PKEY_free(pkey) }

    public init(der: [UInt8]) throws {
        guard let k = der.withUnsafeBufferPointer({ kms_public_key_from_der($0.baseAddress, $0.count) }) else {
            ERR_clear_error()
            throw CryptoError.invalidParameter("not a DER SubjectPublicKeyInfo")
        }
        guard kms_pkey_is_rsa(k) == 1 else { EVP_PKEY_free(k); throw CryptoError.invalidParameter("not an RSA key") }
        pkey = k
    }

    public func encryptOAEP(_ plaintext: UnsafeRawBufferPointer, digest: OAEPDigest) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(EVP_PKEY_get_size(pkey)))
        var length = out.count
        let ok = out.withUnsafeMutableBufferPointer { o in
            kms_rsa_oaep(1, pkey, digest.openSSLName, plaintext.bytes, plaintext.count, o.baseAddress, &length)
        }
        guard ok == 1 else { ERR_clear_error(); throw CryptoError.invalidParameter("RSA-OAEP encryption failed (plaintext too long for the key?)") }
        return Array(out[0..<length])
    }
}

/// AES key wrap with padding (RFC 5649, "KWP"), the second half of RSA_AES_KEY_WRAP_SHA_*.
public enum AESKeyWrap {
    /// Unwraps into locked memory; `authenticationFailure` when the integrity check fails.
    public static func unwrap(key: SecureBytes, wrapped: [UInt8]) throws -> SecureBytes {
        guard wrapped.count >= 16, wrapped.count % 8 == 0 else { throw CryptoError.authenticationFailure }
        let scratch = try SecureBytes(zeroedCount: wrapped.count)
        var length = 0
        let ok = key.withUnsafeBytes { k in
            scratch.withUnsafeMutableBytes { out in
                wrapped.withUnsafeBufferPointer { w in
                    kms_aes_wrap_pad(0, k.bytes, k.count, w.baseAddress, w.count,
                                     out.baseAddress!.assumingMemoryBound(to: UInt8.self), out.count, &length)
                }
            }
        }
        guard ok == 1, length <= wrapped.count else { ERR_clear_error(); throw CryptoError.authenticationFailure }
        return try scratch.withUnsafeBytes { try SecureBytes(copying: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
    }

    /// Wraps `plaintext` under `key` (16, 24 or 32 bytes).
    public static func wrap(key: UnsafeRawBufferPointer, plaintext: UnsafeRawBufferPointer) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: plaintext.count + 16)
        var length = 0
        let ok = out.withUnsafeMutableBufferPointer { o in
            kms_aes_wrap_pad(1, key.bytes, key.count, plaintext.bytes, plaintext.count, o.baseAddress, o.count, &length)
        }
        guard ok == 1 else { ERR_clear_error(); throw CryptoError.invalidParameter("AES key wrap needs a 16, 24 or 32-byte key and 1 or more bytes") }
        return Array(out[0..<length])
    }
}

/// OpenSSL's secure heap: locked memory OpenSSL uses for private key parts (BN_secure_new).
public enum SecureHeap {
    /// Sets it up once (`bytes` a power of two); false when the memory could not be locked.
    ///
    /// OpenSSL locks the heap and excludes it from core dumps; kmsd also has it wiped in a
    /// forked child (MADV_WIPEONFORK), like its own secret memory. OpenSSL does not say where
    /// the heap is, so the mapping is found as the one that appeared for it in
    /// /proc/self/maps. Call early, before other threads map memory.
    @discardableResult
    public static func initialize(bytes: Int = 1 << 20) -> Bool {
        guard kms_secure_heap_initialized() == 0 else { return true }
        let before = Set(mappings())
        guard kms_secure_heap_init(bytes) == 1 else { return false }
        var wiped = false
        for m in mappings() where !before.contains(m) && m.writable && m.end - m.start >= UInt(bytes) {
            guard let p = UnsafeMutableRawPointer(bitPattern: m.start), kms_madvise_secret(p, Int(m.end - m.start)) == 0 else { return false }
            wiped = true
        }
        return wiped
    }

    struct Mapping: Hashable { let start: UInt; let end: UInt; let writable: Bool }

    /// Anonymous private mappings of this process.
    static func mappings() -> [Mapping] {
        let fd = Glibc.open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count == 5, fields[1].hasSuffix("p") else { return nil }  // no path: anonymous
            let range = fields[0].split(separator: "-")
            guard range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16) else { return nil }
            return Mapping(start: start, end: end, writable: fields[1].hasPrefix("rw"))
        }
    }

    public static var bytesInUse: Int { Int(kms_secure_heap_used()) }
}
