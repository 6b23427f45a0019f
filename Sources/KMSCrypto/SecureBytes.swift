import CKMSLinux

/// Secret bytes: held in locked memory, zeroed on release, compared in constant time.
///
/// The bytes are readable only inside a closure, and the type prints nothing of them.
public final class SecureBytes: @unchecked Sendable {
    private let pointer: UnsafeMutableRawPointer
    /// Number of secret bytes.
    public let count: Int

    /// Zero-filled secret storage of `count` bytes.
    ///
    /// Throws `CryptoError.cannotLockMemory` when locked memory cannot be had.
    public init(zeroedCount count: Int) throws {
        precondition(count >= 0)
        self.count = count
        self.pointer = try SecureArena.shared.allocate(max(count, 1))
        kms_explicit_bzero(pointer, max(count, 1))
    }

    /// Copies `bytes` into secret storage. The caller remains responsible for the source.
    public convenience init(copying bytes: UnsafeRawBufferPointer) throws {
        try self.init(zeroedCount: bytes.count)
        if let base = bytes.baseAddress { pointer.copyMemory(from: base, byteCount: bytes.count) }
    }

    /// Copies `bytes` into secret storage and zeroes the array's storage afterwards.
    public convenience init(consuming bytes: inout [UInt8]) throws {
        try self.init(zeroedCount: bytes.count)
        bytes.withUnsafeMutableBytes { src in
            if let base = src.baseAddress {
                pointer.copyMemory(from: base, byteCount: src.count)
                kms_explicit_bzero(base, src.count)
            }
        }
        bytes = []
    }

    /// `count` bytes from OpenSSL's CSPRNG.
    public static func random(count: Int) throws -> SecureBytes {
        let s = try SecureBytes(zeroedCount: count)
        try s.withUnsafeMutableBytes { try SecureRandom.fill($0) }
        return s
    }

    /// A data key: random bytes from the thread's locked pool (`SecureRandom.fillSecret`), so
    /// a GenerateDataKey costs no generator call of its own.
    public static func dataKey(count: Int) throws -> SecureBytes {
        let s = try SecureBytes(zeroedCount: count)
        try s.withUnsafeMutableBytes { try SecureRandom.fillSecret($0) }
        return s
    }

    deinit {
        SecureArena.shared.release(pointer, size: max(count, 1))
    }

    /// Reads the secret inside `body`; do not let the pointer escape.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: pointer, count: count))
    }

    /// Writes the secret inside `body`; do not let the pointer escape.
    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: pointer, count: count))
    }

    /// Constant-time comparison (time depends on the lengths only).
    public func constantTimeEquals(_ other: SecureBytes) -> Bool {
        withUnsafeBytes { a in other.withUnsafeBytes { b in ConstantTime.equals(a, b) } }
    }

    /// A copy of the bytes in ordinary memory, for sending to an authorised caller.
    ///
    /// Use only at the boundary where the plaintext leaves the daemon.
    public func unsafeCopyToArray() -> [UInt8] {
        withUnsafeBytes { Array($0) }
    }
}

extension SecureBytes: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public var description: String { "SecureBytes(\(count) bytes, redacted)" }
    public var debugDescription: String { description }
    public var customMirror: Mirror { Mirror(self, children: []) }
}

/// Comparisons whose time does not depend on the data.
public enum ConstantTime {
    /// True when both buffers have the same length and bytes; time depends on lengths only.
    public static func equals(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    public static func equals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in equals(pa, pb) } }
    }
}

/// Zeroes `buffer` in a way the compiler cannot drop (explicit_bzero), for ordinary memory
/// that held plaintext (a file envelope's chunk buffer).
public func kmsExplicitBzero(_ buffer: UnsafeMutableRawBufferPointer) {
    if let base = buffer.baseAddress, buffer.count > 0 { kms_explicit_bzero(base, buffer.count) }
}
