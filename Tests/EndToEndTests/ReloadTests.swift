import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// SIGHUP reads the configuration file again: what can change in place does (administrators,
/// rate limits, ...), what needs a restart is named and keeps its running value, and a file
/// that does not load changes nothing, logged and audited.
@Suite(.serialized)
struct ReloadTests {
    @Test(.enabled(if: isRoot, "needs root: runs kmsctl as another uid (setpriv)"))
    func sighupAppliesTheFileAndAnInvalidOneChangesNothing() async throws {
        try Journal.ensureRunning()
        let dir = try Paths.tempDir("reload")
        let config = dir + "/kmsd.json", socket = dir + "/kmsd.sock", log = dir + "/kmsd.log"
        func write(_ json: String) throws {
            try Data(json.utf8).write(to: URL(fileURLWithPath: config))
            chmod(config, 0o644)
        }
        try write(#"{"administrators": {"uids": [0]}, "maxRequestsPerSecondPerUid": 0, "socketMode": "0666"}"#)
        let kmsd = try launchKMSD(Paths.kmsd, ["--config", config, "--dev", "--state-dir", dir + "/state", "--socket", socket], log: log)
        defer { kill(kmsd.processIdentifier, SIGKILL); _ = kmsd.waitUntilExit() }
        let nobody: UInt32 = 65534
        func createKeyAsNobody() throws -> ProcessResult {
            try runAs(uid: nobody, [Paths.kmsctl, "create-key", "--description", "by nobody"], env: ["KMSD_SOCKET": socket])
        }
        /// Sends `n` requests: how many were throttled; every other one must succeed.
        func throttled(_ n: Int) async -> Int {
            let client = KMSClient(socketPath: socket)
            var count = 0
            for _ in 0..<n {
                do { _ = try await client.generateRandom(numberOfBytes: 8) } catch let e as KMSError where e.code == .throttling { count += 1 } catch {
                    Issue.record("a request failed otherwise: \(error)")
                }
            }
            await client.close()
            return count
        }
        func reload(_ action: String) throws -> [String: Any] {
            let since = Date()
            kill(kmsd.processIdentifier, SIGHUP)
            return try #require(Journal.query(["MESSAGE_ID=\(JournalIDs.event)", "KMS_ACTION=\(action)", "_PID=\(kmsd.processIdentifier)"],
                                              since: since, atLeast: 1).last)
        }

        let before = try createKeyAsNobody()
        #expect(before.status != 0 && before.stderr.contains("AccessDeniedException"), "\(before.stderr)")
        #expect(await throttled(10) == 0)

        // nobody becomes an administrator, requests are limited to 2 a second, and the socket
        // mode (which needs a restart) changes too.
        try write(#"{"administrators": {"uids": [0, 65534]}, "maxRequestsPerSecondPerUid": 2, "requestBurstPerUid": 2, "socketMode": "0660"}"#)
        let applied = try reload("ConfigurationReloaded")
        #expect(applied["KMS_SETTINGS_CHANGED"] as? String == "administrators,maxRequestsPerSecondPerUid,requestBurstPerUid")
        #expect(applied["KMS_SETTINGS_NEED_RESTART"] as? String == "socketMode")
        #expect((applied["MESSAGE"] as? String ?? "").contains("need a restart (running values kept): socketMode"))
        let after = try createKeyAsNobody()
        #expect(after.status == 0, "\(after.stderr)")
        let limited = await throttled(10)
        #expect(limited >= 5, "\(limited) of 10 throttled at 2 a second")
        var st = stat()
        #expect(stat(socket, &st) == 0 && st.st_mode & 0o777 == 0o666, "the socket keeps its mode until a restart")

        // An invalid file changes nothing: nobody stays an administrator, the limit stays.
        try write(#"{"administrators": {"uids": "everyone"}}"#)
        let failed = try reload("ConfigurationReloadFailed")
        #expect(failed["KMS_RESULT"] as? String == "Failed" && failed["PRIORITY"] as? String == "3")
        #expect((failed["MESSAGE"] as? String ?? "").contains("administrators.uids"), "\(failed["MESSAGE"] ?? "")")
        sleep(1)
        #expect(try createKeyAsNobody().status == 0)
        #expect(await throttled(10) >= 5)
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(text.contains("configuration not reloaded, the running one stays"), "\(text)")

        // A value out of its range is refused as at start; so is a file others may write.
        try write(#"{"administrators": {"uids": [0]}, "frameTimeoutSeconds": 0}"#)
        let outOfRange = try reload("ConfigurationReloadFailed")
        #expect((outOfRange["MESSAGE"] as? String ?? "").contains("frameTimeoutSeconds must be 1...3600"), "\(outOfRange["MESSAGE"] ?? "")")
        try write(#"{"administrators": {"uids": [0]}}"#)
        chmod(config, 0o666)
        let writable = try reload("ConfigurationReloadFailed")
        #expect((writable["MESSAGE"] as? String ?? "").contains("writable by group or others"), "\(writable["MESSAGE"] ?? "")")
        sleep(1)
        #expect(try createKeyAsNobody().status == 0, "nobody is still an administrator")
        let refused = try run(Paths.kmsd, ["--config", config, "--dev", "--state-dir", dir + "/state2", "--socket", dir + "/k2.sock"])
        #expect(refused.status != 0 && refused.stderr.contains("configuration file \(config) is writable by group or others"), "\(refused.stderr)")

        // Back to the first file: nobody is denied again, nothing is throttled.
        try write(#"{"administrators": {"uids": [0]}, "maxRequestsPerSecondPerUid": 0, "socketMode": "0666"}"#)
        let back = try reload("ConfigurationReloaded")
        #expect(back["KMS_SETTINGS_NEED_RESTART"] as? String == "")
        let denied = try createKeyAsNobody()
        #expect(denied.status != 0 && denied.stderr.contains("AccessDeniedException"), "\(denied.stderr)")
        #expect(await throttled(10) == 0)
    }

    /// SIGHUP while a client has requests in flight: every request is answered once, in full,
    /// and none fails because of the reloads.
    @Test func sighupWithRequestsInFlightLosesNothing() throws {
        let dir = try Paths.tempDir("reload-flight")
        let config = dir + "/kmsd.json", socket = dir + "/kmsd.sock"
        try Data(#"{"administrators": {"uids": [0, \#(getuid())]}, "maxRequestsPerSecondPerUid": 0}"#.utf8).write(to: URL(fileURLWithPath: config))
        chmod(config, 0o644)
        let kmsd = try launchKMSD(Paths.kmsd, ["--config", config, "--dev", "--state-dir", dir + "/state", "--socket", socket], log: dir + "/kmsd.log")
        defer { kill(kmsd.processIdentifier, SIGTERM); _ = kmsd.waitUntilExit() }
        let raw = try RawConnection(path: socket, receiveTimeoutSeconds: 20)
        let count = 400
        var answered = [UInt64: Int]()
        for round in 0..<4 {
            for i in 0..<count / 4 {
                try raw.send(.with(id: UInt64(round * 1000 + i + 1), .generateRandom(.with { $0.numberOfBytes = 16 })))
            }
            kill(kmsd.processIdentifier, SIGHUP)
        }
        for _ in 0..<count {
            let r = try #require(try raw.receive(), "a request was not answered")
            #expect(r.kmsError == nil, "\(r.kmsError?.message ?? "")")
            if case .generateRandom(let g)? = r.result { #expect(g.plaintext.count == 16) } else { Issue.record("not a GenerateRandom answer") }
            answered[r.id, default: 0] += 1
        }
        #expect(answered.count == count && answered.values.allSatisfy { $0 == 1 })
        let log = (try? String(contentsOfFile: dir + "/kmsd.log", encoding: .utf8)) ?? ""
        #expect(log.components(separatedBy: "SIGHUP: configuration reloaded").count >= 2, "\(log)")
    }
}
