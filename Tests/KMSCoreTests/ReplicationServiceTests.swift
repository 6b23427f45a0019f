import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// Multi-region keys between two key services of their own keystores, east and west, each
/// with the other's identity pinned (issue 11): a replica deletion notice is judged by the
/// primary's clock alone, and ReplicateKey, UpdatePrimaryRegion and a notice taken change the
/// key as stored when they run, their undo reverting only a key nothing changed since.
struct ReplicationServiceTests {
    let admin = Principal(uid: 0, gid: 0, pid: 1, userName: "root")

    struct Host {
        let service: KeyService
        let identity: ReplicationIdentity
    }

    /// A key service of `region` on a fresh keystore, its clock `clockOffset` seconds off.
    static func host(_ region: String, clockOffset: TimeInterval = 0) throws -> Host {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("kmsd-core-\(region)-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let repository = try KeyRepository(storage: SQLiteKeyStorage(path: dir + "/keystore.sqlite3"), root: RootKey(material: SecureBytes.random(count: 32)))
        let service = KeyService(repository: repository, administrators: Administrators(uids: [0]),
                                 clock: { Date().addingTimeInterval(clockOffset) }, region: region)
        let identity = try ReplicationIdentity(region: region, agreementKey: X25519.generate().privateKey, signingKey: Ed25519.generate().privateKey)
        return Host(service: service, identity: identity)
    }

    /// East and west, each with the other's identity pinned.
    static func pair(westClockOffset: TimeInterval = 0) throws -> (east: Host, west: Host) {
        let east = try host("east"), west = try host("west", clockOffset: westClockOffset)
        try east.service.repository.pin(west.identity.peer)
        try west.service.repository.pin(east.identity.peer)
        return (east, west)
    }

    func multiRegionKey(on host: Host) throws -> KeyID {
        var input = KeyService.CreateKeyInput()
        input.multiRegion = true
        return try host.service.createKey(input, caller: admin).keyID
    }

    static var toWest: KeyService.ReplicateInput {
        var input = KeyService.ReplicateInput()
        input.replicaRegion = "west"
        return input
    }

    /// ReplicateKey (or a sync) on east, its bundle taken by west.
    func ship(_ id: KeyID, from east: Host, to west: Host) throws {
        let (bundle, _) = try east.service.replicate(id, Self.toWest, identity: east.identity, caller: admin)
        _ = try west.service.importReplica(bundle, identity: west.identity, caller: admin)
    }

    /// West schedules its replica's deletion: the notice it hands back for east.
    func scheduleDeletion(_ id: KeyID, on west: Host) throws -> [UInt8] {
        let change = try west.service.scheduleKeyDeletion(id.description, windowDays: 7, caller: admin)
        return try #require(try west.service.replicaDeletionNotice(change.after, identity: west.identity))
    }

    /// The notice carries the newest bundle the replica took (a value of the primary's clock),
    /// not the replica's own clock, which the primary's sequences were once compared with: with
    /// west's clock an hour ahead, its notice made before a sync looked newer than the sync and
    /// was taken; an hour behind, its notice made after the sync looked older and was refused.
    /// Now, either way, the first is stale and the second is taken.
    @Test(arguments: [3600.0, -3600.0])
    func aDeletionNoticeIsJudgedByThePrimarysClockAlone(westClockOffset: TimeInterval) throws {
        let (east, west) = try Self.pair(westClockOffset: westClockOffset)
        let id = try multiRegionKey(on: east)
        try ship(id, from: east, to: west)
        let early = try scheduleDeletion(id, on: west)
        _ = try west.service.cancelKeyDeletion(id.description, caller: admin)
        try ship(id, from: east, to: west)
        do throws(KMSError) {
            _ = try east.service.importReplica(early, identity: east.identity, caller: admin)
            Issue.record("a notice made before the replica was synced again was taken")
        } catch {
            #expect(error.code == .validation && error.message.contains("stale"), "\(error.message)")
        }
        #expect(try east.service.repository.record(id)?.replicaRegions == ["west"])
        let fresh = try scheduleDeletion(id, on: west)
        let (primary, added, _, forgotten) = try east.service.importReplica(fresh, identity: east.identity, caller: admin)
        #expect(primary.replicaRegions == [] && added == 0 && forgotten?.before.replicaRegions == ["west"])
        #expect(try east.service.repository.record(id)?.replicaRegions == [])
    }

    /// ReplicateKey and UpdatePrimaryRegion change the key as stored when they run (under its
    /// lock), not the record the access decision read: a TagResource, DisableKey or
    /// UntagResource that came in between is kept, not overwritten with the older record.
    @Test func replicationKeepsChangesMadeAfterTheAccessDecision() throws {
        let (east, _) = try Self.pair()
        let id = try multiRegionKey(on: east)
        let tag = Tag(key: "team", value: "orders")
        let decided = try #require(try east.service.repository.record(id))
        _ = try east.service.tagResource(id.description, tags: [tag], caller: admin)
        _ = try east.service.disableKey(id.description, caller: admin)
        let (_, replicated) = try east.service.replicate(decided.keyID, Self.toWest, identity: east.identity, caller: admin)
        let stored = try #require(try east.service.repository.record(id))
        #expect(stored.tags == [tag] && stored.state == .disabled && stored.replicaRegions == ["west"])
        #expect(replicated.after == stored && replicated.before.tags == [tag])

        _ = try east.service.untagResource(id.description, tagKeys: ["team"], caller: admin)
        let (_, moved) = try east.service.updatePrimaryRegion(stored.keyID, to: "west", identity: east.identity, caller: admin)
        let demoted = try #require(try east.service.repository.record(id))
        #expect(demoted.multiRegionKeyType == "REPLICA" && demoted.primaryRegion == "west")
        #expect(demoted.tags.isEmpty && demoted.state == .disabled && moved.after == demoted)
    }

    /// What the handlers undo when the audit record is refused (`restore(_:ifCurrentIs:)` on the
    /// returned change): the key as it was, unless another change came since, which stays.
    /// A replica deletion notice taken is undone the same way: the primary lists the region again.
    @Test func anUndoRevertsOnlyAKeyNothingChangedSince() throws {
        let (east, west) = try Self.pair()
        let id = try multiRegionKey(on: east)
        let tag = Tag(key: "team", value: "orders")
        let (bundle, first) = try east.service.replicate(id, Self.toWest, identity: east.identity, caller: admin)
        _ = try east.service.tagResource(id.description, tags: [tag], caller: admin)
        try east.service.restore(first.before, ifCurrentIs: first.after)
        let tagged = try #require(try east.service.repository.record(id))
        #expect(tagged.tags == [tag] && tagged.replicaRegions == ["west"])

        let (_, second) = try east.service.replicate(id, Self.toWest, identity: east.identity, caller: admin)
        #expect(second.before == tagged && second.after != tagged)
        try east.service.restore(second.before, ifCurrentIs: second.after)
        #expect(try east.service.repository.record(id) == tagged)

        _ = try west.service.importReplica(bundle, identity: west.identity, caller: admin)
        let notice = try scheduleDeletion(id, on: west)
        let forgotten = try #require(try east.service.importReplica(notice, identity: east.identity, caller: admin).forgotten)
        #expect(forgotten.before == tagged && forgotten.after.replicaRegions == [])
        try east.service.restore(forgotten.before, ifCurrentIs: forgotten.after)
        #expect(try east.service.repository.record(id) == tagged)
    }

    /// An UpdatePrimaryRegion bundle is taken once: after the primary moved on, the old bundle
    /// replayed to the host it once promoted (same sequence as the newest that host had taken)
    /// made it primary again, two primaries of one key. Now it is refused and nothing changes.
    @Test func anOldPrimaryMoveReplayedMakesNoSecondPrimary() throws {
        let (east, west) = try Self.pair()
        let id = try multiRegionKey(on: east)
        try ship(id, from: east, to: west)
        let (toWest, _) = try east.service.updatePrimaryRegion(id, to: "west", identity: east.identity, caller: admin)
        _ = try west.service.importReplica(toWest, identity: west.identity, caller: admin)
        #expect(try west.service.repository.record(id)?.multiRegionKeyType == "PRIMARY")
        let (toEast, _) = try west.service.updatePrimaryRegion(id, to: "east", identity: west.identity, caller: admin)
        _ = try east.service.importReplica(toEast, identity: east.identity, caller: admin)
        #expect(try east.service.repository.record(id)?.multiRegionKeyType == "PRIMARY")
        let before = try #require(try west.service.repository.record(id))
        #expect(before.multiRegionKeyType == "REPLICA" && before.primaryRegion == "east")
        do throws(KMSError) {
            _ = try west.service.importReplica(toWest, identity: west.identity, caller: admin)
            Issue.record("an old UpdatePrimaryRegion bundle replayed was taken")
        } catch {
            #expect(error.code == .validation && error.message.contains("replay"), "\(error.message)")
        }
        #expect(try west.service.repository.record(id) == before)
        // The newest bundle again, to the host it promoted (now the primary): refused as well.
        do throws(KMSError) {
            _ = try east.service.importReplica(toEast, identity: east.identity, caller: admin)
            Issue.record("an UpdatePrimaryRegion bundle was taken twice")
        } catch {
            #expect(error.code == .alreadyExists, "\(error.message)")
        }
        #expect(try east.service.repository.record(id)?.multiRegionKeyType == "PRIMARY")
    }
}
