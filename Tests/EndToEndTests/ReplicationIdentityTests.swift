import Foundation
import Glibc
import KMSClient
import Testing

/// Regions and replication identities (issue 11, item 1): each kmsd has one, kept across
/// restarts; administrators pin each other's through kmsctl; a pin that does not match its
/// fingerprint, of the host's own region, or by a non-administrator is refused.
@Suite(.serialized)
struct ReplicationIdentityTests {
    static func identity(_ d: Daemon) throws -> [String: Any] {
        let r = try run(Paths.kmsctl, ["get-replication-identity", "--json", "--socket", d.socket])
        try #require(r.status == 0, "\(r.stderr)")
        return try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
    }

    @Test func twoHostsPinEachOtherAndTheirIdentitiesLast() throws {
        let east = try Daemon(arguments: ["--region", "east"])
        defer { east.stop() }
        let west = try Daemon(arguments: ["--region", "west"])
        defer { west.stop() }
        let e = try Self.identity(east), w = try Self.identity(west)
        #expect(e["Region"] as? String == "east" && w["Region"] as? String == "west")
        #expect((e["Fingerprint"] as? String)?.count == 32 && e["Fingerprint"] as? String != w["Fingerprint"] as? String)
        #expect(Data(base64Encoded: e["AgreementPublicKey"] as? String ?? "")?.count == 32)
        #expect(Data(base64Encoded: e["SigningPublicKey"] as? String ?? "")?.count == 32)
        #expect((e["Pinned"] as? [Any])?.isEmpty == true)

        // Pin each other from the other's --json output (a file, as after a copy).
        let dir = try Paths.tempDir("identity")
        let eastFile = dir + "/east.json", westFile = dir + "/west.json"
        try JSONSerialization.data(withJSONObject: e).write(to: URL(fileURLWithPath: eastFile))
        try JSONSerialization.data(withJSONObject: w).write(to: URL(fileURLWithPath: westFile))
        let pinWest = try run(Paths.kmsctl, ["pin-replication-identity", "--region", "west", "--identity", "file://" + westFile, "--json", "--socket", east.socket])
        #expect(pinWest.status == 0, "\(pinWest.stderr)")
        let pinEast = try run(Paths.kmsctl, ["pin-replication-identity", "--region", "east", "--identity", "file://" + eastFile, "--socket", west.socket])
        #expect(pinEast.status == 0, "\(pinEast.stderr)")

        // The identity and the pins survive a restart unchanged.
        try east.restart()
        let after = try Self.identity(east)
        #expect(after["Fingerprint"] as? String == e["Fingerprint"] as? String)
        #expect(after["SigningPublicKey"] as? String == e["SigningPublicKey"] as? String)
        let pinned = try #require(after["Pinned"] as? [[String: Any]])
        #expect(pinned.count == 1 && pinned.first?["Region"] as? String == "west" && pinned.first?["Fingerprint"] as? String == w["Fingerprint"] as? String)

        // Refused: a fingerprint that does not match, the wrong --region, the host's own region.
        var forged = w
        forged["SigningPublicKey"] = e["SigningPublicKey"]
        let forgedFile = dir + "/forged.json"
        try JSONSerialization.data(withJSONObject: forged).write(to: URL(fileURLWithPath: forgedFile))
        let bad = try run(Paths.kmsctl, ["pin-replication-identity", "--region", "west", "--identity", "file://" + forgedFile, "--socket", east.socket])
        #expect(bad.status == 1 && bad.stderr.contains("ValidationException") && bad.stderr.contains("fingerprint"), "\(bad.stderr)")
        let wrongRegion = try run(Paths.kmsctl, ["pin-replication-identity", "--region", "north", "--identity", "file://" + westFile, "--socket", east.socket])
        #expect(wrongRegion.status == 2 && wrongRegion.stderr.contains("not of --region north"), "\(wrongRegion.stderr)")
        let own = try run(Paths.kmsctl, ["pin-replication-identity", "--region", "east", "--identity", "file://" + eastFile, "--socket", east.socket])
        #expect(own.status == 1 && own.stderr.contains("own region"), "\(own.stderr)")
        // The pins are as they were.
        #expect((try Self.identity(east)["Pinned"] as? [[String: Any]])?.first?["Fingerprint"] as? String == w["Fingerprint"] as? String)
    }

    /// A user who is not an administrator neither sees this kmsd's identity nor pins another's:
    /// the pin they try leaves nothing pinned, so a bundle from that host is still refused; the
    /// same pin made by an administrator is listed and lets the very same bundle in.
    @Test(.enabled(if: isRoot, "needs root to act as another uid with setpriv"))
    func onlyAdministratorsSeeOrPinIdentities() async throws {
        let east = try Daemon(arguments: ["--region", "east"])
        defer { east.stop() }
        let other = try runAs(uid: 64103, [Paths.kmsctl, "get-replication-identity"], env: ["KMSD_SOCKET": east.socket])
        #expect(other.status == 1 && other.stderr.contains("AccessDeniedException"), "\(other.stderr)")
        #expect(other.stderr.hasPrefix("kmsctl: AccessDeniedException: ") && other.stderr.contains("see or pin replication identities"), "\(other.stderr)")
        #expect(other.stdout.isEmpty, "nothing of the identity is shown: \(other.text)")

        // West, which has pinned east, makes a bundle for east.
        let west = try Daemon(arguments: ["--region", "west"])
        defer { west.stop() }
        _ = try await west.client().pinReplicationIdentity(try await east.client().getReplicationIdentity().identity)
        let key = try await west.client().createKey(multiRegion: true).keyID
        let made = try run(Paths.kmsctl, ["replicate-key", "--key-id", key, "--replica-region", "east", "--socket", west.socket])
        try #require(made.status == 0, "\(made.stderr)")
        let w = try Self.identity(west)
        let westJSON = try JSONSerialization.data(withJSONObject: w)
        func importBundle() throws -> ProcessResult {
            try run(Paths.kmsctl, ["import-replica", "--json", "--socket", east.socket], stdin: made.stdout)
        }

        // Not an administrator: the pin is refused, and nothing is pinned.
        let pinArgs = ["pin-replication-identity", "--region", "west", "--identity", "-"]
        let denied = try runAs(uid: 64103, [Paths.kmsctl] + pinArgs, stdin: westJSON, env: ["KMSD_SOCKET": east.socket])
        #expect(denied.status == 1 && denied.stderr.hasPrefix("kmsctl: AccessDeniedException: ") && denied.stderr.contains("see or pin replication identities"), "\(denied.stderr)")
        #expect((try Self.identity(east)["Pinned"] as? [Any])?.isEmpty == true)
        let unpinned = try importBundle()
        #expect(unpinned.status == 1 && unpinned.stderr.hasPrefix("kmsctl: AccessDeniedException: ") && unpinned.stderr.contains("not pinned here"), "\(unpinned.stderr)")
        await expectKMSError(.notFound) { try await east.client().describeKey(keyID: key) }

        // An administrator (this user): the pin is made, listed, and takes effect.
        let pinned = try run(Paths.kmsctl, pinArgs + ["--json", "--socket", east.socket], stdin: westJSON)
        #expect(pinned.status == 0, "\(pinned.stderr)")
        let answer = try #require(try JSONSerialization.jsonObject(with: pinned.stdout) as? [String: Any])
        #expect(answer["Region"] as? String == "west" && answer["Fingerprint"] as? String == w["Fingerprint"] as? String && answer["Replaced"] as? Bool == false, "\(answer)")
        let listed = try #require(try Self.identity(east)["Pinned"] as? [[String: Any]])
        #expect(listed.count == 1 && listed.first?["Region"] as? String == "west" && listed.first?["Fingerprint"] as? String == w["Fingerprint"] as? String, "\(listed)")
        let taken = try importBundle()
        #expect(taken.status == 0, "\(taken.stderr)")
        let imported = try #require(try JSONSerialization.jsonObject(with: taken.stdout) as? [String: Any])
        #expect(imported["ImportedVersions"] as? Int == 1 && (imported["KeyMetadata"] as? [String: Any])?["KeyId"] as? String == key, "\(imported)")
        let replica = try await east.client().describeKey(keyID: key).multiRegionConfiguration
        #expect(replica.multiRegionKeyType == "REPLICA" && replica.primaryKey.region == "west", "\(replica)")
    }

    @Test func anInvalidRegionIsRefusedAtStart() throws {
        #expect(throws: DaemonError.self) { _ = try Daemon(arguments: ["--region", "East Coast"]) }
    }
}
