import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// kmsctl audit: filters by key (id or alias), caller and result; --json with AWS-style names;
/// --follow; and the per-key, per-caller report.
@Suite(.serialized, .enabled(if: isRoot, "needs root for another uid and the journal"))
final class AuditQueryTests {
    let daemon: Daemon
    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon()
    }
    deinit { daemon.stop() }

    func kmsctl(_ args: [String]) throws -> ProcessResult { try run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket]) }

    func lines(_ r: ProcessResult) -> [[String: Any]] {
        r.text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    @Test func queryFiltersAndReports() async throws {
        let since = "@\(Int(daemon.startedAt.timeIntervalSince1970))"
        let c = daemon.client()
        let key = try await c.createKey().keyID
        let other = try await c.createKey().keyID
        try await c.createAlias(aliasName: "alias/queried", targetKeyID: key)
        for _ in 0..<2 { _ = try await c.encrypt(keyID: key, plaintext: [1]) }
        _ = try await c.encrypt(keyID: other, plaintext: [1])
        await c.close()
        let denied = try runAs(uid: 64201, [Paths.kmsctl, "encrypt", "--key-id", key], stdin: Data("x".utf8), env: ["KMSD_SOCKET": daemon.socket])
        #expect(denied.stderr.contains("AccessDeniedException"))
        _ = try Journal.records(pid: daemon.pid, since: daemon.startedAt, atLeast: 8)

        let byKey = lines(try kmsctl(["audit", "--key-id", key, "--json", "--since", since, "--action", "Encrypt"]))
        #expect(byKey.count == 3 && byKey.allSatisfy { $0["KeyId"] as? String == key && $0["EventName"] as? String == "Encrypt" }, "\(byKey.count)")
        let byAlias = lines(try kmsctl(["audit", "--key-id", "alias/queried", "--json", "--since", since, "--action", "Encrypt"]))
        #expect(byAlias.count == 3, "an alias finds its key's records")
        let bobs = lines(try kmsctl(["audit", "--uid", "64201", "--json", "--since", since]))
        #expect(bobs.count == 1 && bobs[0]["Result"] as? String == "Denied" && bobs[0]["ErrorCode"] as? String == "AccessDeniedException")
        #expect((bobs[0]["UserIdentity"] as? [String: Any])?["Uid"] as? Int == 64201 && bobs[0]["DecidedBy"] as? String == "implicit-deny")
        #expect(lines(try kmsctl(["audit", "--result", "Denied", "--json", "--since", since])).count == 1)
        let table = try kmsctl(["audit", "--key-id", key, "--since", since])
        #expect(table.status == 0 && table.text.contains("Encrypt") && table.text.contains("AccessDeniedException"), "\(table.stderr)")

        let report = try kmsctl(["audit", "report", "--since", since, "--json"])
        let r = try #require(try JSONSerialization.jsonObject(with: report.stdout) as? [String: Any], "\(report.stderr)")
        let perKey = try #require(r["ByKey"] as? [String: [String: Int]])
        #expect(perKey[key]?["Encrypt/Allowed"] == 2 && perKey[key]?["Encrypt/Denied"] == 1 && perKey[other]?["Encrypt/Allowed"] == 1)
        let perCaller = try #require(r["ByCaller"] as? [String: [String: Int]])
        #expect(perCaller.first { $0.key.hasPrefix("uid:64201") }?.value["Encrypt/Denied"] == 1)
    }

    @Test func followShowsNewRecords() async throws {
        let out = daemon.stateDir + "-follow.json"
        let follower = try ChildProcess(Paths.kmsctl, ["audit", "--follow", "--json", "--action", "GenerateRandom"],
                                        env: ["KMSD_SOCKET": daemon.socket], stdin: "/dev/null", stdout: out, stderr: out + ".err")
        defer { kill(follower.processIdentifier, SIGTERM); _ = follower.waitUntilExit() }
        usleep(500_000)
        let c = daemon.client()
        _ = try await c.generateRandom(numberOfBytes: 8)
        await c.close()
        var seen = ""
        for _ in 0..<50 {
            seen = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            if seen.contains("GenerateRandom") { break }
            usleep(100_000)
        }
        #expect(seen.contains("\"EventName\":\"GenerateRandom\""), "\(seen)")
    }
}
