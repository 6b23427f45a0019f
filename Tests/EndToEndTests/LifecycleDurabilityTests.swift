import Foundation
import Glibc
import KMSClient
import Testing

/// Every lifecycle change is one transaction: kmsd killed with SIGKILL at random moments while
/// it creates keys, rotates them, replaces their policies, moves aliases, enables, disables,
/// schedules or cancels deletions and really deletes keys (a "day" is a second here, so a 7-day window ends during the run) keeps
/// every change it acknowledged, decrypts every ciphertext made before the kill unless its
/// key's deletion was acknowledged, and its keystore passes its integrity check (every key
/// and alias reads back; deleted keys are gone for good).
@Suite(.serialized)
struct LifecycleDurabilityTests {
    /// What the test knows about one key: its state and version as acknowledged, and a blob.
    struct KeyModel {
        let id: String
        var state = "Enabled"
        var version: UInt32 = 1
        var blobs: [(blob: [UInt8], plaintext: [UInt8])] = []
        /// The key policy last acknowledged (nil: the default one).
        var policy: String? = nil
    }

    enum Op {
        case rotate(Int), disable(Int), enable(Int), schedule(Int), cancel(Int), alias(String, Int), encrypt(Int), destroy(Int)
        case create, policy(Int)
    }

    /// A key whose 7-day (7-second) deletion was acknowledged: it must be gone once the window
    /// has ended (allowing the sweep a few seconds), and then its blobs give NotFoundException.
    struct Doomed {
        let model: KeyModel
        let due: Date
        var gone = false
    }

    /// SIGKILLs in the run: 200 in `make test`; `make crash` sets KMSD_KILLS=500.
    static let kills = ProcessInfo.processInfo.environment["KMSD_KILLS"].flatMap(Int.init) ?? 200

    /// A policy that keeps the administrators (the test's caller among them) in charge, with a
    /// statement unique to the round and key.
    static func policy(round: Int, key: Int) -> String {
        keyPolicy(#"{"Sid": "Round\#(round)Key\#(key)", "Effect": "Allow", "Principal": {"Uid": "0"}, "Action": "kms:DescribeKey", "Resource": "*"}"#)
    }

    @Test func acknowledgedChangesSurviveSIGKILL() async throws {
        let dir = try Paths.tempDir("lifecycle-kill")
        var daemon: Daemon? = try Daemon(stateDir: dir, arguments: ["--dev-day-seconds", "1"])
        var keys: [KeyModel] = []
        for _ in 0..<4 {
            let c = daemon!.client()
            let id = try await c.createKey().keyID
            let p = Array("seed-\(id)".utf8)
            keys.append(KeyModel(id: id, blobs: [(Array(try await c.encrypt(keyID: id, plaintext: p).ciphertextBlob), p)]))
        }
        let aliasNames = ["alias/durable-a", "alias/durable-b"]
        var aliasTarget: [String: String] = [:]
        var generator = SystemRandomNumberGenerator()
        var acknowledged = 0
        var doomed: [Doomed] = []
        var deletions = 0
        /// Keys whose CreateKey was acknowledged (each must exist after every restart), and how
        /// many CreateKeys were cut off by a kill (those may or may not exist).
        var created: [String] = []
        var createsInFlight = 0

        for round in 0..<Self.kills {
            let client = daemon!.client()
            // A random sequence of changes, sent one after another; SIGKILL lands somewhere in
            // it. Everything answered before the kill was acknowledged; the one in flight may
            // or may not have happened.
            let ops: [Op] = (0..<6).map { _ in
                let k = Int.random(in: 0..<keys.count, using: &generator)
                switch Int.random(in: 0..<10, using: &generator) {
                case 7 where doomed.filter({ !$0.gone }).count < 4: return .destroy(k)
                case 8: return .create
                case 9: return .policy(k)
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
            var doomedNow: Set<Int> = []
            for op in ops {
                // A key whose deletion this round acknowledged takes no further part in it.
                switch op {
                case .rotate(let k), .disable(let k), .enable(let k), .schedule(let k), .cancel(let k), .alias(_, let k), .encrypt(let k),
                     .destroy(let k), .policy(let k):
                    if doomedNow.contains(k) { continue }
                case .create: break
                }
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
                        aliasTarget[name] = keys[k].id
                    case .destroy(let k):
                        _ = try await client.scheduleKeyDeletion(keyID: keys[k].id, pendingWindowInDays: 7)
                        doomed.append(Doomed(model: keys[k], due: Date().addingTimeInterval(7)))
                        doomedNow.insert(k)
                    case .encrypt(let k):
                        let p = Array("round-\(round)-\(k)".utf8)
                        keys[k].blobs.append((Array(try await client.encrypt(keyID: keys[k].id, plaintext: p).ciphertextBlob), p))
                    case .create:
                        created.append(try await client.createKey(description: "round \(round)").keyID)
                    case .policy(let k):
                        let text = Self.policy(round: round, key: k)
                        try await client.putKeyPolicy(keyID: keys[k].id, policy: text)
                        keys[k].policy = text
                    }
                    acknowledged += 1
                    inFlight = nil
                } catch let e as KMSError where [.disabled, .invalidState, .limitExceeded].contains(e.code) {
                    inFlight = nil  // refused by the rules: changed nothing
                } catch let e as KMSError {
                    Issue.record("round \(round): unexpected \(e.code.rawValue): \(e.message)")
                    break
                } catch {
                    break  // the kill (the connection dropped)
                }
            }
            await client.close()
            if case .create = inFlight { createsInFlight += 1 }
            killed.wait()  // every round ends in a SIGKILL, early or late
            daemon!.process.waitUntilExit()
            try daemon!.restart()

            // After the restart: what was acknowledged is there, whatever the in-flight op did.
            let check = daemon!.client()
            // An in-flight deletion that took effect dooms its key too (a 7-day window).
            if case .destroy(let k) = inFlight, !doomedNow.contains(k),
               let m = try? await check.describeKey(keyID: keys[k].id), m.keyState == "PendingDeletion", m.pendingDeletionWindowInDays == 7 {
                doomed.append(Doomed(model: keys[k], due: Date().addingTimeInterval(7)))
                doomedNow.insert(k)
            }
            // Doomed keys: pending deletion until their window ends, then gone, blobs and all.
            for i in doomed.indices where !doomed[i].gone {
                let d = doomed[i]
                do {
                    let m = try await check.describeKey(keyID: d.model.id)
                    #expect(m.keyState == "PendingDeletion", "round \(round): a key whose deletion was acknowledged is \(m.keyState)")
                    #expect(Date() < d.due.addingTimeInterval(6), "round \(round): key \(d.model.id) outlived its deletion window")
                } catch let e as KMSError where e.code == .notFound {
                    doomed[i].gone = true
                    deletions += 1
                    for b in d.model.blobs.suffix(2) {
                        await expectKMSError(.notFound) { try await check.decrypt(ciphertextBlob: b.blob) }
                    }
                }
            }
            // Doomed keys leave the working set; fresh keys take their places.
            for k in doomedNow.sorted() {
                let id = try await check.createKey().keyID
                let p = Array("seed-\(id)".utf8)
                keys[k] = KeyModel(id: id, blobs: [(Array(try await check.encrypt(keyID: id, plaintext: p).ciphertextBlob), p)])
            }
            for (k, key) in keys.enumerated() where !doomedNow.contains(k) {
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
                // The policy is the one last acknowledged, or the one in flight.
                if let acknowledgedPolicy = key.policy {
                    let stored = try await check.getKeyPolicy(keyID: key.id)
                    var policies: Set<String> = [acknowledgedPolicy]
                    if case .policy(k) = inFlight { policies.insert(Self.policy(round: round, key: k)) }
                    #expect(policies.contains(stored), "round \(round): key \(k) lost its acknowledged policy")
                    keys[k].policy = stored
                } else if case .policy(k) = inFlight, let stored = try? await check.getKeyPolicy(keyID: key.id),
                          stored == Self.policy(round: round, key: k) {
                    keys[k].policy = stored
                }
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
            let gone = Set(doomed.filter(\.gone).map(\.model.id))
            for (name, target) in aliasTarget {
                let listed = try await check.listAliases().aliases.first { $0.aliasName == name }
                // Deleting a key deletes its aliases.
                if listed == nil, gone.contains(target) { aliasTarget[name] = nil; continue }
                var targets: Set<String> = [target]
                if case .alias(name, let other) = inFlight { targets.insert(keys[other].id) }
                #expect(listed.map { targets.contains($0.targetKeyID) } == true, "round \(round): alias \(name) lost its acknowledged target")
                if let listed { aliasTarget[name] = listed.targetKeyID }
            }
            // Every acknowledged CreateKey made a key that is there.
            for id in created.suffix(20) {
                #expect((try? await check.describeKey(keyID: id)) != nil, "round \(round): acknowledged key \(id) is missing")
            }
            if case .alias(let name, _) = inFlight, aliasTarget[name] == nil,
               let listed = try await check.listAliases().aliases.first(where: { $0.aliasName == name }) {
                aliasTarget[name] = listed.targetKeyID
            }
            await check.close()
        }
        // The keystore passes its integrity check: every key lists and describes; every key
        // whose deletion was acknowledged is gone once its window ended.
        let final = daemon!.client()
        try await Task.sleep(for: .seconds(max(0, (doomed.map(\.due).max() ?? Date()).timeIntervalSinceNow + 3)))
        var listedIDs: Set<String> = []
        var marker = ""
        repeat {
            let page = try await final.listKeys(limit: 1000, marker: marker)
            listedIDs.formUnion(page.keys.map(\.keyID))
            marker = page.truncated ? page.nextMarker : ""
        } while !marker.isEmpty
        let expected = Set(keys.map(\.id)).union(created)
        #expect(expected.isSubset(of: listedIDs), "\(expected.subtracting(listedIDs).count) acknowledged keys are missing")
        #expect(listedIDs.count <= expected.count + createsInFlight, "keys nobody created: \(listedIDs.count) listed, \(expected.count) acknowledged, \(createsInFlight) CreateKeys cut off")
        for d in doomed { await expectKMSError(.notFound) { try await final.describeKey(keyID: d.model.id) } }
        #expect(acknowledged > Self.kills, "changes were acknowledged between kills (\(acknowledged))")
        #expect(deletions >= 5, "keys were really deleted during the run (\(deletions))")
        print("lifecycle kill loop: \(Self.kills) SIGKILLs, \(acknowledged) acknowledged changes (\(created.count) keys created), \(deletions) keys deleted by kmsd")
        daemon?.stop()
        daemon = nil
    }
}
