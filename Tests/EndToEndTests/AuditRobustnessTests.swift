import Foundation
import Glibc
import KMSClient
import Testing

/// journald as an adversary: one that rate-limits kmsd's cgroup, and one that stops reading.
@Suite(.serialized, .enabled(if: isRoot, "needs root for cgroups, mount namespaces and a private journald"))
struct AuditRobustnessTests {
    /// Where the cgroup v2 hierarchy is mounted (journald derives the unit from it).
    static func cgroup2Root() -> String? {
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return nil }
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count > 2, f[2] == "cgroup2" { return String(f[1]) }
        }
        return nil
    }

    /// kmsd runs in a cgroup named like a unit, and journald is told (the way systemd tells it
    /// for LogRateLimitBurst=) to take at most a small burst per second from that unit. A flood
    /// of requests then loses records inside journald, although every send succeeded: each
    /// surviving record's KMS_SEQ shows exactly which ones are missing.
    @Test func recordsJournaldDropsLeaveAVisibleGap() throws {
        try Journal.ensureRunning()
        let root = try #require(Self.cgroup2Root(), "no cgroup2 hierarchy mounted")
        let unit = "kmsd-ratelimit-\(UUID().uuidString.prefix(8).lowercased()).service"
        let cgroup = root + "/" + unit
        try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: false)
        defer { rmdir(cgroup) }
        try FileManager.default.createDirectory(atPath: "/run/systemd/units", withIntermediateDirectories: true)
        let burstLink = "/run/systemd/units/log-rate-limit-burst:\(unit)"
        let intervalLink = "/run/systemd/units/log-rate-limit-interval:\(unit)"
        symlink("5", burstLink)
        symlink("1000000", intervalLink)
        defer { unlink(burstLink); unlink(intervalLink) }

        let dir = try Paths.tempDir("ratelimit")
        let log = dir + "/log"
        let kmsdArgs = ["--dev", "--state-dir", dir + "/state", "--audit-fail-closed", "true",
                        "--max-requests-per-second-per-uid", "0"].map { "'\($0)'" }.joined(separator: " ")
        let p = try launchKMSD("/bin/sh", ["-c", "echo $$ > '\(cgroup)/cgroup.procs' && exec '\(Paths.kmsd)' \(kmsdArgs)"], log: log)
        defer { kill(p.processIdentifier, SIGTERM); p.waitUntilExit() }
        let started = Date()

        let flood = 400
        let raw = try RawConnection(path: dir + "/state/kmsd.sock")
        var answered = 0
        for batch in stride(from: 1, through: flood, by: 50) {
            for id in batch..<batch + 50 { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 8 }))) }
            for _ in 0..<50 { if try raw.receive()?.kmsError == nil { answered += 1 } }
        }
        #expect(answered == flood, "journald accepted every send, so every request succeeded")
        // After journald's interval, one more request: its record survives and carries the
        // total count, so even a gap at the end of the flood is visible.
        sleep(2)
        try raw.send(.with(id: 9999, .hello(.init())))
        #expect(try raw.receive()?.id == 9999)

        let records = try Journal.records(pid: p.processIdentifier, since: started, atLeast: flood + 1, timeout: 3)
        let runs = Set(records.compactMap { $0["KMS_RUN_ID"] as? String })
        #expect(runs.count == 1, "one run id per daemon start")
        let seqs = records.compactMap { ($0["KMS_SEQ"] as? String).flatMap(UInt64.init) }
        #expect(seqs.count == records.count, "every record carries KMS_SEQ")
        #expect(Set(seqs).count == seqs.count, "sequence numbers are unique")
        let last = try #require(records.first { $0["KMS_ACTION"] as? String == "Hello" })
        // KMS_SEQ 1 is the run's KmsdStarted record; the requests follow.
        #expect(last["KMS_SEQ"] as? String == "\(flood + 2)", "the last record counts every record before it")
        let missing = Set(1...UInt64(flood + 2)).subtracting(seqs)
        #expect(missing.count == flood + 2 - records.count, "each lost record is a missing sequence number")
        // The point of the setup: journald really did drop records here.
        #expect(!missing.isEmpty, "journald dropped nothing; the rate limit was not in effect (records: \(records.count))")
    }

    /// A journald that stops reading (SIGSTOP) must not hang kmsd: requests get an answer,
    /// AuditUnavailableException once the record cannot be handed over in time, and service
    /// resumes when journald does.
    @Test func aStoppedJournaldFailsRequestsInsteadOfHangingThem() throws {
        let dir = try Paths.tempDir("stopped-journald")
        let script = """
        set -e
        mkdir -p /run/systemd/journal /run/log
        mount -t tmpfs tmpfs /run/systemd/journal
        mount -t tmpfs tmpfs /run/log
        mount -t tmpfs tmpfs /var/log
        /lib/systemd/systemd-journald > /dev/null 2>&1 &
        echo $! > "$1/journald.pid"
        for i in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
        exec "$2" --dev --state-dir "$1/state" --audit-fail-closed true --audit-timeout-ms 200
        """
        try script.write(toFile: dir + "/run.sh", atomically: true, encoding: .utf8)
        let p = try launchKMSD("/usr/bin/unshare", ["-m", "--propagation", "private", "/bin/sh", dir + "/run.sh", dir, Paths.kmsd],
                               log: dir + "/log")
        let journald = try #require(Int32((try String(contentsOfFile: dir + "/journald.pid", encoding: .utf8))
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        defer {
            kill(p.processIdentifier, SIGTERM); p.waitUntilExit()
            kill(journald, SIGCONT); kill(journald, SIGKILL)
        }
        let socket = dir + "/state/kmsd.sock"
        let raw = try RawConnection(path: socket, receiveTimeoutSeconds: 10)
        try raw.send(.with(id: 1, .hello(.init())))
        #expect(try raw.receive()?.kmsError == nil)

        kill(journald, SIGSTOP)
        // More records than any datagram queue holds (net.unix.max_dgram_qlen is 512 by
        // default, and the sender's buffer fills sooner), whatever the records' size.
        let count = 600
        for id in 2..<2 + count { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 8 }))) }
        var ids = Set<UInt64>(), refused = 0
        for _ in 0..<count {
            let r = try #require(try raw.receive(), "a request hung while journald was stopped")
            ids.insert(r.id)
            if r.kmsError?.code == .auditUnavailable { refused += 1 }
        }
        #expect(ids == Set((2..<2 + count).map(UInt64.init)), "every request got its own answer")
        #expect(refused > 0, "journald's queue is short; some records cannot have been handed over")
        // Another client, Hello included, is answered promptly (not queued behind a hung send).
        let other = try RawConnection(path: socket, receiveTimeoutSeconds: 5)
        try other.send(.with(id: 7, .hello(.init())))
        let hello = try #require(try other.receive(), "Hello hung while journald was stopped")
        #expect(hello.id == 7)

        kill(journald, SIGCONT)
        var recovered = false
        for attempt in 0..<50 where !recovered {
            try other.send(.with(id: UInt64(100 + attempt), .hello(.init())))
            recovered = try other.receive()?.kmsError == nil
            if !recovered { usleep(100_000) }
        }
        #expect(recovered, "requests succeed again once journald reads again")
    }
}
