import Foundation
import Glibc
import KMSClient
import Testing

/// Every lifecycle change is one transaction: kmsd killed with SIGKILL at random moments while
/// it rotates keys, moves aliases, enables, disables and schedules or cancels deletions keeps
/// every change it acknowledged, decrypts every ciphertext made before the kill, and its
/// keystore passes its integrity check (every key and alias reads back).
@Suite(.serialized)
struct LifecycleDurabilityTests {
    /// What the test knows about one key: its state and version as acknowledged, and a blob.
    struct KeyModel {
        let id: String
        var state = "Enabled"
        var version: UInt32 = 1
        var blobs: [(blob: [UInt8], plaintext: [UInt8])] = []
    }

    enum Op {
        case rotate(Int), disable(Int), enable(Int), schedule(Int), cancel(Int), alias(String, Int), encrypt(Int)
    }

    static let kills = 200

    @Test func acknowledgedChangesSurviveSIGKILL() async throws {
        let dir = try Paths.tempDir("lifecycle-kill")
        var daemon: Daemon? = try Daemon(stateDir: dir)
        var keys: [KeyModel] = []
        for _ in 0..<4 {
            let c = daemon!.client()
            let id = try await c.createKey().keyID
            let p = Array("seed-\(id)".utf8)
            keys.append(KeyModel(id: id, blobs: [(Array(try await c.encrypt(keyID: id, plaintext: p).ciphertextBlob), p)]))
        }
        let aliasNames = ["alias/durable-a", "alias/durable-b"]
        var aliasTarget: [String: Int] = [:]
        var generator = SystemRandomNumberGenerator()
        var acknowledged = 0

        for round in 0..<Self.kills {
            let client = daemon!.client()
            // A random sequence of changes, sent one after another; SIGKILL lands somewhere in
            // it. Everything answered before the kill was acknowledged; the one in flight may
            // or may not have happened.
            let ops: [Op] = (0..<6).map { _ in
                let k = Int.random(in: 0..<keys.count, using: &generator)
                switch Int.random(in: 0..<7, using: &generator) {
                case 0: return .rotate(k)
                case 1: return .disable(k)
                case 2: return .enable(k)
                case 3: return .schedule(k)
                case 4: return .cancel(k)
                case 5: return .alias(aliasNames[Int.random(in: 0..<2, using: &generator)], k)
                default: return .encrypt(k)
                }
            }
            let pid = daemon!.pid
            let delay = UInt32.random(in: 0...25_000, using: &generator)
            let killed = DispatchSemaphore(value: 0)
            Thread { usleep(delay); kill(pid, SIGKILL); killed.signal() }.start()
            var inFlight: Op? = nil
            for op in ops {
                inFlight = op
                do {
                    switch op {
                    case .rotate(let k):
                        let r = try await client.rotateKeyOnDemand(keyID: keys[k].id)
                        keys[k].version = r.keyVersion
                    case .disable(let k):
                        try await client.disableKey(keyID: keys[k].id); keys[k].state = "Disabled"
                    case .enable(let k):
                        try await client.enableKey(keyID: keys[k].id); keys[k].state = "Enabled"
                    case .schedule(let k):
                        _ = try await client.scheduleKeyDeletion(keyID: keys[k].id, pendingWindowInDays: 30); keys[k].state = "PendingDeletion"
                    case .cancel(let k):
                        _ = try await client.cancelKeyDeletion(keyID: keys[k].id); keys[k].state = "Disabled"
                    case .alias(let name, let k):
                        if aliasTarget[name] == nil {
                            try await client.createAlias(aliasName: name, targetKeyID: keys[k].id)
                        } else {
                            try await client.updateAlias(aliasName: name, targetKeyID: keys[k].id)
                        }
                        aliasTarget[name] = k
                    case .encrypt(let k):
                        let p = Array("round-\(round)-\(k)".utf8)
                        keys[k].blobs.append((Array(try await client.encrypt(keyID: keys[k].id, plaintext: p).ciphertextBlob), p))
                    }
                    acknowledged += 1
                    inFlight = nil
                } catch let e as KMSError where [.disabled, .invalidState, .limitExceeded].contains(e.code) {
                    inFlight = nil  // refused by the rules: changed nothing
                } catch {
                    break  // the kill
                }
            }
            await client.close()
            killed.wait()  // every round ends in a SIGKILL, early or late
            daemon!.process.waitUntilExit()
            try daemon!.restart()

            // After the restart: what was acknowledged is there, whatever the in-flight op did.
            let check = daemon!.client()
            for (k, key) in keys.enumerated() {
                let m = try await check.describeKey(keyID: key.id)
                var states: Set<String> = [key.state]
                var versions: Set<UInt32> = [key.version]
                switch inFlight {
                case .rotate(k): versions.insert(key.version + 1)
                case .disable(k): states.insert("Disabled")
                case .enable(k): states.insert("Enabled")
                case .schedule(k): states.insert("PendingDeletion")
                case .cancel(k): states.insert("Disabled")
                default: break
                }
                #expect(states.contains(m.keyState), "round \(round): key \(k) is \(m.keyState), acknowledged \(key.state)")
                #expect(versions.contains(m.currentKeyVersion), "round \(round): key \(k) at version \(m.currentKeyVersion), acknowledged \(key.version)")
                // Bring the model up to what actually happened to the in-flight op.
                keys[k].state = m.keyState
                keys[k].version = m.currentKeyVersion
                // Every ciphertext made before the kill decrypts (to decrypt, enable for a moment).
                if m.keyState != "Enabled" {
                    if m.keyState == "PendingDeletion" { _ = try await check.cancelKeyDeletion(keyID: key.id) }
                    try await check.enableKey(keyID: key.id)
                    keys[k].state = "Enabled"
                }
                for b in key.blobs.suffix(3) {
                    #expect(Array(try await check.decrypt(ciphertextBlob: b.blob).plaintext) == b.plaintext, "round \(round): a blob of key \(k) no longer decrypts")
                }
            }
            for (name, k) in aliasTarget {
                let listed = try await check.listAliases().aliases.first { $0.aliasName == name }
                var targets: Set<String> = [keys[k].id]
                if case .alias(name, let other) = inFlight { targets.insert(keys[other].id) }
                #expect(listed.map { targets.contains($0.targetKeyID) } == true, "round \(round): alias \(name) lost its acknowledged target")
                if let listed, let actual = keys.firstIndex(where: { $0.id == listed.targetKeyID }) { aliasTarget[name] = actual }
            }
            if case .alias(let name, let k) = inFlight, aliasTarget[name] == nil,
               let listed = try await check.listAliases().aliases.first(where: { $0.aliasName == name }), listed.targetKeyID == keys[k].id {
                aliasTarget[name] = k
            }
            await check.close()
        }
        // The keystore passes its integrity check: every key lists and describes.
        let final = daemon!.client()
        let listed = try await final.listKeys(limit: 1000)
        #expect(Set(listed.keys.map(\.keyID)) == Set(keys.map(\.id)))
        #expect(acknowledged > Self.kills, "changes were acknowledged between kills (\(acknowledged))")
        daemon?.stop()
        daemon = nil
    }
}
