import Foundation
import KMSClient
import Testing

/// Rotation: new versions for new ciphertexts, every older version still decrypting, blobs
/// moved forward by ReEncrypt, old versions retired on request, and automatic rotation that
/// kmsd runs itself when it comes due (time moved forward through the development clock file).
@Suite(.serialized)
final class RotationTests {
    let daemon: Daemon
    let client: KMSClient
    let clockFile: String

    init() throws {
        let dir = try Paths.tempDir("rotation")
        clockFile = dir + "/clock"
        try "0".write(toFile: clockFile, atomically: true, encoding: .utf8)
        daemon = try Daemon(arguments: ["--dev-clock-file", clockFile])
        client = daemon.client()
    }

    deinit { daemon.stop() }

    /// The key version a blob names: header byte 2..., big-endian u32 after format, algorithm
    /// and the 16-byte key id (PROTOCOL.md §9.1).
    static func version(of blob: Data) -> UInt32 {
        let b = [UInt8](blob)
        return UInt32(b[18]) << 24 | UInt32(b[19]) << 16 | UInt32(b[20]) << 8 | UInt32(b[21])
    }

    @Test func onDemandRotationKeepsOldBlobsDecrypting() async throws {
        let key = try await client.createKey().keyID
        let v1 = try await client.encrypt(keyID: key, plaintext: [1], context: ["v": "1"]).ciphertextBlob
        #expect(Self.version(of: v1) == 1)
        let r = try await client.rotateKeyOnDemand(keyID: key)
        #expect(r.keyVersion == 2 && r.keyID == key)
        let v2 = try await client.encrypt(keyID: key, plaintext: [2], context: ["v": "2"]).ciphertextBlob
        #expect(Self.version(of: v2) == 2)
        #expect(Array(try await client.decrypt(ciphertextBlob: Array(v1), context: ["v": "1"]).plaintext) == [1])
        #expect(Array(try await client.decrypt(ciphertextBlob: Array(v2), context: ["v": "2"]).plaintext) == [2])
        #expect(try await client.describeKey(keyID: key).currentKeyVersion == 2)
        // ReEncrypt to the same key moves an old blob to the newest version.
        let moved = try await client.reEncrypt(ciphertextBlob: Array(v1), sourceContext: ["v": "1"], destinationKeyID: key,
                                               destinationContext: ["v": "1"])
        #expect(Self.version(of: moved.ciphertextBlob) == 2)
        let rotations = try await client.listKeyRotations(keyID: key)
        #expect(rotations.rotations.map(\.keyVersion) == [2] && rotations.rotations[0].rotationType == "ON_DEMAND")
        // Survives a restart (the versions are in the keystore, not just in memory).
        try daemon.restart()
        let fresh = daemon.client()
        #expect(Array(try await fresh.decrypt(ciphertextBlob: Array(v1), context: ["v": "1"]).plaintext) == [1])
        #expect(Self.version(of: try await fresh.encrypt(keyID: key, plaintext: [3]).ciphertextBlob) == 2)
    }

    @Test func retiredVersionsRefuseToDecryptNamingTheVersion() async throws {
        let key = try await client.createKey().keyID
        let old = Array(try await client.encrypt(keyID: key, plaintext: [1]).ciphertextBlob)
        _ = try await client.rotateKeyOnDemand(keyID: key)
        await expectKMSError(.validation) { try await self.client.setMinimumDecryptionVersion(keyID: key, version: 3) }
        try await client.setMinimumDecryptionVersion(keyID: key, version: 2)
        do {
            _ = try await client.decrypt(ciphertextBlob: old)
            Issue.record("a retired version decrypted")
        } catch let e as KMSError {
            #expect(e.code == .invalidState && e.message.contains("version 1"), "\(e)")
        }
        #expect(try await client.getKeyRotationStatus(keyID: key).minimumDecryptionVersion == 2)
        #expect(try await client.describeKey(keyID: key).minimumDecryptionVersion == 2)
        try await client.setMinimumDecryptionVersion(keyID: key, version: 1)
        #expect(Array(try await client.decrypt(ciphertextBlob: old).plaintext) == [1])
    }

    @Test func rotationRulesAsAWSHasThem() async throws {
        let key = try await client.createKey().keyID
        await expectKMSError(.validation) { try await self.client.enableKeyRotation(keyID: key, rotationPeriodInDays: 89) }
        await expectKMSError(.validation) { try await self.client.enableKeyRotation(keyID: key, rotationPeriodInDays: 2561) }
        try await client.disableKey(keyID: key)
        await expectKMSError(.disabled) { try await self.client.enableKeyRotation(keyID: key) }
        await expectKMSError(.disabled) { try await self.client.rotateKeyOnDemand(keyID: key) }
        try await client.enableKey(keyID: key)
        for _ in 0..<10 { _ = try await client.rotateKeyOnDemand(keyID: key) }
        await expectKMSError(.limitExceeded) { try await self.client.rotateKeyOnDemand(keyID: key) }
        let page = try await client.listKeyRotations(keyID: key, limit: 4)
        #expect(page.truncated && page.rotations.map(\.keyVersion) == [2, 3, 4, 5])
        let next = try await client.listKeyRotations(keyID: key, limit: 100, marker: page.nextMarker)
        #expect(!next.truncated && next.rotations.map(\.keyVersion) == Array(6...11))
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        await expectKMSError(.invalidState) { try await self.client.enableKeyRotation(keyID: key) }
    }

    /// kmsd rotates by itself when a rotation comes due: enable a 90-day rotation, move the
    /// clock 91 days on, and watch the new version appear within a few seconds.
    @Test func automaticRotationComesDue() async throws {
        let key = try await client.createKey().keyID
        let before = Array(try await client.encrypt(keyID: key, plaintext: [7]).ciphertextBlob)
        try await client.enableKeyRotation(keyID: key, rotationPeriodInDays: 90)
        let status = try await client.getKeyRotationStatus(keyID: key)
        let now = Int64(Date().timeIntervalSince1970)
        #expect(status.keyRotationEnabled && status.rotationPeriodInDays == 90)
        #expect(abs(status.nextRotationDate - (now + 90 * 86_400)) < 10)
        try String(91 * 86_400).write(toFile: clockFile, atomically: true, encoding: .utf8)
        defer { try? "0".write(toFile: clockFile, atomically: true, encoding: .utf8) }
        var rotated = false
        for _ in 0..<40 where !rotated {
            try await Task.sleep(nanoseconds: 250_000_000)
            rotated = try await client.describeKey(keyID: key).currentKeyVersion == 2
        }
        #expect(rotated, "kmsd did not rotate the key when its rotation came due")
        let after = try await client.getKeyRotationStatus(keyID: key)
        #expect(after.nextRotationDate == status.nextRotationDate + 90 * 86_400, "the next one a period later")
        #expect(try await client.listKeyRotations(keyID: key).rotations.first?.rotationType == "AUTOMATIC")
        #expect(Array(try await client.decrypt(ciphertextBlob: before).plaintext) == [7])
        #expect(Self.version(of: try await client.encrypt(keyID: key, plaintext: [8]).ciphertextBlob) == 2)
        #expect(daemon.log.contains("key \(key) rotated to version 2"))
    }

    /// Concurrent changes to one key never undo each other: every acknowledged rotation is
    /// counted in the key's version, whatever else changed the key at the same time.
    @Test func concurrentChangesToOneKeyAreNotLost() async throws {
        let key = try await client.createKey().keyID
        let socket = daemon.socket
        let rotations = try await withThrowingTaskGroup(of: Int.self) { group in
            for worker in 0..<6 {
                group.addTask {
                    let c = KMSClient(socketPath: socket)
                    var rotated = 0
                    for i in 0..<8 {
                        switch (worker + i) % 3 {
                        case 0: if (try? await c.rotateKeyOnDemand(keyID: key)) != nil { rotated += 1 }
                        case 1: try await c.updateKeyDescription(keyID: key, description: "w\(worker)-\(i)")
                        default: try? await c.disableKey(keyID: key); try await c.enableKey(keyID: key)
                        }
                    }
                    await c.close()
                    return rotated
                }
            }
            return try await group.reduce(0, +)
        }
        // Some attempts meet the key disabled by another worker; never more than 10 succeed.
        #expect((1...10).contains(rotations), "\(rotations) on-demand rotations")
        let m = try await client.describeKey(keyID: key)
        #expect(m.currentKeyVersion == UInt32(rotations + 1), "version \(m.currentKeyVersion) after \(rotations) rotations")
        #expect(try await client.listKeyRotations(keyID: key).rotations.count == rotations)
        // And the key still rotates automatically (no version left half-written).
        try await client.enableKeyRotation(keyID: key, rotationPeriodInDays: 90)
        #expect(try await client.getKeyRotationStatus(keyID: key).currentKeyVersion == UInt32(rotations + 1))
    }
}
