import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// Multi-region keys (issue 11, items 2 to 5 and 7): an mrk- key made on "east" is replicated to
/// "west" through kmsctl (bundle on a pipe); ciphertexts made on either decrypt on the other;
/// each host applies its own policy; a rotation reaches the replica through sync-replica and
/// until then the replica says so; damaged, replayed, misaddressed and unpinned bundles are
/// refused and change nothing.
@Suite(.serialized)
struct MultiRegionTests {
    /// Two daemons of two regions that have pinned each other (`firstArguments`: more kmsd
    /// arguments for the first one).
    static func pair(_ a: String, _ b: String, firstArguments: [String] = []) async throws -> (Daemon, Daemon) {
        let first = try Daemon(arguments: ["--region", a] + firstArguments), second = try Daemon(arguments: ["--region", b])
        let ia = try await first.client().getReplicationIdentity().identity, ib = try await second.client().getReplicationIdentity().identity
        _ = try await first.client().pinReplicationIdentity(ib)
        _ = try await second.client().pinReplicationIdentity(ia)
        return (first, second)
    }

    /// `kmsctl replicate-key` (or sync-replica) on `from`, its output piped into `kmsctl import-replica` on `to`.
    static func ship(_ command: String, key: String, from: Daemon, to: Daemon, region: String) throws -> (bundle: Data, imported: [String: Any]) {
        let made = try run(Paths.kmsctl, [command, "--key-id", key, "--replica-region", region, "--socket", from.socket])
        try #require(made.status == 0, "\(command): \(made.stderr)")
        let taken = try run(Paths.kmsctl, ["import-replica", "--json", "--socket", to.socket], stdin: made.stdout)
        try #require(taken.status == 0, "import-replica: \(taken.stderr)")
        return (made.stdout, try #require(try JSONSerialization.jsonObject(with: taken.stdout) as? [String: Any]))
    }

    @Test func aKeyReplicatedToAnotherRegionDecryptsTheSameCiphertexts() async throws {
        let (east, west) = try await Self.pair("east", "west")
        defer { east.stop(); west.stop() }
        let e = east.client(), w = west.client()
        let meta = try await e.createKey(description: "orders", multiRegion: true)
        let key = meta.keyID
        #expect(key.hasPrefix("mrk-") && key.count == 36 && meta.multiRegion)
        #expect(meta.multiRegionConfiguration.multiRegionKeyType == "PRIMARY" && meta.multiRegionConfiguration.primaryKey.region == "east")
        let context = ["app": "orders"]
        let fromEast = try await e.encrypt(keyID: key, plaintext: Array("made in east".utf8), context: context).ciphertextBlob

        let (first, imported) = try Self.ship("replicate-key", key: key, from: east, to: west, region: "west")
        #expect(imported["ImportedVersions"] as? Int == 1)
        let replica = try await w.describeKey(keyID: key)
        #expect(replica.keyID == key && replica.description_p == "orders")
        #expect(replica.multiRegionConfiguration.multiRegionKeyType == "REPLICA" && replica.multiRegionConfiguration.primaryKey.region == "east")
        #expect(try await e.describeKey(keyID: key).multiRegionConfiguration.replicaKeys.map(\.region) == ["west"])

        // Interchangeable ciphertexts, with the same context (and not without it).
        #expect(Array(try await w.decrypt(ciphertextBlob: Array(fromEast), context: context).plaintext) == Array("made in east".utf8))
        let fromWest = try await w.encrypt(keyID: key, plaintext: Array("made in west".utf8), context: context).ciphertextBlob
        #expect(Array(try await e.decrypt(ciphertextBlob: Array(fromWest), context: context).plaintext) == Array("made in west".utf8))
        await expectKMSError(.invalidCiphertext) { _ = try await w.decrypt(ciphertextBlob: Array(fromEast)) }

        // A replica does not rotate; the primary does, and the replica says what is missing.
        await expectKMSError(.unsupportedOperation) { _ = try await w.rotateKeyOnDemand(keyID: key) }
        _ = try await e.rotateKeyOnDemand(keyID: key)
        let v2 = try await e.encrypt(keyID: key, plaintext: [2], context: context).ciphertextBlob
        do {
            _ = try await w.decrypt(ciphertextBlob: Array(v2), context: context)
            Issue.record("a version the replica does not have decrypted")
        } catch let error as KMSError {
            #expect(error.code == .invalidState && error.message.contains("sync-replica"), "\(error)")
        }
        let (_, synced) = try Self.ship("sync-replica", key: key, from: east, to: west, region: "west")
        #expect(synced["ImportedVersions"] as? Int == 1)
        #expect(Array(try await w.decrypt(ciphertextBlob: Array(v2), context: context).plaintext) == [2])
        #expect(try await w.describeKey(keyID: key).currentKeyVersion == 2)

        // The first bundle again, after a newer one: a replay, refused; nothing changes.
        let replay = try run(Paths.kmsctl, ["import-replica", "--socket", west.socket], stdin: first)
        #expect(replay.status == 1 && replay.stderr.contains("ValidationException") && replay.stderr.contains("replay"), "\(replay.stderr)")
        #expect(try await w.describeKey(keyID: key).currentKeyVersion == 2)

        // The primary moves to west: east is a replica at once, west the primary once it imports.
        let moved = try run(Paths.kmsctl, ["update-primary-region", "--key-id", key, "--primary-region", "west", "--socket", east.socket])
        try #require(moved.status == 0, "\(moved.stderr)")
        let demoted = try await e.describeKey(keyID: key).multiRegionConfiguration
        #expect(demoted.multiRegionKeyType == "REPLICA" && demoted.primaryKey.region == "west")
        await expectKMSError(.unsupportedOperation) { _ = try await e.rotateKeyOnDemand(keyID: key) }
        let promoted = try run(Paths.kmsctl, ["import-replica", "--socket", west.socket], stdin: moved.stdout)
        #expect(promoted.status == 0, "\(promoted.stderr)")
        let now = try await w.describeKey(keyID: key).multiRegionConfiguration
        #expect(now.multiRegionKeyType == "PRIMARY" && now.primaryKey.region == "west" && now.replicaKeys.map(\.region) == ["east"])
        // West rotates and sends the new version back to east.
        _ = try await w.rotateKeyOnDemand(keyID: key)
        let v3 = try await w.encrypt(keyID: key, plaintext: [3], context: context).ciphertextBlob
        let (_, back) = try Self.ship("sync-replica", key: key, from: west, to: east, region: "east")
        #expect(back["ImportedVersions"] as? Int == 1)
        #expect(Array(try await e.decrypt(ciphertextBlob: Array(v3), context: context).plaintext) == [3])
        #expect(Array(try await e.decrypt(ciphertextBlob: Array(fromEast), context: context).plaintext) == Array("made in east".utf8))
    }

    /// ReplicateKey's Description and Tags are the replica's (kmsctl create-key --multi-region,
    /// replicate-key --description --tags); afterwards the replica's description, tags and
    /// state are its own: a sync brings versions, not the primary's metadata, and a disabled
    /// replica stays disabled.
    @Test func aReplicaKeepsItsOwnDescriptionTagsAndStateThroughSyncs() async throws {
        let (east, west) = try await Self.pair("east", "west")
        defer { east.stop(); west.stop() }
        let created = try run(Paths.kmsctl, ["create-key", "--multi-region", "--description", "east's", "--tags", "TagKey=team,TagValue=east", "--json", "--socket", east.socket])
        try #require(created.status == 0, "\(created.stderr)")
        let meta = try #require((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["KeyMetadata"] as? [String: Any])
        let key = try #require(meta["KeyId"] as? String)
        #expect(key.hasPrefix("mrk-") && meta["MultiRegion"] as? Bool == true, "\(meta)")
        let made = try run(Paths.kmsctl, ["replicate-key", "--key-id", key, "--replica-region", "west", "--description", "west's copy",
                                          "--tags", "TagKey=team,TagValue=west", "TagKey=site,TagValue=dr", "--socket", east.socket])
        try #require(made.status == 0, "\(made.stderr)")
        let taken = try run(Paths.kmsctl, ["import-replica", "--socket", west.socket], stdin: made.stdout)
        try #require(taken.status == 0, "\(taken.stderr)")
        let w = west.client()
        #expect(try await w.describeKey(keyID: key).description_p == "west's copy")
        func tags(_ c: KMSClient) async throws -> [String: String] {
            Dictionary(uniqueKeysWithValues: try await c.listResourceTags(keyID: key).tags.map { ($0.tagKey, $0.tagValue) })
        }
        #expect(try await tags(w) == ["team": "west", "site": "dr"])
        #expect(try await tags(east.client()) == ["team": "east"], "the primary's own tags are unchanged")

        // West changes its copy; east rotates and syncs: west gets the version, keeps the rest.
        try await w.tagResource(keyID: key, tags: [(key: "owner", value: "ops")])
        try await w.updateKeyDescription(keyID: key, description: "west, edited")
        try await w.disableKey(keyID: key)
        _ = try await east.client().rotateKeyOnDemand(keyID: key)
        try await east.client().updateKeyDescription(keyID: key, description: "east, edited")
        let (_, synced) = try Self.ship("sync-replica", key: key, from: east, to: west, region: "west")
        #expect(synced["ImportedVersions"] as? Int == 1)
        let replica = try await w.describeKey(keyID: key)
        #expect(replica.currentKeyVersion == 2 && replica.keyState == "Disabled" && replica.description_p == "west, edited", "\(replica)")
        #expect(try await tags(w) == ["team": "west", "site": "dr", "owner": "ops"])
        await expectKMSError(.disabled) { _ = try await w.encrypt(keyID: key, plaintext: [1]) }
    }

    @Test(.enabled(if: isRoot, "needs root to act as other uids with setpriv"))
    func eachRegionAppliesItsOwnPolicy() async throws {
        let (east, west) = try await Self.pair("east", "west")
        defer { east.stop(); west.stop() }
        // One policy on both copies: uid 64104 may decrypt only in east (kms:Region), 64105 in
        // east and west; the replica made without --policy has the default policy instead.
        let eastOnly = #"{"Sid": "EastOnly", "Effect": "Allow", "Principal": {"Uid": "64104"}, "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:Region": "east"}}}"#
        let both = #"{"Sid": "Both", "Effect": "Allow", "Principal": {"Uid": "64105"}, "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:Region": ["east", "west"]}, "Bool": {"kms:MultiRegion": "true"}}}"#
        let policy = keyPolicy(eastOnly, both)
        let key = try await east.client().createKey(policy: policy, multiRegion: true).keyID
        let blob = try await east.client().encrypt(keyID: key, plaintext: [7]).ciphertextBlob
        let dir = try Paths.tempDir("mrk-policy")
        FileManager.default.createFile(atPath: dir + "/policy.json", contents: Data(policy.utf8))
        let made = try run(Paths.kmsctl, ["replicate-key", "--key-id", key, "--replica-region", "west", "--policy", "file://" + dir + "/policy.json", "--socket", east.socket])
        try #require(made.status == 0, "\(made.stderr)")
        let taken = try run(Paths.kmsctl, ["import-replica", "--socket", west.socket], stdin: made.stdout)
        try #require(taken.status == 0, "\(taken.stderr)")
        #expect(try await west.client().getKeyPolicy(keyID: key) == policy)
        func decrypt(_ uid: UInt32, on d: Daemon) throws -> ProcessResult {
            try runAs(uid: uid, [Paths.kmsctl, "decrypt", "--socket", d.socket], stdin: blob)
        }
        let aEast = try decrypt(64104, on: east), aWest = try decrypt(64104, on: west)
        #expect(aEast.status == 0 && aEast.stdout == Data([7]), "\(aEast.stderr)")
        #expect(aWest.status == 1 && aWest.stderr.contains("AccessDeniedException"), "\(aWest.stderr)")
        let bEast = try decrypt(64105, on: east), bWest = try decrypt(64105, on: west)
        #expect(bEast.status == 0 && bWest.status == 0 && bWest.stdout == Data([7]), "\(bEast.stderr) \(bWest.stderr)")
        // Replicated without --policy, the copy in a third region has the default policy: neither user.
        let north = try Daemon(arguments: ["--region", "north"])
        defer { north.stop() }
        _ = try await north.client().pinReplicationIdentity(try await east.client().getReplicationIdentity().identity)
        _ = try await east.client().pinReplicationIdentity(try await north.client().getReplicationIdentity().identity)
        _ = try Self.ship("replicate-key", key: key, from: east, to: north, region: "north")
        #expect(try decrypt(64105, on: north).stderr.contains("AccessDeniedException"))
    }

    /// As AWS: a primary is not deleted while it has replicas. Each replica's deletion hands
    /// back a signed notice; once the primary has taken them, it can be deleted, and is when its
    /// window ends (a "day" is one second on east here, --dev-day-seconds 1; west's are real).
    @Test func aPrimaryWithReplicasIsDeletedOnlyAfterThem() async throws {
        let (east, west) = try await Self.pair("east", "west", firstArguments: ["--dev-day-seconds", "1"])
        defer { east.stop(); west.stop() }
        let key = try await east.client().createKey(multiRegion: true).keyID
        let blob = Array(try await east.client().encrypt(keyID: key, plaintext: [5]).ciphertextBlob)
        _ = try Self.ship("replicate-key", key: key, from: east, to: west, region: "west")
        let refused = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--socket", east.socket])
        #expect(refused.status == 1 && refused.stderr.contains("KMSInvalidStateException") && refused.stderr.contains("west"), "\(refused.stderr)")
        #expect(refused.stderr.hasPrefix("kmsctl: KMSInvalidStateException: key \(key) is the primary of replicas in west:"), "\(refused.stderr)")
        #expect(try await east.client().describeKey(keyID: key).keyState == "Enabled")
        let untouched = try await east.client().describeKey(keyID: key)
        #expect(untouched.deletionDate == 0 && untouched.multiRegionConfiguration.replicaKeys.map(\.region) == ["west"], "\(untouched)")
        let westBefore = Int(Date().timeIntervalSince1970)
        let scheduled = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--json", "--socket", west.socket])
        let westAfter = Int(Date().timeIntervalSince1970)
        try #require(scheduled.status == 0, "\(scheduled.stderr)")
        let answer = try #require(try JSONSerialization.jsonObject(with: scheduled.stdout) as? [String: Any])
        // The replica itself is scheduled, in seven real days.
        #expect(answer["KeyId"] as? String == key && answer["KeyState"] as? String == "PendingDeletion" && answer["PendingWindowInDays"] as? Int == 7, "\(answer)")
        #expect((westBefore + 7 * 86_400...westAfter + 7 * 86_400 + 1).contains(answer["DeletionDate"] as? Int ?? 0), "\(answer)")
        #expect(try await west.client().describeKey(keyID: key).keyState == "PendingDeletion")
        let notice = try #require(answer["ReplicaDeletionNotice"] as? String)
        #expect(Data(base64Encoded: notice)?.isEmpty == false, "the notice is base64: \(notice)")
        // The replica's deletion alone does not free the primary: until east takes the notice, it
        // still refuses, and still lists west.
        let early = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--socket", east.socket])
        #expect(early.status == 1 && early.stderr.hasPrefix("kmsctl: KMSInvalidStateException: key \(key) is the primary of replicas in west:"), "\(early.stderr)")
        #expect(try await east.client().describeKey(keyID: key).keyState == "Enabled")
        // A notice older than the primary's latest bundle for that region is stale: west cancels,
        // east syncs it again, and the first notice no longer counts.
        _ = try await west.client().cancelKeyDeletion(keyID: key)
        _ = try await west.client().enableKey(keyID: key)
        #expect(try await west.client().describeKey(keyID: key).keyState == "Enabled")
        let (_, resynced) = try Self.ship("sync-replica", key: key, from: east, to: west, region: "west")
        #expect(resynced["ImportedVersions"] as? Int == 0, "no version was missing: \(resynced)")
        let stale = try run(Paths.kmsctl, ["import-replica", "--replication-bundle", notice, "--socket", east.socket])
        #expect(stale.status == 1 && stale.stderr.contains("stale"), "\(stale.stderr)")
        #expect(stale.stderr.hasPrefix("kmsctl: ValidationException: the replica deletion notice was refused:") && stale.stderr.contains("a stale notice"), "\(stale.stderr)")
        #expect(try await east.client().describeKey(keyID: key).multiRegionConfiguration.replicaKeys.map(\.region) == ["west"])
        #expect(try await east.client().describeKey(keyID: key).keyState == "Enabled")
        let second = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--json", "--socket", west.socket])
        try #require(second.status == 0, "\(second.stderr)")
        let fresh = try #require((try JSONSerialization.jsonObject(with: second.stdout) as? [String: Any])?["ReplicaDeletionNotice"] as? String)
        // The notice is signed: altered, it is refused; as made, the primary forgets west.
        var bad = try #require(Data(base64Encoded: fresh))
        bad[bad.count / 2] ^= 1
        let altered = try run(Paths.kmsctl, ["import-replica", "--replication-bundle", bad.base64EncodedString(), "--socket", east.socket])
        #expect(altered.status == 1 && altered.stderr.contains("ValidationException"), "\(altered.stderr)")
        #expect(altered.stderr.hasPrefix("kmsctl: ValidationException: the replication bundle was refused: "), "\(altered.stderr)")
        #expect(try await east.client().describeKey(keyID: key).multiRegionConfiguration.replicaKeys.map(\.region) == ["west"], "an altered notice changed nothing")
        let taken = try run(Paths.kmsctl, ["import-replica", "--replication-bundle", fresh, "--socket", east.socket])
        #expect(taken.status == 0, "\(taken.stderr)")
        #expect(try await east.client().describeKey(keyID: key).multiRegionConfiguration.replicaKeys.isEmpty)
        // Taking the notice forgets west and nothing else: the primary is still Enabled and usable.
        #expect(try await east.client().describeKey(keyID: key).keyState == "Enabled")
        #expect(Array(try await east.client().decrypt(ciphertextBlob: blob).plaintext) == [5])
        let eastBefore = Int64(Date().timeIntervalSince1970)
        let now = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--json", "--socket", east.socket])
        let eastAfter = Int64(Date().timeIntervalSince1970)
        #expect(now.status == 0, "\(now.stderr)")
        #expect(try await east.client().describeKey(keyID: key).keyState == "PendingDeletion")
        let deletion = try #require(try JSONSerialization.jsonObject(with: now.stdout) as? [String: Any])
        let deletionDate = Int64(deletion["DeletionDate"] as? Int ?? 0)
        #expect(deletion["KeyState"] as? String == "PendingDeletion" && deletion["PendingWindowInDays"] as? Int == 7, "\(deletion)")
        #expect((eastBefore + 7...eastAfter + 8).contains(deletionDate), "seven one-second days: \(deletionDate - eastBefore)")
        #expect(deletion["ReplicaDeletionNotice"] == nil, "a primary sends no notice: \(deletion)")
        let pending = try await east.client().describeKey(keyID: key)
        #expect(pending.deletionDate == deletionDate && pending.pendingDeletionWindowInDays == 7 && !pending.enabled, "\(pending)")
        // When the window ends, east really deletes the primary.
        var gone: KMSError?
        for _ in 0..<40 where gone == nil {
            try await Task.sleep(nanoseconds: 500_000_000)
            do { _ = try await east.client().describeKey(keyID: key) } catch let e as KMSError where e.code == .notFound { gone = e }
        }
        #expect(gone?.message.contains("was deleted") == true, "the primary was still there 20 s after its 7 s window began: \(String(describing: gone))")
        await expectKMSError(.notFound) { try await east.client().decrypt(ciphertextBlob: blob) }
        #expect(!(try await east.client().listKeys(limit: 1000).keys.map(\.keyID).contains(key)))
    }

    /// A replica deletion notice that cannot be made does not fail ScheduleKeyDeletion (the key
    /// is scheduled by then), but is not hidden either: kmsd's log names the key and the error.
    /// Here west pinned east with its real signing key (so it takes east's bundles) but an
    /// all-zero agreement key, of low order: X25519 refuses it, so nothing can be made for east.
    @Test func aNoticeThatCannotBeMadeIsReportedNotHidden() async throws {
        let east = try Daemon(arguments: ["--region", "east"]), west = try Daemon(arguments: ["--region", "west"])
        defer { east.stop(); west.stop() }
        _ = try await east.client().pinReplicationIdentity(try await west.client().getReplicationIdentity().identity)
        var unusable = try await east.client().getReplicationIdentity().identity
        unusable.agreementPublicKey = Data(count: 32)
        unusable.fingerprint = ""
        _ = try await west.client().pinReplicationIdentity(unusable)
        let key = try await east.client().createKey(multiRegion: true).keyID
        _ = try Self.ship("replicate-key", key: key, from: east, to: west, region: "west")
        let scheduled = try run(Paths.kmsctl, ["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--json", "--socket", west.socket])
        try #require(scheduled.status == 0, "\(scheduled.stderr)")
        let answer = try #require(try JSONSerialization.jsonObject(with: scheduled.stdout) as? [String: Any])
        #expect(answer["ReplicaDeletionNotice"] == nil && answer["KeyState"] as? String == "PendingDeletion", "\(answer)")
        #expect(try await west.client().describeKey(keyID: key).keyState == "PendingDeletion")
        let warning = west.log.split(separator: "\n").first { $0.contains("WARNING") && $0.contains(key) }
        #expect(warning?.contains("replica deletion notice") == true && warning?.contains("KMSInternalException") == true, "\(west.log)")
    }

    /// Each refused bundle is refused with its own code and reason, and changes nothing on the
    /// host that refused it (its keys, their metadata, its aliases); the bundle from an unpinned
    /// host is taken once that host is pinned.
    @Test func damagedMisaddressedAndUnpinnedBundlesAreRefused() async throws {
        if isRoot { try Journal.ensureRunning() }  // the refusals' audit records are read below
        let (east, west) = try await Self.pair("east", "west")
        defer { east.stop(); west.stop() }
        let key = try await east.client().createKey(multiRegion: true).keyID
        try await east.client().createAlias(aliasName: "alias/orders", targetKeyID: key)
        let made = try run(Paths.kmsctl, ["replicate-key", "--key-id", key, "--replica-region", "west", "--socket", east.socket])
        try #require(made.status == 0, "\(made.stderr)")
        let good = [UInt8](made.stdout)
        // What a refused bundle must leave as it was: every key's metadata and every alias.
        func state(_ daemon: Daemon) async throws -> (keys: [Kmsd_V1_KeyMetadata], aliases: [Kmsd_V1_AliasListEntry]) {
            let client = daemon.client()
            let listed = try await client.listKeys(limit: 1000).keys
            var keys: [Kmsd_V1_KeyMetadata] = []
            for entry in listed { keys.append(try await client.describeKey(keyID: entry.keyID)) }
            let aliases = try await client.listAliases().aliases
            return (keys, aliases)
        }
        func refused(_ bytes: [UInt8], at daemon: Daemon, _ code: KMSErrorCode, _ reason: String, _ what: String) async throws {
            let before = try await state(daemon)
            let r = try run(Paths.kmsctl, ["import-replica", "--socket", daemon.socket], stdin: Data(bytes))
            #expect(r.status == 1 && r.stderr.hasPrefix("kmsctl: \(code.rawValue): ") && r.stderr.contains(reason), "\(what): \(r.stderr)")
            #expect(r.stdout.isEmpty, "\(what): \(r.text)")
            let after = try await state(daemon)
            #expect(after.keys == before.keys, "\(what) changed the keys: \(before.keys) -> \(after.keys)")
            #expect(after.aliases == before.aliases, "\(what) changed the aliases: \(before.aliases) -> \(after.aliases)")
        }
        var flipped = good
        flipped[good.count / 2] ^= 0x01
        try await refused(flipped, at: west, .validation, "the replication bundle was refused: ", "a bit flipped")
        // The signature is the envelope's last field: a flipped bit there decodes, unwraps and
        // is refused only by the signature check.
        var badSignature = good
        badSignature[good.count - 1] ^= 0x01
        try await refused(badSignature, at: west, .validation, "signature does not verify", "a bit flipped in the signature")
        try await refused(Array(good.prefix(good.count - 10)), at: west, .validation, "it is not a replication bundle", "truncated")
        try await refused(Array(repeating: 0x41, count: 50), at: west, .validation, "it is not a replication bundle", "not a bundle")
        try await refused(good, at: east, .validation, "addressed to region west", "sent back to its maker")
        #expect(try await east.client().describeKey(keyID: key).multiRegionConfiguration.multiRegionKeyType == "PRIMARY")
        // Another kmsd of region west (another host, or west reinstalled) that has pinned east:
        // the bundle is addressed to the west identity east pinned, not to it.
        let otherWest = try Daemon(arguments: ["--region", "west"])
        defer { otherWest.stop() }
        _ = try await otherWest.client().pinReplicationIdentity(try await east.client().getReplicationIdentity().identity)
        try await refused(good, at: otherWest, .validation, "addressed to region west with another identity, not to this kmsd", "for another kmsd of the same region")
        #expect(try await otherWest.client().listKeys().keys.isEmpty)
        // A third region that west has not pinned sends one: refused as not from a pinned identity.
        let south = try Daemon(arguments: ["--region", "south"])
        defer { south.stop() }
        _ = try await south.client().pinReplicationIdentity(try await west.client().getReplicationIdentity().identity)
        let southKey = try await south.client().createKey(multiRegion: true).keyID
        let fromSouth = try run(Paths.kmsctl, ["replicate-key", "--key-id", southKey, "--replica-region", "west", "--socket", south.socket])
        try #require(fromSouth.status == 0, "\(fromSouth.stderr)")
        try await refused([UInt8](fromSouth.stdout), at: west, .accessDenied, "from region south with an identity not pinned here", "from an unpinned identity")
        // Nothing was created on west; the good bundle still works.
        #expect(try await west.client().listKeys().keys.isEmpty)
        #expect(try await west.client().listAliases().aliases.isEmpty)
        let ok = try run(Paths.kmsctl, ["import-replica", "--socket", west.socket], stdin: Data(good))
        #expect(ok.status == 0, "\(ok.stderr)")
        let replica = try await west.client().describeKey(keyID: key)
        #expect(replica.multiRegionConfiguration.multiRegionKeyType == "REPLICA" && replica.multiRegionConfiguration.primaryKey.region == "east" && replica.currentKeyVersion == 1, "\(replica)")
        #expect(try await west.client().listKeys().keys.map(\.keyID) == [key])
        // Aliases are each host's own: east's does not travel with the key.
        #expect(try await west.client().listAliases().aliases.isEmpty)
        // --json carries the bundle as base64, which import-replica takes as --replication-bundle.
        let asJSON = try run(Paths.kmsctl, ["sync-replica", "--key-id", key, "--replica-region", "west", "--json", "--socket", east.socket])
        try #require(asJSON.status == 0, "\(asJSON.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: asJSON.stdout) as? [String: Any])
        #expect((object["KeyMetadata"] as? [String: Any])?["KeyId"] as? String == key)
        let viaText = try run(Paths.kmsctl, ["import-replica", "--replication-bundle", try #require(object["ReplicationBundle"] as? String), "--socket", west.socket])
        #expect(viaText.status == 0, "\(viaText.stderr)")
        // South's very bundle, refused above only because south was not pinned, is taken once it is.
        _ = try await west.client().pinReplicationIdentity(try await south.client().getReplicationIdentity().identity)
        let pinnedNow = try run(Paths.kmsctl, ["import-replica", "--json", "--socket", west.socket], stdin: fromSouth.stdout)
        #expect(pinnedNow.status == 0, "\(pinnedNow.stderr)")
        let pinnedAnswer = try #require(try JSONSerialization.jsonObject(with: pinnedNow.stdout) as? [String: Any])
        #expect(pinnedAnswer["ImportedVersions"] as? Int == 1, "\(pinnedAnswer)")
        let fromSouthReplica = try await west.client().describeKey(keyID: southKey).multiRegionConfiguration
        #expect(fromSouthReplica.multiRegionKeyType == "REPLICA" && fromSouthReplica.primaryKey.region == "south", "\(fromSouthReplica)")
        // Only multi-region primaries replicate.
        let plain = try await east.client().createKey().keyID
        await expectKMSError(.unsupportedOperation) { _ = try await east.client().replicateKey(keyID: plain, replicaRegion: "west") }
        await expectKMSError(.validation) { _ = try await east.client().replicateKey(keyID: key, replicaRegion: "nowhere") }

        // Every bundle west refused is audited with its error, and names no key (nothing in a
        // bundle that was not shown authentic and addressed here is recorded); those it took
        // name their key.
        if isRoot {
            let records = try Journal.query(["_PID=\(west.pid)", "KMS_ACTION=ImportReplica"], since: west.startedAt, atLeast: 8)
            let refusedRecords = records.filter { $0["KMS_RESULT"] as? String != "Allowed" }
            #expect(refusedRecords.count == 5, "\(records.map { $0["KMS_ERROR"] ?? "" })")
            #expect(refusedRecords.filter { $0["KMS_ERROR"] as? String == "ValidationException" }.count == 4)
            #expect(refusedRecords.contains { $0["KMS_ERROR"] as? String == "AccessDeniedException" && $0["KMS_RESULT"] as? String == "Denied" })
            #expect(refusedRecords.allSatisfy { ($0["KMS_KEY_ID"] as? String ?? "").isEmpty })
            let taken = records.filter { $0["KMS_RESULT"] as? String == "Allowed" }.compactMap { $0["KMS_KEY_ID"] as? String }
            #expect(taken == [key, key, southKey], "\(taken)")
        }
    }
}
