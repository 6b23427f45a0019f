import Foundation
import Glibc
import KMSClient
import Testing

/// Backup and restore (issue 11, item 6): `kmsctl backup` under load, `kmsd restore` into a
/// fresh state directory with the same root key, every acknowledged key and ciphertext intact;
/// a backup that is truncated, altered, extended or under another root key is refused and
/// leaves nothing behind.
@Suite(.serialized)
struct BackupTests {
    struct Sealed: Sendable { let key: String; let plaintext: [UInt8]; let blob: [UInt8]; let context: [String: String] }

    @Test func aBackupTakenUnderLoadRestoresEveryAcknowledgedKeyAndCiphertext() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let dir = try Paths.tempDir("backup")
        let file = dir + "/keystore.kmsdbak"

        // Load on other connections while the backup runs: new keys and encryptions.
        let acknowledged = Shared<[Sealed]>([])
        let stop = Shared(false)
        let load = Task {
            let c = daemon.client()
            var n = 0
            while !stop.load() {
                n += 1
                guard let key = try? await c.createKey(description: "load \(n)").keyID else { continue }
                let plaintext = Array("secret \(n)".utf8), context = ["n": "\(n)"]
                guard let blob = try? await c.encrypt(keyID: key, plaintext: plaintext, context: context).ciphertextBlob else { continue }
                acknowledged.update { $0.append(Sealed(key: key, plaintext: plaintext, blob: Array(blob), context: context)) }
            }
        }
        while acknowledged.load().count < 200 { try await Task.sleep(for: .milliseconds(20)) }
        let before = acknowledged.load()  // all acknowledged before the backup began
        let backup = try run(Paths.kmsctl, ["backup", "--out", file, "--json", "--socket", daemon.socket])
        stop.store(true)
        await load.value
        try #require(backup.status == 0, "kmsctl backup: \(backup.stderr)")
        let summary = try #require(try JSONSerialization.jsonObject(with: backup.stdout) as? [String: Any])
        let size = try FileManager.default.attributesOfItem(atPath: file)[.size] as? Int
        #expect(summary["Size"] as? Int == size)
        #expect((summary["KeyCount"] as? Int ?? 0) >= before.count)
        #expect(!FileManager.default.fileExists(atPath: file + ".partial"))
        let mode = try FileManager.default.attributesOfItem(atPath: file)[.posixPermissions] as? Int
        #expect(mode == 0o600, "the backup file is private to its owner")
        print("backup: \(size ?? 0) bytes, \(summary["KeyCount"] ?? "?") keys; \(before.count) acknowledged before it began, \(acknowledged.load().count) by its end")

        // Restore on a fresh state directory with the same root key, and use it.
        let restoredDir = dir + "/restored"
        let restore = try run(Paths.kmsd, ["restore", "--state-dir", restoredDir, "--root-key-file", daemon.stateDir + "/root-key", "--from", file])
        try #require(restore.status == 0, "kmsd restore: \(restore.stderr)")
        #expect(restore.text.contains("restored"))
        let restored = try Daemon(stateDir: restoredDir, arguments: ["--root-key-file", daemon.stateDir + "/root-key"])
        defer { restored.stop() }
        let c = restored.client()
        for s in before {
            let out = try await c.decrypt(ciphertextBlob: s.blob, context: s.context)
            #expect(Array(out.plaintext) == s.plaintext && out.keyID == s.key)
        }
        // And it serves new work: the restored keys encrypt, blobs move back to the original.
        let fresh = try await c.encrypt(keyID: before[0].key, plaintext: [42])
        #expect(Array(try await daemon.client().decrypt(ciphertextBlob: Array(fresh.ciphertextBlob)).plaintext) == [42])
    }

    @Test func aDamagedOrForeignBackupIsRefusedAndLeavesNothing() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        _ = try await daemon.client().createKey(description: "to back up")
        let dir = try Paths.tempDir("backup-bad")
        let file = dir + "/good.kmsdbak"
        let made = try run(Paths.kmsctl, ["backup", "--out", file, "--socket", daemon.socket])
        try #require(made.status == 0, "\(made.stderr)")
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        try writeRandomKey(dir + "/other-root-key")
        var damaged: [(String, [UInt8], String)] = [
            ("truncated in the header", Array(good.prefix(20)), "truncated"),
            ("truncated in the keystore", Array(good.prefix(good.count / 2)), "truncated"),
            ("truncated in the tag", Array(good.dropLast(5)), "truncated"),
            ("extended", good + [0], "after its authentication tag"),
            ("not a backup", Array(repeating: 0x41, count: 100), "not a kmsd backup"),
        ]
        for (what, at) in [("a bit flipped in the header's date", 20), ("a bit flipped in the keystore", good.count / 2), ("a bit flipped in the tag", good.count - 1)] {
            var b = good
            b[at] ^= 0x01
            damaged.append((what, b, "authentication tag does not match"))
        }
        var tests = damaged.map { ($0.0, $0.1, daemon.stateDir + "/root-key", $0.2) }
        tests.append(("under another root key", good, dir + "/other-root-key", "made under root key"))
        for (i, (what, bytes, rootKey, expected)) in tests.enumerated() {
            let path = dir + "/bad-\(i)"
            FileManager.default.createFile(atPath: path, contents: Data(bytes))
            let target = dir + "/state-\(i)"
            let r = try run(Paths.kmsd, ["restore", "--state-dir", target, "--root-key-file", rootKey, "--from", path])
            #expect(r.status == 1, "\(what): exit \(r.status)")
            #expect(r.stderr.contains(expected), "\(what): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: target), "\(what): \(target) was left behind")
        }
        // From standard input too, and never over an existing keystore.
        let piped = try run(Paths.kmsd, ["restore", "--state-dir", dir + "/piped", "--root-key-file", daemon.stateDir + "/root-key", "--from", "-"], stdin: Data(good))
        #expect(piped.status == 0, "\(piped.stderr)")
        let again = try run(Paths.kmsd, ["restore", "--state-dir", dir + "/piped", "--root-key-file", daemon.stateDir + "/root-key", "--from", file])
        #expect(again.status == 1 && again.stderr.contains("already has a keystore"), "\(again.stderr)")
    }

    @Test func backupChunksAreChecked() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let c = daemon.client()
        let made = try await c.createBackup()
        #expect(made.backupID.count == 32 && made.size > 66)
        let last = try await c.getBackupChunk(backupID: made.backupID, offset: made.size)
        #expect(last.data.isEmpty && last.size == made.size)
        await expectKMSError(.validation) { _ = try await c.getBackupChunk(backupID: made.backupID, offset: made.size + 1) }
        await expectKMSError(.notFound) { _ = try await c.getBackupChunk(backupID: String(repeating: "0", count: 32), offset: 0) }
        await expectKMSError(.validation) { _ = try await c.getBackupChunk(backupID: "../../../../../../../../etc/pass", offset: 0) }  // 32 characters, not hex
        // The chunks put together are the file: header, keystore, tag.
        var bytes: [UInt8] = []
        while UInt64(bytes.count) < made.size {
            bytes += try await c.getBackupChunk(backupID: made.backupID, offset: UInt64(bytes.count)).data
        }
        #expect(bytes.count == Int(made.size) && Array(bytes.prefix(8)) == Array("KMSDBKUP".utf8))
        #expect(Array(bytes[34..<50]) == Array("SQLite format 3\0".utf8))
    }

    @Test(.enabled(if: isRoot, "needs root to act as another uid with setpriv"))
    func onlyAdministratorsBackUp() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let other = try runAs(uid: 64102, [Paths.kmsctl, "backup", "--out", "-"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(other.status == 1 && other.stderr.contains("AccessDeniedException"), "\(other.stderr)")
        #expect(other.stdout.isEmpty)
    }
}
