import Foundation
import Glibc
import KMSCrypto
import KMSProtocol

/// A 256-bit secret and the keys derived from it, held only in locked memory. Two of them:
/// the root key (the systemd credential), which only wraps the keystore key; and the
/// keystore key (random, made with the keystore, kept wrapped in it), from which the keys that
/// wrap key material and authenticate rows derive. Rotating the root key re-wraps the keystore
/// key alone (`kmsd rewrap`). A keystore made before the keystore key existed derives them
/// from the root key itself and cannot be rewrapped.
public final class RootKey: Sendable {
    public static let byteCount = 32
    static let wrapLabel = Array("kmsd/v1/keystore-wrap".utf8)
    static let macLabel = Array("kmsd/v1/keystore-record-mac".utf8)
    static let keystoreKeyWrapLabel = Array("kmsd/v2/keystore-key-wrap".utf8)
    static let fingerprintLabel = Array("kmsd/v2/root-key-fingerprint".utf8)
    static let backupLabel = Array("kmsd/v1/backup-mac".utf8)

    /// Wraps key material at rest.
    public let wrappingKey: SecureBytes
    /// Authenticates keystore records.
    public let recordMACKey: SecureBytes
    /// Wraps the keystore key (used when this is the root key).
    let keystoreKeyWrappingKey: SecureBytes
    /// Authenticates backup files (PROTOCOL.md §14; used when this is the root key).
    public let backupMACKey: SecureBytes
    /// Names this key without showing anything of it (16 hex digits of a one-way derivation):
    /// which root key a keystore is under, in messages and the audit trail.
    public var fingerprint: String { Hex.encode(fingerprintBytes) }
    let fingerprintBytes: [UInt8]

    public init(material: SecureBytes) throws {
        guard material.count == Self.byteCount else {
            throw RootKeyError("the root key must be exactly \(Self.byteCount) bytes, found \(material.count)")
        }
        wrappingKey = try HKDF.deriveKey(from: material, salt: [], info: Self.wrapLabel)
        recordMACKey = try HKDF.deriveKey(from: material, salt: [], info: Self.macLabel)
        keystoreKeyWrappingKey = try HKDF.deriveKey(from: material, salt: [], info: Self.keystoreKeyWrapLabel)
        backupMACKey = try HKDF.deriveKey(from: material, salt: [], info: Self.backupLabel)
        // Public by design: a one-way 64-bit name, not a check value an attacker could use.
        fingerprintBytes = try HKDF.deriveKey(from: material, salt: [], info: Self.fingerprintLabel, count: 8).unsafeCopyToArray()
    }

    /// `1 ‖ fingerprint of the wrapping root key (8) ‖ nonce (12) ‖ AES-256-GCM(keystore key) ‖ tag`,
    /// the fingerprint also the AAD.
    func wrapKeystoreKey(_ key: SecureBytes) throws -> [UInt8] {
        let print = fingerprintBytes
        let nonce = try SecureRandom.bytes(AESGCM.nonceBytes)
        let sealed = try key.withUnsafeBytes { try AESGCM.seal(key: keystoreKeyWrappingKey, nonce: nonce, plaintext: $0, aad: Self.keystoreKeyAAD(print)) }
        return [1] + print + nonce + sealed
    }

    /// The keystore key, or nil when `wrapped` was not made under this root key.
    func unwrapKeystoreKey(_ wrapped: [UInt8]) throws -> SecureBytes? {
        guard wrapped.count == 1 + 8 + AESGCM.nonceBytes + Self.byteCount + AESGCM.tagBytes, wrapped[0] == 1 else {
            throw RootKeyError("the keystore's wrapped keystore key is malformed (\(wrapped.count) bytes): the keystore was modified outside kmsd; restore it from a backup")
        }
        let print = Array(wrapped[1..<9])
        return try? AESGCM.open(key: keystoreKeyWrappingKey, nonce: Array(wrapped[9..<(9 + AESGCM.nonceBytes)]),
                                sealed: Array(wrapped[(9 + AESGCM.nonceBytes)...]), aad: Self.keystoreKeyAAD(print))
    }

    /// The fingerprint of the root key a wrapped keystore key names.
    static func wrappingFingerprint(_ wrapped: [UInt8]) -> String {
        wrapped.count > 9 ? Hex.encode(Array(wrapped[1..<9])) : "unknown"
    }

    static func keystoreKeyAAD(_ print: [UInt8]) -> [UInt8] { Array("kmsd/v2/keystore-key".utf8) + print }


    /// Reads a root key file (32 raw bytes, private to its owner, owned by root or this uid).
    public static func read(file path: String, privateOnly: Bool = true) throws -> RootKey {
        try RootKey(material: readKeyFile(path, privateOnly: privateOnly))
    }

    /// Where the root key came from, for the startup message.
    public enum Source: Sendable, Equatable, CustomStringConvertible {
        case credential(String), file(String), generated(String)
        public var description: String {
            switch self {
            case .credential(let p): "systemd credential \(p)"
            case .file(let p): "file \(p)"
            case .generated(let p): "NEW development root key generated at \(p)"
            }
        }
    }

    /// Loads the root key: `$CREDENTIALS_DIRECTORY/root-key`, else `file`, else (development
    /// mode only) a key generated at `devPath` (mode 0600).
    ///
    /// Throws RootKeyError saying which source failed and how to provide one.
    public static func load(credentialsDirectory: String?, file: String?, devPath: String?) throws -> (RootKey, Source) {
        if let dir = credentialsDirectory, !dir.isEmpty {
            let path = dir + "/root-key"
            if FileManager.default.fileExists(atPath: path) {
                return (try RootKey(material: readKeyFile(path, privateOnly: false)), .credential(path))
            }
        }
        if let file {
            return (try RootKey(material: readKeyFile(file)), .file(file))
        }
        if let devPath {
            if FileManager.default.fileExists(atPath: devPath) {
                return (try RootKey(material: readKeyFile(devPath)), .file(devPath))
            }
            let material = try SecureBytes.random(count: byteCount)
            try writeNewKeyFile(devPath, material)
            return (try RootKey(material: material), .generated(devPath))
        }
        throw RootKeyError("no root key: set LoadCredentialEncrypted=root-key in the unit (CREDENTIALS_DIRECTORY), or root_key_file in the configuration, or run with --dev")
    }

    /// Reads exactly 32 raw bytes into locked memory without an intermediate heap copy.
    /// A key file others may read is refused (systemd credentials are private by construction).
    static func readKeyFile(_ path: String, privateOnly: Bool = true) throws -> SecureBytes {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw RootKeyError("cannot open root key \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw RootKeyError("cannot stat root key \(path)") }
        guard st.st_uid == geteuid() || st.st_uid == 0 else {
            throw RootKeyError("root key \(path) belongs to uid \(st.st_uid), not to kmsd's uid \(geteuid()) or root: whoever owns it may have planted a key they know. Fix: create the key as root or as kmsd's user")
        }
        guard st.st_mode & 0o022 == 0 else {
            throw RootKeyError("root key \(path) is writable by group or others (mode \(String(st.st_mode & 0o777, radix: 8))); run: chmod 600 \(path)")
        }
        guard !privateOnly || st.st_mode & 0o077 == 0 else {
            throw RootKeyError("root key \(path) is readable by others (mode \(String(st.st_mode & 0o777, radix: 8))); run: chmod 600 \(path)")
        }
        guard st.st_size == byteCount else {
            throw RootKeyError("root key \(path) must hold exactly \(byteCount) raw bytes; it holds \(st.st_size). Create one with: head -c 32 /dev/urandom > FILE")
        }
        let key = try SecureBytes(zeroedCount: byteCount)
        let n = key.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, byteCount) }
        guard n == byteCount else { throw RootKeyError("short read from root key \(path)") }
        return key
    }

    static func writeNewKeyFile(_ path: String, _ key: SecureBytes) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw RootKeyError("cannot create root key \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let n = key.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard n == byteCount, fsync(fd) == 0 else { throw RootKeyError("cannot write root key \(path)") }
    }
}

public struct RootKeyError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}
