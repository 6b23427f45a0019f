import Foundation
import KMSClient
import Testing

/// Keys survive kill -9; an edited keystore is detected and refused.
@Suite(.serialized)
struct DurabilityTests {
    @Test func acknowledgedKeyAndCiphertextSurviveSIGKILL() async throws {
        let daemon = try Daemon()
        var pairs: [(String, [UInt8], Data)] = []
        for i in 0..<5 {
            let client = daemon.client()
            let key = try await client.createKey(description: "durable \(i)")
            let plaintext = Array("secret \(i)".utf8)
            let blob = try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: ["i": "\(i)"]).ciphertextBlob
            // Acknowledged: kill at once, no graceful shutdown.
            daemon.kill9()
            pairs.append((key.keyID, plaintext, blob))
            try daemon.restart()
            for (id, pt, b) in pairs {
                let dec = try await daemon.client().decrypt(ciphertextBlob: Array(b), context: ["i": "\(pairs.firstIndex { $0.0 == id }!)"])
                #expect(dec.keyID == id && Array(dec.plaintext) == pt)
            }
        }
        daemon.stop()
    }

    @Test func sigtermAnswersWhatWasReadThenStops() async throws {
        let daemon = try Daemon()
        let key = try await daemon.client().createKey().keyID
        let raw = try RawConnection(path: daemon.socket)
        var frames: [UInt8] = []
        for id in 1...300 {
            let request = KMSRequest.with(id: UInt64(id), .encrypt(.with { $0.keyID = key; $0.plaintext = Data([1, 2, 3]) }))
            frames += RawConnection.frame(try request.serializedBytes())
        }
        raw.send(frames)
        #expect(try raw.receive() != nil, "the daemon is working on the batch")
        kill(daemon.pid, SIGTERM)
        var ids = Set<UInt64>()
        while let r = try raw.receive() {
            #expect(r.kmsError == nil, "\(r)")
            #expect(ids.insert(r.id).inserted, "no answer twice")
        }
        daemon.process.waitUntilExit()
        #expect(daemon.process.terminationStatus == 0)
        #expect(daemon.log.contains("kmsd: stopped"))
        #expect(!daemon.log.contains("unanswered"), "every request read before SIGTERM was answered")
        #expect(!FileManager.default.fileExists(atPath: daemon.socket), "the socket file is removed")
    }

    @Test func aRecordEditedWithSQLiteIsRefused() async throws {
        let daemon = try Daemon()
        let client = daemon.client()
        let key = try await client.createKey(description: "original")
        let blob = try await client.encrypt(keyID: key.keyID, plaintext: [1, 2, 3]).ciphertextBlob
        daemon.stop()
        // Loosen the key by hand: hand it to another uid.
        let db = daemon.stateDir + "/keystore.sqlite3"
        let me = getuid(), newOwner = me == 1000 ? 1001 : 1000
        let edit = try run("/usr/bin/sqlite3", [db, "UPDATE keys SET record = replace(record, '\"ownerUID\":\(me)', '\"ownerUID\":\(newOwner)') WHERE key_id = '\(key.keyID)'; SELECT changes();"])
        #expect(edit.status == 0 && edit.text.trimmingCharacters(in: .whitespacesAndNewlines) == "1", "\(edit.stderr)")
        try daemon.restart()
        let after = daemon.client()
        await expectKMSError(.keyUnavailable) { try await after.describeKey(keyID: key.keyID) }
        await expectKMSError(.keyUnavailable) { try await after.decrypt(ciphertextBlob: Array(blob)) }
        do {
            _ = try await after.describeKey(keyID: key.keyID)
        } catch let e as KMSError {
            #expect(e.message.contains("integrity") && e.message.contains("modified outside kmsd"))
        }
        // Other keys are unaffected.
        let other = try await after.createKey()
        #expect(try await after.encrypt(keyID: other.keyID, plaintext: [1]).keyID == other.keyID)
        daemon.stop()
    }

    @Test func theDaemonRefusesToStartWithAnotherRootKey() async throws {
        let daemon = try Daemon()
        _ = try await daemon.client().createKey()
        daemon.stop()
        let rootKey = daemon.stateDir + "/root-key"
        try writeRandomKey(rootKey)
        #expect(throws: DaemonError.self) { try daemon.restart() }
        #expect(daemon.log.contains("root key does not match this keystore"))
    }

    @Test func dataKeysAreNotPersisted() async throws {
        // Data keys are returned in the clear once and stored nowhere. (That key material is
        // stored only wrapped is shown through the keystore API in KeyRepositoryTests.)
        let daemon = try Daemon()
        let client = daemon.client()
        let key = try await client.createKey()
        var dataKeys: [Data] = []
        for _ in 0..<20 { dataKeys.append(try await client.generateDataKey(keyID: key.keyID, keySpec: "AES_256").plaintext) }
        _ = try await client.createBackup()  // a snapshot in STATE_DIR/backups, searched too
        daemon.kill9()
        var all = Data()
        // Every file under the state directory (the backups directory too), sockets aside.
        let files = FileManager.default.enumerator(atPath: daemon.stateDir)?.compactMap { $0 as? String } ?? []
        for name in files where !name.hasSuffix(".sock") {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: daemon.stateDir + "/" + name, isDirectory: &isDirectory), !isDirectory.boolValue else { continue }
            all += try Data(contentsOf: URL(fileURLWithPath: daemon.stateDir + "/" + name))
        }
        #expect(all.count > 1000)
        for dk in dataKeys { #expect(all.range(of: dk.prefix(16)) == nil) }
    }
}
