import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// The credential provider (systemd's LoadCredential=ID:/run/kmsd/credentials.sock): a client
/// that binds \0RANDOM/unit/UNIT/ID as root, as systemd does, gets the unit's secret only when
/// the key's policy lets that unit decrypt; anyone else gets nothing, and every attempt is
/// audited.
@Suite(.serialized)
struct CredentialProviderTests {
    static let secret = "pay-\(UUID().uuidString)-roll"

    @Test(.enabled(if: isRoot, "needs root: systemd's side of the socket is uid 0, and one client runs as another uid (setpriv)"))
    func unitsGetTheirCredentialsAsTheKeyPolicySays() async throws {
        try Journal.ensureRunning()
        let dir = try Paths.tempDir("credprov")
        let socket = dir + "/credentials.sock", store = dir + "/creds"
        let daemon = try Daemon(arguments: ["--credential-socket", socket, "--credential-dir", store])
        defer { daemon.stop() }
        #expect(daemon.log.contains("credentials on \(socket)"), "\(daemon.log)")
        let client = daemon.client()
        let payroll = #"{"Sid": "Payroll", "Effect": "Allow", "Principal": {"Unit": "payroll.service"}, "Action": "kms:Decrypt", "Resource": "*"}"#
        let key = try await client.createKey(description: "credentials", policy: keyPolicy(payroll)).keyID
        func put(_ unit: String, _ name: String, _ value: String) throws {
            let r = try run(Paths.kmsctl, ["put-credential", "--unit", unit, "--name", name, "--key-id", key, "--credential-dir", store],
                            stdin: Data(value.utf8), env: ["KMSD_SOCKET": daemon.socket])
            #expect(r.status == 0 && r.text == "\(store)/\(unit)/\(name)\n", "\(r.stderr)")
        }
        func load(_ unit: String, _ name: String, uid: UInt32 = 0) throws -> ProcessResult {
            try runAs(uid: uid, [Paths.kmsctl, "load-credential", "--unit", unit, "--name", name, "--credential-socket", socket])
        }
        func record(_ matches: [String], since: Date) throws -> [String: Any] {
            try #require(Journal.query(["_PID=\(daemon.pid)"] + matches, since: since, atLeast: 1).last)
        }
        try put("payroll.service", "db-password", Self.secret)
        try put("other.service", "db-password", Self.secret)
        // Only ciphertext is on disk.
        let stored = try Data(contentsOf: URL(fileURLWithPath: store + "/payroll.service/db-password"))
        let storedInClear = stored.range(of: Data(Self.secret.utf8)) != nil
        #expect(!storedInClear)

        // systemd (root) loading payroll.service's credential: served, audited as the unit's Decrypt.
        var since = Date()
        let served = try load("payroll.service", "db-password")
        // Compared into a Bool first, so a failure prints no secret.
        let servedTheSecret = served.text == Self.secret
        #expect(served.status == 0 && servedTheSecret, "\(served.stderr)")
        let allowed = try record(["KMS_ACTION=Decrypt", "KMS_CREDENTIAL=payroll.service/db-password"], since: since)
        #expect(allowed["KMS_RESULT"] as? String == "Allowed" && allowed["KMS_PEER_UNIT"] as? String == "payroll.service")
        #expect(allowed["KMS_DECIDED_BY"] as? String == "key-policy:Payroll")
        #expect(allowed["KMS_PEER_UID"] as? String == "4294967295", "the unit, never root's rights")

        // Another unit, with a credential stored under the same key: the policy does not let it decrypt.
        since = Date()
        let other = try load("other.service", "db-password")
        #expect(other.status != 0 && other.stdout.isEmpty)
        let denied = try record(["KMS_ACTION=Decrypt", "KMS_CREDENTIAL=other.service/db-password"], since: since)
        #expect(denied["KMS_RESULT"] as? String == "Denied" && denied["KMS_ERROR"] as? String == "AccessDeniedException")

        // A blob moved to another credential id does not decrypt there (the context binds both).
        try FileManager.default.copyItem(atPath: store + "/payroll.service/db-password", toPath: store + "/payroll.service/api-token")
        since = Date()
        let moved = try load("payroll.service", "api-token")
        #expect(moved.status != 0 && moved.stdout.isEmpty)
        let failed = try record(["KMS_ACTION=Decrypt", "KMS_CREDENTIAL=payroll.service/api-token"], since: since)
        #expect(failed["KMS_ERROR"] as? String == "InvalidCiphertextException")

        // Not root: nothing written, the refusal audited with the real peer.
        since = Date()
        let notRoot = try load("payroll.service", "db-password", uid: 65534)
        #expect(notRoot.status != 0 && notRoot.stdout.isEmpty)
        let refused = try record(["KMS_ACTION=LoadCredential", "KMS_PEER_UID=65534"], since: since)
        #expect(refused["KMS_RESULT"] as? String == "Denied" && refused["KMS_ERROR"] as? String == "AccessDeniedException")

        // No such credential, and a peer without systemd's address: nothing, audited.
        since = Date()
        #expect(try load("payroll.service", "missing").stdout.isEmpty)
        let missing = try record(["KMS_ACTION=LoadCredential", "KMS_CREDENTIAL=payroll.service/missing"], since: since)
        #expect(missing["KMS_ERROR"] as? String == "NotFoundException")
        since = Date()
        let raw = try RawConnection(path: socket)
        #expect(raw.isClosedByPeer())
        let unnamed = try record(["KMS_ACTION=LoadCredential", "KMS_ERROR=ValidationException"], since: since)
        #expect(unnamed["KMS_PEER_UID"] as? String == "0")

        // None of these records holds the secret.
        let export = try run("/usr/bin/journalctl", ["-o", "export", "_PID=\(daemon.pid)"])
        let secretBytes = Array(Self.secret.utf8)
        let forms = [Self.secret, Data(secretBytes).base64EncodedString(), Hex.encode(secretBytes), Hex.encode(secretBytes).uppercased()]
        let leaked = forms.indices.filter { export.text.contains(forms[$0]) }.map { ["raw", "base64", "hex", "HEX"][$0] }
        #expect(leaked.isEmpty, "the secret is in the journal as \(leaked)")

        // delete-credential: served no more.
        #expect(try run(Paths.kmsctl, ["delete-credential", "--unit", "payroll.service", "--name", "db-password", "--credential-dir", store]).status == 0)
        #expect(try load("payroll.service", "db-password").stdout.isEmpty)
    }

    /// As kmsd.socket and kmsd-credentials.socket pass them: two listening fds, told apart by
    /// name.
    @Test(.enabled(if: isRoot, "needs root: the credential socket serves only uid 0"))
    func bothSocketsComeFromSocketActivation() async throws {
        let dir = try Paths.tempDir("activate2")
        let main = dir + "/kmsd.sock", socket = dir + "/credentials.sock", store = dir + "/creds", log = dir + "/log"
        let pid = try spawnDetached("/usr/bin/systemd-socket-activate",
                                    ["-l", main, "-l", socket, "--fdname=kmsd:credentials", Paths.kmsd, "--dev", "--state-dir", dir + "/state",
                                     "--admin-uid", "0", "--credential-dir", store], log: log)
        defer { kill(pid, SIGTERM) }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket), Date() < deadline { usleep(20_000) }
        let client = KMSClient(socketPath: main)
        let unit = #"{"Sid": "Unit", "Effect": "Allow", "Principal": {"Unit": "backup.service"}, "Action": "kms:Decrypt", "Resource": "*"}"#
        let key = try await client.createKey(policy: keyPolicy(unit)).keyID
        let put = try run(Paths.kmsctl, ["put-credential", "--unit", "backup.service", "--name", "token", "--key-id", key, "--credential-dir", store],
                          stdin: Data(Self.secret.utf8), env: ["KMSD_SOCKET": main])
        #expect(put.status == 0, "\(put.stderr)")
        let loaded = try run(Paths.kmsctl, ["load-credential", "--unit", "backup.service", "--name", "token", "--credential-socket", socket])
        let loadedTheSecret = loaded.text == Self.secret
        #expect(loaded.status == 0 && loadedTheSecret, "\(loaded.stderr)")
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(text.contains("serving on socket-activated fd, credentials on socket-activated fd"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/state/credentials.sock"), "kmsd bound no credential socket of its own")
    }

    @Test func namesThatAreNotSystemdsAreRefusedByKmsctl() throws {
        for (unit, name) in [("../etc", "x"), ("payroll.service", "../../root-key"), ("payroll", "x"), ("payroll.service", "")] {
            let r = try run(Paths.kmsctl, ["put-credential", "--unit", unit, "--name", name, "--key-id", "alias/x", "--credential-dir", "/tmp"])
            #expect(r.status != 0 && (r.stderr.contains("--unit") || r.stderr.contains("--name")), "\(unit) \(name): \(r.stderr)")
        }
    }
}
