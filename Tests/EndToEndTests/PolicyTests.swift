import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// Key policies against real identities: other uids and groups (setpriv), another executable
/// (a copy of kmsctl), and a process in a cgroup named like a systemd unit. Each principal kind
/// is shown allowed and denied, with conditions on the encryption context and on tags, an
/// explicit Deny over an Allow, the lockout check, and every decision in the audit trail.
@Suite(.serialized, .enabled(if: isRoot, "needs root to act as other users, groups and cgroups"))
final class PolicyTests {
    let daemon: Daemon
    let client: KMSClient
    static let bob: UInt32 = 64201
    static let carol: UInt32 = 64202
    static let payroll: UInt32 = 64299  // a group (no name needed: policies take numeric gids)

    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon()
        client = daemon.client()
    }

    deinit { daemon.stop() }

    func kmsctl(_ uid: UInt32, _ args: [String], stdin: Data = Data(), groups: [UInt32] = [], executable: String = Paths.kmsctl) throws -> ProcessResult {
        try runAs(uid: uid, [executable] + args, stdin: stdin, env: ["KMSD_SOCKET": daemon.socket], groups: groups)
    }

    /// A policy document: administrators keep every right, plus `statements`.
    func encrypt(_ uid: UInt32, _ key: String, context: [String] = [], groups: [UInt32] = [], executable: String = Paths.kmsctl) throws -> ProcessResult {
        try kmsctl(uid, ["encrypt", "--key-id", key] + context.flatMap { ["--context", $0] }, stdin: Data("secret".utf8), groups: groups, executable: executable)
    }

    func expectDenied(_ r: ProcessResult, _ code: String = "AccessDeniedException", sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status != 0 && r.stderr.contains(code), "\(r.stderr)", sourceLocation: sourceLocation)
    }

    /// Waits (journald stores records a moment after kmsd sent them) for an audit record of this
    /// daemon for `uid` and `action` with every field in `fields`; an issue when none comes.
    func expectRecord(uid: UInt32, action: String, _ fields: [String: String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        var matches = ["_PID=\(daemon.pid)", "KMS_PEER_UID=\(uid)", "KMS_ACTION=\(action)"]
        matches += fields.map { "\($0.key)=\($0.value)" }
        let found = try Journal.query(matches, since: daemon.startedAt, atLeast: 1)
        #expect(!found.isEmpty, "no \(action) record of uid \(uid) with \(fields)", sourceLocation: sourceLocation)
    }

    @Test func theDefaultPolicyIsTodaysRuleWrittenDown() async throws {
        let key = try await client.createKey().keyID
        let text = try await client.getKeyPolicy(keyID: key)
        #expect(text.contains(#""Uid": "\#(getuid())""#) && text.contains(#""Role": "Administrators""#), "\(text)")
        #expect(try await client.listKeyPolicies(keyID: key) == ["default"])
        let own = try encrypt(getuid(), key)
        #expect(own.status == 0, "\(own.stderr)")
        expectDenied(try encrypt(Self.bob, key))
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_RESULT": "Denied", "KMS_DECIDED_BY": "implicit-deny"])
        try expectRecord(uid: getuid(), action: "Encrypt", ["KMS_RESULT": "Allowed", "KMS_DECIDED_BY": "key-policy:KeyCreator"])
    }

    @Test func uidsAndAnExplicitDenyOverAnAllow() async throws {
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "EveryoneEncrypts", "Effect": "Allow", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*"}"#,
            #"{"Sid": "NotCarol", "Effect": "Deny", "Principal": {"Uid": "\#(Self.carol)"}, "Action": "kms:*", "Resource": "*"}"#))
        #expect(try encrypt(Self.bob, key).status == 0)
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_DECIDED_BY": "key-policy:EveryoneEncrypts"])
        expectDenied(try encrypt(Self.carol, key))
        try expectRecord(uid: Self.carol, action: "Encrypt", ["KMS_DECIDED_BY": "key-policy:NotCarol"])
        // Encrypt only: bob may not decrypt, nor describe.
        let blob = try encrypt(Self.bob, key).stdout
        expectDenied(try kmsctl(Self.bob, ["decrypt"], stdin: blob))
        expectDenied(try kmsctl(Self.bob, ["describe-key", "--key-id", key]))
    }

    @Test func aUserByName() async throws {
        let nobody = try #require(getpwnam("nobody")?.pointee.pw_uid)
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "Nobody", "Effect": "Allow", "Principal": {"User": "nobody"}, "Action": "kms:Encrypt", "Resource": "*"}"#))
        #expect(try encrypt(nobody, key).status == 0)
        try expectRecord(uid: nobody, action: "Encrypt", ["KMS_DECIDED_BY": "key-policy:Nobody"])
        expectDenied(try encrypt(Self.bob, key))
        // A name that does not exist is refused when the policy is put.
        await expectKMSError(.validation) {
            try await self.client.putKeyPolicy(keyID: key, policy: keyPolicy(#"{"Effect": "Allow", "Principal": {"User": "no-such-user-kmsd"}, "Action": "kms:Encrypt", "Resource": "*"}"#))
        }
    }

    @Test func aGroupMayDecryptOnlyWithItsContext() async throws {
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "PayrollReads", "Effect": "Allow", "Principal": {"Group": "\#(Self.payroll)"}, "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}}"#))
        let payrollBlob = Array(try await client.encrypt(keyID: key, plaintext: Array("salaries".utf8), context: ["dept": "payroll"]).ciphertextBlob)
        let salesBlob = Array(try await client.encrypt(keyID: key, plaintext: Array("leads".utf8), context: ["dept": "sales"]).ciphertextBlob)
        let ok = try kmsctl(Self.bob, ["decrypt", "--context", "dept=payroll"], stdin: Data(payrollBlob), groups: [Self.payroll])
        #expect(ok.status == 0 && ok.text == "salaries", "\(ok.stderr)")
        expectDenied(try kmsctl(Self.bob, ["decrypt", "--context", "dept=sales"], stdin: Data(salesBlob), groups: [Self.payroll]))
        expectDenied(try kmsctl(Self.bob, ["decrypt", "--context", "dept=payroll"], stdin: Data(payrollBlob)))
    }

    @Test func anExecutableByItsPath() async throws {
        let appDir = Paths.binDir.path + "/app-\(UUID().uuidString.prefix(6))"
        mkdir(appDir, 0o755)
        let app = appDir + "/payroll-app"
        try FileManager.default.copyItem(atPath: Paths.kmsctl, toPath: app)
        chmod(app, 0o755)
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "TheApp", "Effect": "Allow", "Principal": {"Executable": "\#(app)"}, "Action": "kms:Encrypt", "Resource": "*"}"#))
        let viaApp = try encrypt(Self.bob, key, executable: app)
        #expect(viaApp.status == 0, "\(viaApp.stderr)")
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_PEER_EXE": app])
        expectDenied(try encrypt(Self.bob, key))
    }

    @Test func aSystemdUnitByItsCgroup() async throws {
        let root = try #require(AuditRobustnessTests.cgroup2Root(), "no cgroup2 hierarchy mounted")
        let unit = "kmsd-policy-\(UUID().uuidString.prefix(8).lowercased()).service"
        let cgroup = root + "/" + unit
        try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: false)
        defer { rmdir(cgroup) }
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "TheUnit", "Effect": "Allow", "Principal": {"Unit": "\#(unit)"}, "Action": "kms:Encrypt", "Resource": "*"}"#))
        let inUnit = try run("/bin/sh", ["-c", "echo $$ > '\(cgroup)/cgroup.procs' && exec /usr/bin/setpriv --reuid=\(Self.bob) --regid=\(Self.bob) --clear-groups -- '\(Paths.kmsctl)' encrypt --key-id \(key)"],
                             stdin: Data("x".utf8), env: ["KMSD_SOCKET": daemon.socket])
        #expect(inUnit.status == 0, "\(inUnit.stderr)")
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_PEER_UNIT": unit])
        expectDenied(try encrypt(Self.bob, key))
    }

    @Test func oneRuleForEveryKeyTaggedFinance() async throws {
        let rule = #"{"Sid": "FinanceKeys", "Effect": "Allow", "Principal": {"Uid": "\#(Self.bob)"}, "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:ResourceTag/category": "finance"}}}"#
        let finance = try await client.createKey(tags: ["category": "finance"], policy: keyPolicy(rule)).keyID
        let pii = try await client.createKey(tags: ["category": "pii"], policy: keyPolicy(rule)).keyID
        let allowed = try encrypt(Self.bob, finance)
        #expect(allowed.status == 0, "\(allowed.stderr)")
        expectDenied(try encrypt(Self.bob, pii))
        try await client.untagResource(keyID: finance, tagKeys: ["category"])
        expectDenied(try encrypt(Self.bob, finance))
    }

    @Test func theLockoutSafetyCheck() async throws {
        let key = try await client.createKey().keyID
        let onlyBob = #"{"Version": "2012-10-17", "Statement": [{"Sid": "Bob", "Effect": "Allow", "Principal": {"Uid": "\#(Self.bob)"}, "Action": "kms:*", "Resource": "*"}]}"#
        await expectKMSError(.validation) { try await self.client.putKeyPolicy(keyID: key, policy: onlyBob) }
        // Refused: the old policy still applies.
        #expect(try await client.getKeyPolicy(keyID: key).contains("KeyCreator"))
        try await client.putKeyPolicy(keyID: key, policy: onlyBob, bypassPolicyLockoutSafetyCheck: true)
        await expectKMSError(.accessDenied) { try await self.client.putKeyPolicy(keyID: key, policy: keyPolicy()) }
        // Bob, whom the policy names, can (keeping himself able to, and the administrators back).
        let file = daemon.stateDir + "-policy.json"
        try keyPolicy(#"{"Sid": "Bob", "Effect": "Allow", "Principal": {"Uid": "\#(Self.bob)"}, "Action": "kms:PutKeyPolicy", "Resource": "*"}"#)
            .write(toFile: file, atomically: true, encoding: .utf8)
        chmod(file, 0o644)
        let byBob = try kmsctl(Self.bob, ["put-key-policy", "--key-id", key, "--policy", "file://" + file])
        #expect(byBob.status == 0, "\(byBob.stderr)")
        // Strict parsing, with the place named.
        await expectKMSError(.validation) {
            try await self.client.putKeyPolicy(keyID: key, policy: keyPolicy(#"{"Effect": "Allow", "Principal": "*", "Action": "kms:Encrpt"}"#))
        }
        // And CreateKey with a policy that locks its creator out is refused too.
        await expectKMSError(.validation) { _ = try await self.client.createKey(policy: onlyBob) }
    }

    @Test func simulatePolicyExplainsDecisions() async throws {
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "PayrollReads", "Effect": "Allow", "Principal": {"Group": "\#(Self.payroll)"}, "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}}"#,
            #"{"Sid": "NoCarol", "Effect": "Deny", "Principal": {"Uid": "\#(Self.carol)"}, "Action": "kms:*", "Resource": "*"}"#))
        func simulate(_ args: [String]) throws -> [String: Any] {
            let r = try run(Paths.kmsctl, ["simulate-policy", "--key-id", key, "--json"] + args, env: ["KMSD_SOCKET": daemon.socket])
            #expect(r.status == 0, "\(r.stderr)")
            return try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
        }
        let allowed = try simulate(["--action", "kms:Decrypt", "--uid", "\(Self.bob)", "--group", "\(Self.payroll)", "--context", "dept=payroll"])
        #expect(allowed["Decision"] as? String == "Allow" && allowed["DecidedBy"] as? String == "key-policy:PayrollReads")
        let wrongContext = try simulate(["--action", "kms:Decrypt", "--uid", "\(Self.bob)", "--group", "\(Self.payroll)", "--context", "dept=x"])
        #expect(wrongContext["Decision"] as? String == "ImplicitDeny" && wrongContext["DecidedBy"] as? String == "implicit-deny")
        let carol = try simulate(["--action", "kms:Decrypt", "--uid", "\(Self.carol)", "--group", "\(Self.payroll)", "--context", "dept=payroll"])
        #expect(carol["Decision"] as? String == "ExplicitDeny" && carol["DecidedBy"] as? String == "key-policy:NoCarol")
        let admin = try simulate(["--action", "kms:ScheduleKeyDeletion", "--uid", "0"])
        #expect(admin["Decision"] as? String == "Allow" && admin["DecidedBy"] as? String == "key-policy:Admins")
        // Someone who may not read the key's policy may not simulate it either.
        expectDenied(try kmsctl(Self.bob, ["simulate-policy", "--key-id", key, "--action", "kms:Decrypt", "--uid", "\(Self.bob)"]))
    }

    @Test func anAliasOfAKeyOneMayNotUseLooksMissing() async throws {
        let key = try await client.createKey().keyID
        let alias = "alias/policy-\(UUID().uuidString.prefix(8))"
        try await client.createAlias(aliasName: alias, targetKeyID: key)
        expectDenied(try encrypt(Self.bob, alias), "NotFoundException")
        #expect(try encrypt(getuid(), alias).status == 0)
    }

    // MARK: - Grants

    @Test func aGrantAllowsAtOnceAndStopsAtOnce() async throws {
        let key = try await client.createKey().keyID
        expectDenied(try encrypt(Self.bob, key, context: ["app=orders"]))
        let created = try run(Paths.kmsctl, ["create-grant", "--key-id", key, "--grantee-principal", "uid:\(Self.bob)",
                                             "--operations", "Encrypt,Decrypt", "--constraints", "EncryptionContextSubset={app=orders}", "--json"],
                              env: ["KMSD_SOCKET": daemon.socket])
        #expect(created.status == 0, "\(created.stderr)")
        let grant = try #require((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["GrantId"] as? String)
        let blob = try encrypt(Self.bob, key, context: ["app=orders", "extra=1"])
        #expect(blob.status == 0, "\(blob.stderr)")
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_DECIDED_BY": "grant:\(grant)"])
        // The constraint: the context must hold app=orders.
        expectDenied(try encrypt(Self.bob, key, context: ["app=billing"]))
        expectDenied(try encrypt(Self.bob, key))
        let listed = try await client.listGrants(keyID: key)
        #expect(listed.grants.map(\.grantID) == [grant] && listed.grants[0].constraints.encryptionContextSubset == ["app": "orders"])
        // Bob may not revoke it; the key's owner may, and it stops at once.
        expectDenied(try kmsctl(Self.bob, ["revoke-grant", "--key-id", key, "--grant-id", grant]))
        try await client.revokeGrant(keyID: key, grantID: grant)
        expectDenied(try encrypt(Self.bob, key, context: ["app=orders"]))
        #expect(try await client.listGrants(keyID: key).grants.isEmpty)
        try expectRecord(uid: getuid(), action: "RevokeGrant", ["KMS_GRANT_ID": grant])
    }

    /// The policy and grant subcommands as an administrator scripts them: get-key-policy (text
    /// and --json), list-key-policies, put-key-policy --policy - (standard input),
    /// simulate-policy --unit, and a grant with EncryptionContextEquals listed by list-grants:
    /// exactly that context, no more and no less.
    @Test func policyAndGrantSubcommandsAndAnExactContextGrant() async throws {
        let key = try await client.createKey().keyID
        func ctl(_ args: [String], stdin: Data = Data()) throws -> ProcessResult {
            try run(Paths.kmsctl, args, stdin: stdin, env: ["KMSD_SOCKET": daemon.socket])
        }
        let text = try ctl(["get-key-policy", "--key-id", key])
        #expect(text.status == 0 && text.text.contains("KeyCreator"), "\(text.stderr)")
        let asJSON = try #require(try JSONSerialization.jsonObject(with: try ctl(["get-key-policy", "--key-id", key, "--json"]).stdout) as? [String: Any])
        #expect(asJSON["PolicyName"] as? String == "default" && (asJSON["Policy"] as? String)?.contains("KeyCreator") == true)
        #expect(try ctl(["list-key-policies", "--key-id", key]).text == "default\n")

        let unit = "orders-\(UUID().uuidString.prefix(6).lowercased()).service"
        let policy = keyPolicy(#"{"Sid": "OrdersUnit", "Effect": "Allow", "Principal": {"Unit": "\#(unit)"}, "Action": "kms:Encrypt", "Resource": "*"}"#)
        let put = try ctl(["put-key-policy", "--key-id", key, "--policy", "-"], stdin: Data(policy.utf8))
        #expect(put.status == 0, "\(put.stderr)")
        #expect(try await client.getKeyPolicy(keyID: key) == policy)
        func simulate(_ args: [String]) throws -> [String: Any] {
            let r = try ctl(["simulate-policy", "--key-id", key, "--json"] + args)
            #expect(r.status == 0, "\(r.stderr)")
            return (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
        }
        #expect(try simulate(["--action", "kms:Encrypt", "--unit", unit])["DecidedBy"] as? String == "key-policy:OrdersUnit")
        #expect(try simulate(["--action", "kms:Encrypt", "--unit", "other.service"])["Decision"] as? String == "ImplicitDeny")
        #expect(try simulate(["--action", "kms:Decrypt", "--unit", unit])["Decision"] as? String == "ImplicitDeny")

        let created = try ctl(["create-grant", "--key-id", key, "--grantee-principal", "uid:\(Self.bob)", "--operations", "Encrypt",
                               "--constraints", "EncryptionContextEquals={app=orders,tier=db}", "--json"])
        let grant = try #require((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["GrantId"] as? String, "\(created.stderr)")
        let listed = try #require((try JSONSerialization.jsonObject(with: try ctl(["list-grants", "--key-id", key, "--json"]).stdout) as? [String: Any])?["Grants"] as? [[String: Any]])
        #expect(listed.count == 1 && listed.first?["GrantId"] as? String == grant, "\(listed)")
        #expect(((listed.first?["Constraints"] as? [String: Any])?["EncryptionContextEquals"] as? [String: String]) == ["app": "orders", "tier": "db"], "\(listed)")
        #expect(try encrypt(Self.bob, key, context: ["app=orders", "tier=db"]).status == 0)
        expectDenied(try encrypt(Self.bob, key, context: ["app=orders"]))
        expectDenied(try encrypt(Self.bob, key, context: ["app=orders", "tier=db", "extra=1"]))
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_RESULT": "Allowed", "KMS_DECIDED_BY": "grant:\(grant)"])
    }

    @Test func theRetiringPrincipalRetires() async throws {
        let key = try await client.createKey().keyID
        let g = try await client.createGrant(keyID: key, granteePrincipal: "uid:\(Self.bob)", operations: ["Encrypt"],
                                             retiringPrincipal: "uid:\(Self.carol)", name: "bob-encrypts")
        // The same name and parameters give the same grant.
        let again = try await client.createGrant(keyID: key, granteePrincipal: "uid:\(Self.bob)", operations: ["Encrypt"],
                                                 retiringPrincipal: "uid:\(Self.carol)", name: "bob-encrypts")
        #expect(again.grantID == g.grantID)
        #expect(try encrypt(Self.bob, key).status == 0)
        let retirable = try kmsctl(Self.carol, ["list-retirable-grants", "--retiring-principal", "uid:\(Self.carol)", "--json"])
        #expect(retirable.status == 0 && retirable.text.contains(g.grantID), "\(retirable.stderr)")
        expectDenied(try kmsctl(Self.bob, ["list-retirable-grants", "--retiring-principal", "uid:\(Self.carol)"]))
        expectDenied(try kmsctl(Self.bob, ["retire-grant", "--grant-token", g.grantToken]))
        let retired = try kmsctl(Self.carol, ["retire-grant", "--grant-token", g.grantToken])
        #expect(retired.status == 0, "\(retired.stderr)")
        expectDenied(try encrypt(Self.bob, key))
    }

    @Test func aGranteeMayPassOnOnlyWhatItHas() async throws {
        let key = try await client.createKey().keyID
        _ = try await client.createGrant(keyID: key, granteePrincipal: "uid:\(Self.bob)", operations: ["Encrypt", "CreateGrant"])
        let narrower = try kmsctl(Self.bob, ["create-grant", "--key-id", key, "--grantee-principal", "uid:\(Self.carol)", "--operations", "Encrypt"])
        #expect(narrower.status == 0, "\(narrower.stderr)")
        #expect(try encrypt(Self.carol, key).status == 0)
        expectDenied(try kmsctl(Self.bob, ["create-grant", "--key-id", key, "--grantee-principal", "uid:\(Self.carol)", "--operations", "Decrypt"]))
        // Malformed grants are refused before anything else.
        await expectKMSError(.validation) {
            _ = try await self.client.createGrant(keyID: key, granteePrincipal: "bob", operations: ["Encrypt"])
        }
        await expectKMSError(.validation) {
            _ = try await self.client.createGrant(keyID: key, granteePrincipal: "uid:1", operations: ["PutKeyPolicy"])
        }
        await expectKMSError(.validation) {
            _ = try await self.client.createGrant(keyID: key, granteePrincipal: "uid:1", operations: ["DescribeKey"], contextSubset: ["a": "b"])
        }
    }

    // MARK: - Identity policies

    @Test func identityPoliciesReloadOnSIGHUPAndAnInvalidSetIsRefused() async throws {
        let dir = try Paths.tempDir("identity")
        let allowBob = #"{"Version": "2012-10-17", "AttachTo": {"Uid": "\#(Self.bob)"}, "Statement": [{"Sid": "BobEncrypts", "Effect": "Allow", "Action": "kms:Encrypt", "Resource": "kmsd:key/*"}]}"#
        try allowBob.write(toFile: dir + "/bob.json", atomically: true, encoding: .utf8)
        let d = try Daemon(arguments: ["--identity-policy-dir", dir])
        defer { d.stop() }
        let c = d.client()
        func bobEncrypts(_ key: String) throws -> ProcessResult {
            try runAs(uid: Self.bob, [Paths.kmsctl, "encrypt", "--key-id", key], stdin: Data("x".utf8), env: ["KMSD_SOCKET": d.socket])
        }
        /// Waits for a record of `action` (with `fields`) of this daemon.
        func records(_ action: String, _ fields: [String] = []) throws -> [[String: Any]] {
            try Journal.query(["_PID=\(d.pid)", "KMS_ACTION=\(action)"] + fields, since: d.startedAt, atLeast: 1)
        }
        // The default key policy delegates to identity policies; a policy without that does not.
        let delegating = try await c.createKey().keyID
        let closed = try await c.createKey(policy: keyPolicy()).keyID
        let allowed = try bobEncrypts(delegating)
        #expect(allowed.status == 0, "\(allowed.stderr)")
        #expect(try !records("Encrypt", ["KMS_PEER_UID=\(Self.bob)", "KMS_DECIDED_BY=identity-policy:bob:BobEncrypts"]).isEmpty)
        expectDenied(try bobEncrypts(closed))

        // An invalid file: the whole reload is refused, the old set stays, and it is audited.
        try #"{"AttachTo": {"Uid": "1"}, "Statement": [{"Effect": "Allow", "Action": "kms:Encrpt", "Resource": "*"}]}"#
            .write(toFile: dir + "/broken.json", atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        let failed = try records("IdentityPoliciesReloadFailed")
        #expect(failed.first?["KMS_ERROR"] as? String == "ValidationException")
        #expect(d.log.contains("broken"), "the log names the file")
        #expect(try bobEncrypts(delegating).status == 0)

        // A valid set with a Deny: in force after SIGHUP, and it wins over any Allow.
        unlink(dir + "/broken.json")
        try #"{"Version": "2012-10-17", "AttachTo": {"Uid": "\#(Self.bob)"}, "Statement": [{"Sid": "NoMore", "Effect": "Deny", "Action": "kms:*", "Resource": "*"}]}"#
            .write(toFile: dir + "/bob-deny.json", atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        #expect(try !records("IdentityPoliciesReloaded").isEmpty)
        expectDenied(try bobEncrypts(delegating))
        #expect(try !records("Encrypt", ["KMS_PEER_UID=\(Self.bob)", "KMS_DECIDED_BY=identity-policy:bob-deny:NoMore"]).isEmpty)
        // The owner's own Allow in the key policy does not beat it either.
        try await c.putKeyPolicy(keyID: closed, policy: keyPolicy(#"{"Sid": "Bob", "Effect": "Allow", "Principal": {"Uid": "\#(Self.bob)"}, "Action": "kms:Encrypt", "Resource": "*"}"#))
        expectDenied(try bobEncrypts(closed))
        await c.close()
    }

    // MARK: - Access review

    @Test func reviewAccessListsFlagsAndFindsUnusedPermissions() async throws {
        let key = try await client.createKey().keyID
        try await client.putKeyPolicy(keyID: key, policy: keyPolicy(
            #"{"Sid": "Everyone", "Effect": "Allow", "Principal": "*", "Action": "kms:DescribeKey", "Resource": "*"}"#,
            #"{"Sid": "BobEncrypts", "Effect": "Allow", "Principal": {"Uid": "\#(Self.bob)"}, "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:app": "orders"}}}"#,
            #"{"Sid": "CarolDecrypts", "Effect": "Allow", "Principal": {"Uid": "\#(Self.carol)"}, "Action": "kms:Decrypt", "Resource": "*"}"#))
        let grant = try await client.createGrant(keyID: key, granteePrincipal: "uid:\(Self.carol)", operations: ["Encrypt"]).grantID
        #expect(try encrypt(Self.bob, key, context: ["app=orders"]).status == 0)
        // The audit record of bob's request must be in the journal before the review reads it.
        try expectRecord(uid: Self.bob, action: "Encrypt", ["KMS_DECIDED_BY": "key-policy:BobEncrypts"])

        // The same statement on a second key bob never used: unused there, although used on the first.
        let twin = try await client.createKey(policy: try await client.getKeyPolicy(keyID: key)).keyID
        let t = try run(Paths.kmsctl, ["review-access", "--key-id", twin, "--unused-days", "1", "--json"], env: ["KMSD_SOCKET": daemon.socket])
        let twinPermissions = try #require(((try JSONSerialization.jsonObject(with: t.stdout) as? [String: Any])?["Keys"] as? [[String: Any]])?.first?["Permissions"] as? [[String: Any]])
        #expect((twinPermissions.first { $0["Source"] as? String == "key-policy:BobEncrypts" }?["Flags"] as? [String])?.contains("unused-1d") == true,
                "a statement used on one key is not used on another")

        let r = try run(Paths.kmsctl, ["review-access", "--key-id", key, "--unused-days", "1", "--json"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(r.status == 0, "\(r.stderr)")
        let keys = try #require((try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])?["Keys"] as? [[String: Any]])
        let permissions = try #require(keys.first?["Permissions"] as? [[String: Any]])
        func flags(_ source: String) -> [String]? { permissions.first { $0["Source"] as? String == source }?["Flags"] as? [String] }
        #expect(flags("key-policy:Everyone")?.contains("wildcard-principal") == true)
        #expect(flags("key-policy:Admins")?.contains("wildcard-action") == true)
        #expect(flags("key-policy:BobEncrypts").map { !$0.contains("unused-1d") } == true, "bob used it")
        #expect(flags("key-policy:CarolDecrypts")?.contains("unused-1d") == true)
        #expect(flags("grant:\(grant)")?.contains("unused-1d") == true)
        let bobs = try #require(permissions.first { $0["Source"] as? String == "key-policy:BobEncrypts" })
        #expect(bobs["Principals"] as? [String] == ["Uid:\(Self.bob)"] && (bobs["Conditions"] as? String)?.contains("orders") == true)

        // Every key at once is an administrator's review; bob may not.
        let all = try run(Paths.kmsctl, ["review-access", "--json"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(all.status == 0 && all.text.contains(key), "\(all.stderr)")
        expectDenied(try kmsctl(Self.bob, ["review-access"]))
        expectDenied(try kmsctl(Self.bob, ["review-access", "--key-id", key]))
    }

    /// A context with two keys that differ only in Unicode normalisation is two pairs to the
    /// ciphertext, and so to the policy: a Deny on one of them cannot be dodged by sending the
    /// other spelling beside it.
    @Test func policyConditionsSeeTheContextByteForByte() async throws {
        let nfc = "caf\u{e9}", nfd = "cafe\u{301}"
        let key = try await client.createKey(policy: keyPolicy(
            #"{"Sid": "NoSecret", "Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:\#(nfc)": "secret"}}}"#)).keyID
        await expectKMSError(.accessDenied) { try await self.client.encrypt(keyID: key, plaintext: [1], context: [nfc: "secret"]) }
        // Both spellings in one request: the NFD pair through the protobuf message, the NFC one
        // as a second occurrence of the Encrypt field (protobuf merges them; the map would too).
        let request = KMSRequest.with(id: 7, .encrypt(.with { $0.keyID = key; $0.plaintext = Data([1]); $0.encryptionContext = [nfd: "ok"] }))
        var body: [UInt8] = try request.serializedBytes()
        func lengthDelimited(_ tag: [UInt8], _ bytes: [UInt8]) -> [UInt8] { tag + [UInt8(bytes.count)] + bytes }
        let entry = lengthDelimited([0x0a], Array(nfc.utf8)) + lengthDelimited([0x12], Array("secret".utf8))
        let encrypt = lengthDelimited([0x1a], entry)
        body += [0xf2, 0x01, UInt8(encrypt.count)] + encrypt
        let raw = try RawConnection(path: daemon.socket)
        raw.send(RawConnection.frame(body))
        let answer = try #require(try raw.receive())
        #expect(answer.id == 7 && answer.kmsError?.code == .accessDenied, "\(answer.kmsError?.code.rawValue ?? "no error")")
    }
}
