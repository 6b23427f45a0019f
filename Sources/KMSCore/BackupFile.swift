import Foundation
import KMSCrypto
import KMSProtocol

/// A backup file (PROTOCOL.md §14): a consistent snapshot of the keystore (an SQLite database,
/// its key material wrapped as at rest), authenticated under a key derived from the root key,
/// so that a restore accepts it only under that root key and only unaltered.
///
///     "KMSDBKUP" (8) ‖ version 1 (2, big-endian) ‖ root key fingerprint (8) ‖
///     created at, Unix seconds (8, big-endian) ‖ payload length n (8, big-endian) ‖
///     payload (n) ‖ HMAC-SHA256(backup key, every byte before) (32)
///
/// The backup key is HKDF-SHA256(root key, salt empty, info "kmsd/v1/backup-mac", 32 bytes).
public enum BackupFile {
    public static let magic = Array("KMSDBKUP".utf8)
    public static let version: UInt16 = 1
    public static let headerBytes = 34
    public static let tagBytes = 32
    /// Pieces read and authenticated at a time: memory stays constant whatever the size.
    static let pieceBytes = 1 << 20

    public struct Header: Equatable, Sendable {
        public var rootKeyFingerprint: String  // 16 hex digits
        public var createdAt: UInt64
        public var payloadBytes: UInt64

        public init(rootKeyFingerprint: String, createdAt: UInt64, payloadBytes: UInt64) {
            self.rootKeyFingerprint = rootKeyFingerprint
            self.createdAt = createdAt
            self.payloadBytes = payloadBytes
        }

        public var encoded: [UInt8] {
            var out = BackupFile.magic
            out += [UInt8(BackupFile.version >> 8), UInt8(BackupFile.version & 0xff)]
            out += Hex.decode(rootKeyFingerprint) ?? [UInt8](repeating: 0, count: 8)
            for value in [createdAt, payloadBytes] { out += (0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) } }
            return out
        }

        /// Reads the 34 header bytes; the tag is checked later, over everything.
        public static func parse(_ bytes: [UInt8]) throws(BackupError) -> Header {
            guard bytes.count == BackupFile.headerBytes else {
                throw BackupError("the backup is truncated: \(bytes.count) bytes, shorter than its \(BackupFile.headerBytes)-byte header")
            }
            guard Array(bytes[0..<8]) == BackupFile.magic else { throw BackupError("not a kmsd backup file (it does not begin with KMSDBKUP)") }
            let version = UInt16(bytes[8]) << 8 | UInt16(bytes[9])
            guard version == BackupFile.version else {
                throw BackupError("backup format version \(version) is not one this kmsd reads (version \(BackupFile.version))")
            }
            func u64(_ at: Int) -> UInt64 { bytes[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }
            return Header(rootKeyFingerprint: Hex.encode(Array(bytes[10..<18])), createdAt: u64(18), payloadBytes: u64(26))
        }
    }

    /// The tag of a backup whose payload `read` yields in pieces (0 at its end).
    public static func tag(header: Header, root: RootKey, read: (UnsafeMutableRawBufferPointer) throws -> Int) throws -> [UInt8] {
        let mac = try KeyedHMAC(key: root.backupMACKey)
        try mac.begin()
        try mac.update(header.encoded)
        var piece = [UInt8](repeating: 0, count: pieceBytes)
        var total: UInt64 = 0
        while true {
            let n = try piece.withUnsafeMutableBytes { try read($0) }
            if n == 0 { break }
            try piece.withUnsafeBytes { try mac.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            total += UInt64(n)
        }
        guard total == header.payloadBytes else {
            throw BackupError("the snapshot changed size while it was authenticated (\(total) bytes, expected \(header.payloadBytes))")
        }
        return try mac.finish()
    }

    /// Checks a whole backup that `read` yields in pieces (0 at its end), handing its payload
    /// to `write` as it goes; throws at the first problem. The caller must discard what `write`
    /// received unless this returns: the payload is known authentic only at the end.
    public static func open(root: RootKey, read: (UnsafeMutableRawBufferPointer) throws -> Int,
                            write: (UnsafeRawBufferPointer) throws -> Void) throws -> Header {
        func readFully(_ count: Int) throws -> [UInt8] {
            var out = [UInt8](repeating: 0, count: count)
            var got = 0
            while got < count {
                let n = try out.withUnsafeMutableBytes { try read(UnsafeMutableRawBufferPointer(rebasing: $0[got...])) }
                if n == 0 { break }
                got += n
            }
            return Array(out[0..<got])
        }
        let headerBytes = try readFully(headerBytes)
        let header = try Header.parse(headerBytes)
        guard header.rootKeyFingerprint == root.fingerprint else {
            throw BackupError("the backup was made under root key \(header.rootKeyFingerprint); the root key given is \(root.fingerprint). Restore with the root key the backed-up kmsd used")
        }
        let mac = try KeyedHMAC(key: root.backupMACKey)
        try mac.begin()
        try mac.update(headerBytes)
        var remaining = header.payloadBytes
        while remaining > 0 {
            let want = Int(min(UInt64(pieceBytes), remaining))
            let piece = try readFully(want)  // shorter only at the end of the file
            guard piece.count == want else {
                throw BackupError("the backup is truncated: its header announces \(header.payloadBytes) bytes of keystore, the file ends after \(header.payloadBytes - remaining + UInt64(piece.count))")
            }
            try mac.update(piece)
            try piece.withUnsafeBytes { try write($0) }
            remaining -= UInt64(want)
        }
        let tag = try readFully(tagBytes)
        guard tag.count == tagBytes else {
            throw BackupError("the backup is truncated: it ends \(tagBytes - tag.count) bytes short of its authentication tag")
        }
        guard try readFully(1).isEmpty else { throw BackupError("the backup has bytes after its authentication tag: it is not a file kmsd wrote") }
        guard ConstantTime.equals(try mac.finish(), tag) else {
            throw BackupError("the backup's authentication tag does not match: the file was altered or corrupted (or made by another kmsd under a root key of the same fingerprint)")
        }
        return header
    }
}

public struct BackupError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
