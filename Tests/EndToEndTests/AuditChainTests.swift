import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// Tamper evidence: KMS_SEQ without gaps and KMS_CHAIN keyed from the root key, across a clean
/// restart and a SIGKILL; `kmsctl audit verify` says OK for the real trail and names the first
/// problem of each doctored copy (a record removed, one altered, a run's end cut, a run removed).
@Suite(.serialized, .enabled(if: isRoot, "reads the journal and may start a private journald"))
final class AuditChainTests {
    init() throws { try Journal.ensureRunning() }

    func verify(_ daemon: Daemon, _ args: [String]) throws -> (status: Int32, json: [String: Any]) {
        let r = try run(Paths.kmsctl, ["audit", "verify", "--json"] + args, env: ["KMSD_SOCKET": daemon.socket])
        let json = (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
        return (r.status, json)
    }

    @Test func verifyAcceptsTheTrailAndCatchesEachTampering() async throws {
        let started = Date()
        let daemon = try Daemon()
        defer { daemon.stop() }
        var pids = [daemon.pid]
        func work(_ n: Int) async throws {
            let c = daemon.client()
            let key = try await c.createKey().keyID
            for i in 0..<n { _ = try await c.encrypt(keyID: key, plaintext: [UInt8(i)], context: ["n": "\(i)"]) }
            await expectKMSError(.notFound) { try await c.describeKey(keyID: UUID().uuidString) }
            await c.close()
        }
        try await work(5)
        try daemon.restart()           // clean stop: KmsdStopped, then a checkpoint marked clean
        pids.append(daemon.pid)
        try await work(6)
        daemon.kill9()                 // unclean: the next start says so
        try daemon.restart()
        pids.append(daemon.pid)
        try await work(4)

        let live = try verify(daemon, ["--since", "@\(Int(started.timeIntervalSince1970))"])
        #expect(live.status == 0 && live.json["Result"] as? String == "OK", "\(live.json)")
        #expect((live.json["Runs"] as? Int ?? 0) >= 3)
        #expect((live.json["Warnings"] as? [String])?.contains { $0.contains("stopped uncleanly") } == true, "\(live.json)")

        // The same trail exported, then doctored in copies.
        let export = try run("/usr/bin/journalctl", ["-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=kmsd"] + pids.map { "_PID=\($0)" }
                             + ["--since", "@\(Int(started.timeIntervalSince1970))"])
        var lines = export.text.split(separator: "\n").map(String.init)
        let dir = try Paths.tempDir("audit-chain")
        func check(_ doctored: [String], _ expected: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let path = dir + "/trail-\(UUID().uuidString.prefix(6)).json"
            try doctored.joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
            let r = try verify(daemon, ["--file", path])
            let problems = r.json["Problems"] as? [String] ?? []
            #expect(r.status == 1 && problems.first?.contains(expected) == true, "\(problems)", sourceLocation: sourceLocation)
        }
        func object(_ line: String) -> [String: Any] { (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]) ?? [:] }
        let untouched = try verify(daemon, ["--file", { let p = dir + "/all.json"; try? lines.joined(separator: "\n").write(toFile: p, atomically: true, encoding: .utf8); return p }()])
        #expect(untouched.status == 0, "\(untouched.json)")

        let runs = lines.map { object($0)["KMS_RUN_ID"] as? String ?? "" }
        let runIDs = runs.reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        try #require(runIDs.count == 3)
        // A record removed from the middle of the second run.
        let middle = try #require(lines.indices.first { runs[$0] == runIDs[1] && object(lines[$0])["KMS_SEQ"] as? String == "4" })
        var removed = lines
        removed.remove(at: middle)
        try check(removed, "missing records: run \(runIDs[1]) KMS_SEQ 4...4")
        // A record altered: another key id.
        var altered = lines
        let target = try #require(lines.indices.first { runs[$0] == runIDs[2] && object(lines[$0])["KMS_ACTION"] as? String == "Encrypt" })
        var record = object(lines[target])
        record["KMS_KEY_ID"] = UUID().uuidString.lowercased()
        altered[target] = String(decoding: try JSONSerialization.data(withJSONObject: record), as: UTF8.self)
        try check(altered, "altered record: run \(runIDs[2])")
        // The end of the cleanly stopped first run cut off.
        let lastOfFirst = try #require(lines.indices.last { runs[$0] == runIDs[0] })
        var cut = lines
        cut.remove(at: lastOfFirst)
        try check(cut, "missing records: run \(runIDs[0])")
        // The first record of the second run removed: the first run is cut off from the chain.
        let startOfSecond = try #require(lines.indices.first { runs[$0] == runIDs[1] && object(lines[$0])["KMS_SEQ"] as? String == "1" })
        var headless = lines
        headless.remove(at: startOfSecond)
        try check(headless, "unlinked run: \(runIDs[0])")
        // The whole second run removed.
        try check(lines.enumerated().filter { runs[$0.offset] != runIDs[1] }.map(\.element), "missing run: \(runIDs[1])")
        lines.removeAll()

        // Only administrators may have the chain checked.
        let bob = try runAs(uid: 64201, [Paths.kmsctl, "audit", "verify", "--file", dir + "/all.json"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(bob.status != 0 && bob.stderr.contains("AccessDeniedException"), "\(bob.stderr)")
    }

    /// kmsd's current run wrote records, yet none is in the journal (here they went to another
    /// socket, as if every one had been removed): verify, reading up to now, says so instead of
    /// checking only the runs it found.
    @Test func aCurrentRunWithNoRecordInTheJournalIsAProblem() async throws {
        let dir = try Paths.tempDir("audit-elsewhere")
        let sink = dir + "/sink.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(sink.utf8)) }
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        try #require(bound == 0)
        let daemon = try Daemon(arguments: ["--dev-audit-socket", sink])
        defer { daemon.stop() }
        let c = daemon.client()
        _ = try await c.createKey()
        await c.close()
        // From a second before kmsd started (the whole run is in the window; older records of
        // other tests are not read).
        let r = try verify(daemon, ["--since", "@\(Int(daemon.startedAt.timeIntervalSince1970) - 1)"])
        let problems = r.json["Problems"] as? [String] ?? []
        #expect(r.status == 1 && problems.contains { $0.contains("kmsd's current run") && $0.contains("none is in the journal") }, "\(r.json)")
    }
}
