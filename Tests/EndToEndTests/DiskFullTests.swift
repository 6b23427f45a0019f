import Foundation
import Glibc
import KMSClient
import Testing

/// A keystore on a full filesystem: writes are refused with a clear error, nothing already
/// acknowledged is lost or damaged, reads and crypto with existing keys go on, and kmsd
/// writes again once there is room (before and after a restart).
@Suite(.serialized)
struct DiskFullTests {
    /// Root, and allowed to mount (not so in a container without CAP_SYS_ADMIN): tried once.
    static let canMountTmpfs: Bool = {
        guard isRoot, let dir = try? Paths.tempDir("mount-probe") else { return false }
        defer { rmdir(dir) }
        guard let r = try? run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir]), r.status == 0 else { return false }
        _ = try? run("/bin/umount", [dir])
        return true
    }()

    @Test(.enabled(if: canMountTmpfs, "needs root and the right to mount a small tmpfs for the state directory"))
    func aFullDiskGivesCleanErrorsAndRecovers() async throws {
        let mountPoint = try Paths.tempDir("diskfull")
        let mounted = try run("/bin/mount", ["-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", mountPoint])
        try #require(mounted.status == 0, "mount: \(mounted.text)")
        defer { _ = try? run("/bin/umount", ["-l", mountPoint]) }
        let daemon = try Daemon(stateDir: mountPoint + "/state")
        defer { daemon.stop() }
        let c = daemon.client()
        let key = try await c.createKey(description: "before the disk filled").keyID
        let plaintext = Array("written before the disk filled".utf8)
        let blob = Array(try await c.encrypt(keyID: key, plaintext: plaintext).ciphertextBlob)

        // Fill the filesystem to the last block.
        _ = try run("/bin/sh", ["-c", "dd if=/dev/zero of='\(mountPoint)/filler' bs=64k 2>/dev/null; dd if=/dev/zero of='\(mountPoint)/filler2' bs=512 2>/dev/null; true"])
        var acknowledged: [String] = []
        var refusal: KMSError? = nil
        for _ in 0..<5000 {
            do {
                acknowledged.append(try await c.createKey(description: "while the disk fills").keyID)
            } catch let e as KMSError {
                refusal = e
                break
            }
        }
        let refused = try #require(refusal, "5000 CreateKeys fitted on a full 4 MB filesystem")
        #expect(refused.code == .internalError, "a full disk answers KMSInternalException, not \(refused.code.rawValue)")
        #expect(refused.message.contains("keystore") && refused.message.lowercased().contains("full"),
                "the error says the keystore's disk is full: \(refused.message)")
        // Another write refused the same way, and the daemon serves everything that needs no room.
        await expectKMSError(.internalError) { _ = try await c.createKey() }
        #expect(Array(try await c.decrypt(ciphertextBlob: blob).plaintext) == plaintext)
        let during = Array(try await c.encrypt(keyID: key, plaintext: plaintext).ciphertextBlob)
        for id in acknowledged.suffix(5) + [key] { #expect((try? await c.describeKey(keyID: id)) != nil, "key \(id) unreadable while the disk is full") }

        // Room again: writes work without a restart, and after one everything is there.
        unlink(mountPoint + "/filler")
        unlink(mountPoint + "/filler2")
        let after = try await c.createKey(description: "after the disk had room again").keyID
        await c.close()
        try daemon.restart()
        let d = daemon.client()
        for id in acknowledged + [key, after] {
            #expect((try? await d.describeKey(keyID: id)) != nil, "acknowledged key \(id) is missing after the restart")
        }
        #expect(Array(try await d.decrypt(ciphertextBlob: blob).plaintext) == plaintext)
        #expect(Array(try await d.decrypt(ciphertextBlob: during).plaintext) == plaintext)
        #expect(!daemon.log.contains("keystore rollback detected"), "the keystore's integrity check failed after the full disk")
        await d.close()
    }
}
