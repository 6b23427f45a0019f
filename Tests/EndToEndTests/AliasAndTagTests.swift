import Foundation
import KMSClient
import Testing

/// Aliases name keys wherever AWS KMS takes an alias; tags are added, replaced, removed and
/// listed within AWS's limits.
@Suite(.serialized)
final class AliasAndTagTests {
    let daemon: Daemon
    let client: KMSClient

    init() throws {
        daemon = try Daemon(arguments: ["--dev-day-seconds", "1"])
        client = daemon.client()
    }

    deinit { daemon.stop() }

    static func unique(_ stem: String) -> String { "alias/\(stem)-\(UUID().uuidString.prefix(8).lowercased())" }

    @Test func anAliasNamesItsKeyWhereverAKeyIsUsed() async throws {
        let key = try await client.createKey().keyID
        let other = try await client.createKey().keyID
        let alias = Self.unique("orders")
        try await client.createAlias(aliasName: alias, targetKeyID: key)
        let arn = "kmsd:" + alias
        for name in [alias, arn] {
            let e = try await client.encrypt(keyID: name, plaintext: [1, 2, 3], context: ["a": "b"])
            #expect(e.keyID == key)
            let d = try await client.decrypt(ciphertextBlob: Array(e.ciphertextBlob), context: ["a": "b"], keyID: name)
            #expect(Array(d.plaintext) == [1, 2, 3])
            #expect(try await client.generateDataKey(keyID: name, keySpec: "AES_256").keyID == key)
            #expect(try await client.describeKey(keyID: name).keyID == key)
        }
        let blob = Array(try await client.encrypt(keyID: alias, plaintext: [4]).ciphertextBlob)
        // Pointed elsewhere, the alias now encrypts under the other key; old blobs still decrypt,
        // and naming the alias as the blob's key is now the wrong key.
        try await client.updateAlias(aliasName: alias, targetKeyID: other)
        #expect(try await client.encrypt(keyID: alias, plaintext: [5]).keyID == other)
        #expect(Array(try await client.decrypt(ciphertextBlob: blob).plaintext) == [4])
        await expectKMSError(.incorrectKey) { try await self.client.decrypt(ciphertextBlob: blob, keyID: alias) }
        let reEncrypted = try await client.reEncrypt(ciphertextBlob: blob, destinationKeyID: alias)
        #expect(reEncrypted.keyID == other)
        let listed = try await client.listAliases(keyID: other)
        #expect(listed.aliases.map(\.aliasName) == [alias] && listed.aliases[0].aliasArn == arn && listed.aliases[0].targetKeyID == other)
        #expect(try await client.listAliases(keyID: key).aliases.isEmpty)
        try await client.deleteAlias(aliasName: alias)
        await expectKMSError(.notFound) { try await self.client.encrypt(keyID: alias, plaintext: [6]) }
        await expectKMSError(.notFound) { try await self.client.deleteAlias(aliasName: alias) }
    }

    @Test(arguments: ["orders", "alias/", "alias/has space", "alias/aws/reserved", "alias/" + String(repeating: "x", count: 251), "alias/é"])
    func badAliasNamesAreRefused(_ name: String) async throws {
        let key = try await client.createKey().keyID
        await expectKMSError(.validation) { try await self.client.createAlias(aliasName: name, targetKeyID: key) }
    }

    @Test func aliasRulesAsAWSHasThem() async throws {
        let key = try await client.createKey().keyID
        let alias = Self.unique("rules")
        try await client.createAlias(aliasName: alias, targetKeyID: key)
        await expectKMSError(.alreadyExists) { try await self.client.createAlias(aliasName: alias, targetKeyID: key) }
        await expectKMSError(.validation) { try await self.client.createAlias(aliasName: Self.unique("x"), targetKeyID: alias) }
        await expectKMSError(.notFound) { try await self.client.createAlias(aliasName: Self.unique("x"), targetKeyID: UUID().uuidString.lowercased()) }
        await expectKMSError(.notFound) { try await self.client.updateAlias(aliasName: Self.unique("missing"), targetKeyID: key) }
        // Lifecycle operations take key ids, not aliases (as AWS KMS).
        await expectKMSError(.notFound) { try await self.client.disableKey(keyID: alias) }
        let max = "alias/" + String(repeating: "y", count: 250)
        try await client.createAlias(aliasName: max, targetKeyID: key)
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7)
        await expectKMSError(.invalidState) { try await self.client.createAlias(aliasName: Self.unique("late"), targetKeyID: key) }
        // When the key is deleted, its aliases go with it.
        var gone = false
        for _ in 0..<40 where !gone {
            try await Task.sleep(nanoseconds: 500_000_000)
            gone = !(try await client.listAliases().aliases.contains { $0.aliasName == alias })
        }
        #expect(gone, "the deleted key's alias is still listed")
        await expectKMSError(.notFound) { try await self.client.encrypt(keyID: max, plaintext: [1]) }
    }

    @Test func listAliasesPages() async throws {
        let key = try await client.createKey().keyID
        var names: [String] = []
        for i in 0..<5 {
            let name = "alias/page-\(i)-\(UUID().uuidString.prefix(6).lowercased())"
            try await client.createAlias(aliasName: name, targetKeyID: key)
            names.append(name)
        }
        var seen: [String] = []
        var marker = ""
        repeat {
            let page = try await client.listAliases(keyID: key, limit: 2, marker: marker)
            #expect(page.aliases.count <= 2)
            seen += page.aliases.map(\.aliasName)
            marker = page.truncated ? page.nextMarker : ""
        } while !marker.isEmpty
        #expect(seen == names.sorted())
        await expectKMSError(.invalidMarker) { try await self.client.listAliases(keyID: key, limit: 2, marker: "00ff") }
    }

    @Test func tagsAreAddedReplacedRemovedAndListed() async throws {
        let key = try await client.createKey(tags: ["team": "a"]).keyID
        try await client.tagResource(keyID: key, tags: [("team", "b"), ("cost", "42"), ("empty", "")])
        var tags = try await client.listResourceTags(keyID: key).tags.map { ($0.tagKey, $0.tagValue) }
        #expect(tags.map(\.0) == ["cost", "empty", "team"] && tags.map(\.1) == ["42", "", "b"])
        try await client.untagResource(keyID: key, tagKeys: ["cost", "not-there"])
        tags = try await client.listResourceTags(keyID: key).tags.map { ($0.tagKey, $0.tagValue) }
        #expect(tags.map(\.0) == ["empty", "team"])
        let page = try await client.listResourceTags(keyID: key, limit: 1)
        #expect(page.truncated && page.tags.map(\.tagKey) == ["empty"])
        let next = try await client.listResourceTags(keyID: key, limit: 1, marker: page.nextMarker)
        #expect(!next.truncated && next.tags.map(\.tagKey) == ["team"])
        await expectKMSError(.invalidMarker) { try await self.client.listResourceTags(keyID: key, marker: "zz") }
    }

    @Test func tagLimits() async throws {
        let key = try await client.createKey().keyID
        await expectKMSError(.validation) { try await self.client.tagResource(keyID: key, tags: [("aws:owner", "x")]) }
        await expectKMSError(.validation) { try await self.client.tagResource(keyID: key, tags: [("", "x")]) }
        await expectKMSError(.validation) { try await self.client.tagResource(keyID: key, tags: [(String(repeating: "k", count: 129), "x")]) }
        await expectKMSError(.validation) { try await self.client.tagResource(keyID: key, tags: [("k", String(repeating: "v", count: 257))]) }
        await expectKMSError(.validation) { try await self.client.tagResource(keyID: key, tags: [("dup", "1"), ("dup", "2")]) }
        try await client.tagResource(keyID: key, tags: (0..<50).map { ("k\($0)", "v") })
        await expectKMSError(.limitExceeded) { try await self.client.tagResource(keyID: key, tags: [("one-more", "v")]) }
        try await client.tagResource(keyID: key, tags: [("k0", "replaced")])  // replacing keeps 50
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        await expectKMSError(.invalidState) { try await self.client.tagResource(keyID: key, tags: [("k1", "x")]) }
        await expectKMSError(.invalidState) { try await self.client.untagResource(keyID: key, tagKeys: ["k1"]) }
        // 50 tags, in pages that fit a frame.
        var count = 0, marker = ""
        repeat {
            let page = try await client.listResourceTags(keyID: key, marker: marker)
            count += page.tags.count
            marker = page.truncated ? page.nextMarker : ""
        } while !marker.isEmpty
        #expect(count == 50)
    }

    /// 50 tags of the longest kind (4-byte characters) outgrow one frame: the listing pages.
    @Test func theLongestTagsListInPagesThatFitAFrame() async throws {
        let key = try await client.createKey().keyID
        let clef = "\u{1D11E}"
        func tag(_ i: Int) -> (key: String, value: String) {
            (String(format: "k%02d", i) + String(repeating: clef, count: 125), String(repeating: clef, count: 256))
        }
        try await client.tagResource(keyID: key, tags: (0..<25).map(tag))
        try await client.tagResource(keyID: key, tags: (25..<50).map(tag))
        var keys: [String] = [], pages = 0, marker = ""
        repeat {
            let page = try await client.listResourceTags(keyID: key, marker: marker)
            keys += page.tags.map(\.tagKey)
            pages += 1
            marker = page.truncated ? page.nextMarker : ""
        } while !marker.isEmpty
        #expect(keys == (0..<50).map { tag($0).key } && pages == 2, "\(pages) pages, \(keys.count) tags")
    }

    @Test func kmsctlSpeaksTheAWSCLIFlags() throws {
        func kmsctl(_ args: [String]) throws -> ProcessResult {
            try EndToEndTests.run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket])
        }
        let created = try kmsctl(["create-key", "--tags", "TagKey=team,TagValue=ops", "TagKey=tier,TagValue=gold,silver", "--json"])
        let key = try #require(((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["KeyMetadata"] as? [String: Any])?["KeyId"] as? String, "\(created.stderr)")
        let alias = Self.unique("cli")
        #expect(try kmsctl(["create-alias", "--alias-name", alias, "--target-key-id", key]).status == 0)
        let listed = try kmsctl(["list-aliases", "--key-id", key, "--json"])
        let aliases = try #require((try JSONSerialization.jsonObject(with: listed.stdout) as? [String: Any])?["Aliases"] as? [[String: Any]], "\(listed.stderr)")
        #expect(aliases.first?["AliasName"] as? String == alias && aliases.first?["TargetKeyId"] as? String == key)
        let enc = try run(Paths.kmsctl, ["encrypt", "--key-id", alias], stdin: Data("hi".utf8), env: ["KMSD_SOCKET": daemon.socket])
        #expect(enc.status == 0, "\(enc.stderr)")
        #expect(try kmsctl(["tag-resource", "--key-id", key, "--tags", "TagKey=cost,TagValue=7"]).status == 0)
        #expect(try kmsctl(["untag-resource", "--key-id", key, "--tag-keys", "team"]).status == 0)
        let tags = try kmsctl(["list-resource-tags", "--key-id", key, "--json"])
        let list = try #require((try JSONSerialization.jsonObject(with: tags.stdout) as? [String: Any])?["Tags"] as? [[String: String]], "\(tags.stderr)")
        #expect(list == [["TagKey": "cost", "TagValue": "7"], ["TagKey": "tier", "TagValue": "gold,silver"]])
        #expect(try kmsctl(["delete-alias", "--alias-name", alias]).status == 0)
        #expect(try kmsctl(["tag-resource", "--key-id", key, "--tags", "team=ops"]).status == 2)
    }
}
