import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// Protocol/vectors/backup.json (from the independent Python reference) against BackupFile:
/// the same header and tag for the same root key, time and payload; every damaged or foreign
/// file refused for the stated reason.
struct BackupFileVectorTests {
    struct Valid: Decodable {
        let root_key_hex, root_key_fingerprint_hex, backup_mac_key_hex, payload_hex, header_hex, tag_hex, backup_hex: String
        let created_at: UInt64
    }

    struct Invalid: Decodable, CustomTestStringConvertible {
        let name, root_key_hex, backup_hex, fails_with: String
        var testDescription: String { name }
    }

    struct File: Decodable { let valid: Valid; let invalid: [Invalid] }

    static let file: File = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Protocol/vectors/backup.json")
        return try! JSONDecoder().decode(File.self, from: Data(contentsOf: url))
    }()

    static func root(_ hex: String) throws -> RootKey {
        var bytes = hex.hexBytes
        return try RootKey(material: SecureBytes(consuming: &bytes))
    }

    /// Opens `bytes` as BackupFile.open does from a file, in pieces of `piece` bytes.
    static func open(_ bytes: [UInt8], root: RootKey, piece: Int = 7) throws -> (BackupFile.Header, [UInt8]) {
        var at = 0
        var payload: [UInt8] = []
        let header = try BackupFile.open(root: root, read: { buffer in
            let n = min(piece, buffer.count, bytes.count - at)
            for i in 0..<n { buffer[i] = bytes[at + i] }
            at += n
            return n
        }, write: { payload += $0 })
        return (header, payload)
    }

    @Test func theValidBackupHasTheReferenceBytesAndOpens() throws {
        let v = Self.file.valid
        let root = try Self.root(v.root_key_hex)
        #expect(root.fingerprint == v.root_key_fingerprint_hex)
        #expect(root.backupMACKey.unsafeCopyToArray() == v.backup_mac_key_hex.hexBytes)
        let payload = v.payload_hex.hexBytes
        let header = BackupFile.Header(rootKeyFingerprint: root.fingerprint, createdAt: v.created_at, payloadBytes: UInt64(payload.count))
        #expect(header.encoded == v.header_hex.hexBytes)
        var at = 0
        let tag = try BackupFile.tag(header: header, root: root) { buffer in
            let n = min(buffer.count, payload.count - at)
            for i in 0..<n { buffer[i] = payload[at + i] }
            at += n
            return n
        }
        #expect(tag == v.tag_hex.hexBytes)
        #expect(header.encoded + payload + tag == v.backup_hex.hexBytes)
        for piece in [1, 7, 1 << 20] {
            let (opened, out) = try Self.open(v.backup_hex.hexBytes, root: root, piece: piece)
            #expect(opened == header && out == payload)
        }
    }

    @Test(arguments: file.invalid)
    func aDamagedOrForeignBackupIsRefused(_ v: Invalid) throws {
        let expected = ["truncated": "truncated", "after its authentication tag": "after its authentication tag",
                        "not a kmsd backup": "not a kmsd backup", "version": "version", "authentication tag": "authentication tag does not match",
                        "root key": "made under root key"][v.fails_with] ?? v.fails_with
        do {
            _ = try Self.open(v.backup_hex.hexBytes, root: Self.root(v.root_key_hex))
            Issue.record("\(v.name) opened")
        } catch let error as BackupError {
            #expect(error.description.contains(expected), "\(v.name): \(error.description)")
        }
    }
}
