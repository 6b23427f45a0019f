import Foundation
import Glibc
import KMSClient
import Testing

/// Until the policy layer lands: administrators create keys; a key is usable by its creator
/// and administrators only. Tested with real other uids through setpriv (needs root).
@Suite(.serialized, .enabled(if: isRoot, "needs root to act as other users with setpriv"))
final class AccessTests {
    let daemon: Daemon
    static let alice: UInt32 = 64101   // an administrator in this daemon's configuration
    static let mallory: UInt32 = 64102 // an ordinary local user

    init() throws {
        daemon = try Daemon(arguments: ["--admin-uid", "0", "--admin-uid", "\(Self.alice)"])
    }

    deinit { daemon.stop() }

    func kmsctl(_ uid: UInt32, _ args: [String], stdin: Data = Data()) throws -> ProcessResult {
        try runAs(uid: uid, [Paths.kmsctl] + args, stdin: stdin, env: ["KMSD_SOCKET": daemon.socket])
    }

    func json(_ r: ProcessResult) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any], "\(r.stderr)")
    }

    @Test func theSocketIsOpenToEveryLocalUser() throws {
        var st = stat()
        #expect(stat(daemon.socket, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o666)
    }

    @Test func socketModeAndGroupAreConfigurable() throws {
        let narrowed = try Daemon(arguments: ["--socket-mode", "0660", "--socket-group", "nogroup"])
        defer { narrowed.stop() }
        var st = stat()
        #expect(stat(narrowed.socket, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o660)
        #expect(st.st_gid == getgrnam("nogroup").pointee.gr_gid)
        // Someone outside the group can no longer connect at all.
        let outsider = try runAs(uid: Self.mallory, [Paths.kmsctl, "whoami"], env: ["KMSD_SOCKET": narrowed.socket])
        #expect(outsider.status == 3 && outsider.stderr.hasPrefix("kmsctl: ConnectionError: "), "\(outsider.stderr)")
        let member = try runAs(uid: Self.mallory, [Paths.kmsctl, "whoami"], env: ["KMSD_SOCKET": narrowed.socket],
                               groups: [UInt32(getgrnam("nogroup").pointee.gr_gid)])
        #expect(member.status == 0, "\(member.stderr)")
    }

    @Test func whoAmIReportsThePeerCredentials() throws {
        let r = try kmsctl(Self.mallory, ["whoami", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let me = try json(r)
        #expect(me["Uid"] as? Int == Int(Self.mallory))
        #expect(me["Gid"] as? Int == Int(Self.mallory))
        #expect((me["Pid"] as? Int ?? 0) > 0)
        #expect(me["Executable"] as? String == Paths.kmsctl)
        #expect(me["IsAdministrator"] as? Bool == false)
        let admin = try json(try kmsctl(Self.alice, ["whoami", "--json"]))
        #expect(admin["IsAdministrator"] as? Bool == true)
    }

    @Test func supplementaryGroupsComeFromTheSocketAndCanMakeAnAdministrator() throws {
        let groups = try runAs(uid: Self.mallory, [Paths.kmsctl, "whoami", "--json"], env: ["KMSD_SOCKET": daemon.socket],
                               groups: [4242, 4343])
        let me = try json(groups)
        #expect(me["Groups"] as? [Int] == [4242, 4343])
        #expect(me["IsAdministrator"] as? Bool == false)
        // A daemon whose administrators are the members of group 4343.
        let byGroup = try Daemon(arguments: ["--admin-uid", "0", "--admin-gid", "4343"])
        defer { byGroup.stop() }
        let member = try runAs(uid: Self.mallory, [Paths.kmsctl, "create-key", "--json"], env: ["KMSD_SOCKET": byGroup.socket], groups: [4343])
        #expect(member.status == 0, "\(member.stderr)")
        let outsider = try runAs(uid: Self.mallory, [Paths.kmsctl, "create-key"], env: ["KMSD_SOCKET": byGroup.socket], groups: [4242])
        #expect(outsider.stderr.hasPrefix("kmsctl: AccessDeniedException: "), "\(outsider.stderr)")
    }

    /// An alias of a key someone may not use looks to them like no alias at all: it reveals
    /// neither its key nor that it exists.
    @Test func anAliasOfSomeoneElsesKeyIsNotFound() throws {
        let created = try json(try kmsctl(Self.alice, ["create-key", "--json"]))
        let key = try #require((created["KeyMetadata"] as? [String: Any])?["KeyId"] as? String)
        #expect(try kmsctl(Self.alice, ["create-alias", "--alias-name", "alias/alice-only", "--target-key-id", key]).status == 0)
        let probe = try kmsctl(Self.mallory, ["encrypt", "--key-id", "alias/alice-only"], stdin: Data("x".utf8))
        #expect(probe.stderr.hasPrefix("kmsctl: NotFoundException: ") && !probe.stderr.contains(key), "\(probe.stderr)")
        let missing = try kmsctl(Self.mallory, ["encrypt", "--key-id", "alias/never-made"], stdin: Data("x".utf8))
        #expect(missing.stderr.replacingOccurrences(of: "never-made", with: "alice-only") == probe.stderr, "the same answer as for no alias")
        #expect(try kmsctl(Self.alice, ["encrypt", "--key-id", "alias/alice-only"], stdin: Data("x".utf8)).status == 0)
    }

    @Test func onlyAdministratorsCreateKeys() throws {
        let denied = try kmsctl(Self.mallory, ["create-key"])
        #expect(denied.status != 0)
        #expect(denied.stderr.hasPrefix("kmsctl: AccessDeniedException: "), "\(denied.stderr)")
        let created = try kmsctl(Self.alice, ["create-key", "--json"])
        #expect(created.status == 0, "\(created.stderr)")
    }

    @Test func aKeyIsUsableByItsCreatorAndAdministratorsOnly() async throws {
        let created = try json(try kmsctl(Self.alice, ["create-key", "--json"]))
        let keyID = try #require((created["KeyMetadata"] as? [String: Any])?["KeyId"] as? String)
        let secret = Data("alice's secret".utf8)

        let enc = try kmsctl(Self.alice, ["encrypt", "--key-id", keyID], stdin: secret)
        #expect(enc.status == 0, "\(enc.stderr)")
        let blob = enc.stdout

        // Another user: every use is denied, and nothing of the secret is shown.
        for args in [["encrypt", "--key-id", keyID], ["decrypt"], ["describe-key", "--key-id", keyID],
                     ["generate-data-key", "--key-id", keyID, "--key-spec", "AES_256"]] {
            let r = try kmsctl(Self.mallory, args, stdin: args[0] == "decrypt" ? blob : secret)
            #expect(r.status != 0, "\(args[0]) must be denied")
            #expect(r.stderr.hasPrefix("kmsctl: AccessDeniedException: "), "\(args[0]): \(r.stderr)")
            #expect(r.stdout.isEmpty)
        }
        // Mallory does not even see the key in a listing.
        let listed = try json(try kmsctl(Self.mallory, ["list-keys", "--json"]))
        #expect((listed["Keys"] as? [[String: Any]] ?? []).isEmpty)

        // The creator and root (an administrator) may decrypt.
        let own = try kmsctl(Self.alice, ["decrypt"], stdin: blob)
        #expect(own.status == 0 && own.stdout == secret)
        let root = try await daemon.client().decrypt(ciphertextBlob: Array(blob))
        #expect(root.plaintext == secret)
    }

    @Test func aKeyCreatedByRootIsNotUsableByOthers() async throws {
        let key = try await daemon.client().createKey()
        let blob = try await daemon.client().encrypt(keyID: key.keyID, plaintext: [1, 2, 3]).ciphertextBlob
        let r = try kmsctl(Self.mallory, ["decrypt"], stdin: blob)
        #expect(r.stderr.hasPrefix("kmsctl: AccessDeniedException: "), "\(r.stderr)")
        let random = try kmsctl(Self.mallory, ["generate-random", "--number-of-bytes", "16"])
        #expect(random.status == 0 && random.stdout.count == 16, "GenerateRandom is open to every caller")
    }
}
