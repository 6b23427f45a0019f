import ArgumentParser
import Foundation
import KMSClient

struct Audit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "kmsd's audit trail in journald.",
        subcommands: [AuditVerify.self])
}

/// One audit record as read from `journalctl -o json`.
struct JournalRecord {
    let fields: [String: String]
    var runID: String { fields["KMS_RUN_ID"] ?? "" }
    var seq: UInt64 { UInt64(fields["KMS_SEQ"] ?? "") ?? 0 }
    var chain: String { fields["KMS_CHAIN"] ?? "" }
    /// journald's receive time (µs since the epoch).
    var time: UInt64 { UInt64(fields["__REALTIME_TIMESTAMP"] ?? "") ?? 0 }

    /// The fields kmsd wrote (journald's own, `_` and `__` prefixed, left out).
    var written: [(name: String, value: String)] {
        fields.filter { !$0.key.hasPrefix("_") }.map { ($0.key, $0.value) }
    }

    /// kmsd's records from `journalctl -o json` lines (other lines and fields are skipped).
    static func parse(_ data: Data) -> [JournalRecord] {
        data.split(separator: UInt8(ascii: "\n")).compactMap { line in
            guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else { return nil }
            var fields: [String: String] = [:]
            for (k, v) in object {
                if let s = v as? String { fields[k] = s }
            }
            guard fields["KMS_RUN_ID"] != nil, fields["KMS_SEQ"] != nil, fields["KMS_CHAIN"] != nil else { return nil }
            return JournalRecord(fields: fields)
        }
    }
}

struct AuditVerify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check that no audit record was removed or altered (KMS_SEQ gap-free, KMS_CHAIN intact, runs linked).",
        discussion: """
        Reads kmsd's records from journald (journalctl; root or a member of systemd-journal), or from \
        --file (the output of journalctl -o json), and has kmsd check each record's KMS_CHAIN (its key \
        never leaves kmsd; administrators only). Follows the chain of runs back from kmsd's current run. \
        Exit status 0 when everything checks out, 1 at the first problem found.
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("since"), help: ArgumentHelp("Only records from this time (journalctl's --since syntax).", valueName: "time"))
    var since: String?

    @Option(name: .customLong("until"), help: ArgumentHelp("Only records up to this time.", valueName: "time"))
    var until: String?

    @Option(name: .customLong("file"), help: ArgumentHelp("Read records from this file (journalctl -o json output) instead of the journal.", valueName: "path"))
    var file: String?

    func run() async throws {
        let client = KMSClient(socketPath: global.socket)
        defer { Task { await client.close() } }
        let start = try await client.verifyAuditRecords([])
        var records = try readRecords()
        if file == nil {
            // journald may take a moment to show the newest records.
            for _ in 0..<10 where (records.filter { $0.runID == start.currentRunID }.map(\.seq).max() ?? 0) < start.currentSequence {
                try await Task.sleep(for: .milliseconds(300))
                records = try readRecords()
            }
        }
        var report = VerifyReport()
        try await verify(records, currentRun: start.currentRunID, currentSequence: file == nil ? start.currentSequence : 0,
                         client: client, report: &report)
        await client.close()
        if global.json {
            try printJSON(["Result": report.problems.isEmpty ? "OK" : "Failed", "Records": report.records, "Runs": report.runs,
                           "Problems": report.problems, "Warnings": report.warnings])
        } else {
            for w in report.warnings { writeStderr("kmsctl: warning: \(w)\n") }
            if report.problems.isEmpty {
                writeStdout("OK: \(report.records) records in \(report.runs) runs: none missing, none altered\n")
            } else {
                writeStdout("FAILED: \(report.problems[0])\n")
                for p in report.problems.dropFirst() { writeStdout("also: \(p)\n") }
            }
        }
        if !report.problems.isEmpty { throw ExitCode(1) }
    }

    func readRecords() throws -> [JournalRecord] {
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw ValidationError("--file: cannot read \(file)") }
            return JournalRecord.parse(data)
        }
        var args = ["-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=kmsd"]
        if let since { args += ["--since", since] }
        if let until { args += ["--until", until] }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/journalctl")
        process.arguments = args
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ValidationError("journalctl failed (\(errors.trimmingCharacters(in: .whitespacesAndNewlines))); run as root or a member of systemd-journal")
        }
        return JournalRecord.parse(data)
    }

    struct VerifyReport {
        var records = 0
        var runs = 0
        var problems: [String] = []
        var warnings: [String] = []
    }

    /// Orders records by run and sequence, finds gaps and broken links between runs, and has
    /// kmsd check every KMS_CHAIN it can (each against the record before it).
    func verify(_ all: [JournalRecord], currentRun: String, currentSequence: UInt64, client: KMSClient,
                report: inout VerifyReport) async throws {
        var byRun: [String: [UInt64: JournalRecord]] = [:]
        var order: [String] = []
        for r in all {
            if byRun[r.runID] == nil { order.append(r.runID) }
            if let seen = byRun[r.runID]?[r.seq], seen.fields != r.fields {
                report.problems.append("run \(r.runID) has two different records with KMS_SEQ \(r.seq)")
            }
            byRun[r.runID, default: [:]][r.seq] = r
        }
        guard !order.isEmpty else {
            report.problems.append("no kmsd audit records found")
            return
        }
        // The runs of this keystore: back from the current run (else the newest) by their links.
        var chain: [String] = []
        var next: String? = byRun[currentRun] != nil ? currentRun : order.last
        while let run = next, byRun[run] != nil, !chain.contains(run) {
            chain.insert(run, at: 0)
            next = byRun[run]?[1]?.fields["KMS_PREVIOUS_RUN_ID"]
        }
        if let missing = next, byRun[missing] == nil, let first = chain.first, let start = byRun[first]?[1] {
            // Named as the run before, yet absent: removed, unless everything read is newer
            // (the journal was rotated, or the window starts later).
            let startTime = start.time
            if all.contains(where: { !chain.contains($0.runID) && $0.time < startTime }) {
                report.problems.append("missing run: \(missing), which run \(first) names as the run before it, is not there although older records are")
            } else {
                report.warnings.append("run \(missing), before the oldest record read, is not in what was read (rotated away, or outside the window)")
            }
        }
        for run in order where !chain.contains(run) {
            report.warnings.append("run \(run) is not linked to this kmsd's chain (another keystore, or outside the window): not checked")
        }
        var batch: [(previousChain: [UInt8], fields: [(name: String, value: String)])] = []
        var labels: [String] = []
        func flush() async throws {
            guard !batch.isEmpty else { return }
            let result = try await client.verifyAuditRecords(batch)
            for (ok, label) in zip(result.valid, labels) where !ok { report.problems.append("altered record: \(label)") }
            batch.removeAll()
            labels.removeAll()
        }
        for (index, run) in chain.enumerated() {
            let records = byRun[run]!
            let seqs = records.keys.sorted()
            report.runs += 1
            report.records += seqs.count
            if seqs.first != 1 {
                if index == 0 {
                    report.warnings.append("run \(run) starts at KMS_SEQ \(seqs.first!) in what was read; its earlier records are not checked")
                } else {
                    report.problems.append("missing records: run \(run) KMS_SEQ 1...\(seqs.first! - 1)")
                }
            }
            var previous: JournalRecord? = nil
            for seq in seqs {
                let r = records[seq]!
                var prior: [UInt8]? = nil
                if seq == 1 {
                    let stop = r.fields["KMS_PREVIOUS_STOP"] ?? ""
                    prior = stop == "none" ? [UInt8](repeating: 0, count: 32) : r.fields["KMS_PREVIOUS_CHAIN"].flatMap(Self.unhex)
                    if prior == nil && stop != "none" { report.problems.append("run \(run) starts without a link to the run before") }
                } else if let p = previous, p.seq == seq - 1 {
                    prior = Self.unhex(p.chain)
                } else if let p = previous {
                    report.problems.append("missing records: run \(run) KMS_SEQ \(p.seq + 1)...\(seq - 1)")
                }
                if let prior {
                    batch.append((prior, r.written))
                    labels.append("run \(run) KMS_SEQ \(seq) (\(r.fields["KMS_ACTION"] ?? "?"))")
                    if batch.count >= 40 { try await flush() }
                }
                previous = r
            }
            // The link from this run's first record to the end of the run before.
            if let first = records[1], let before = first.fields["KMS_PREVIOUS_RUN_ID"], let earlier = byRun[before] {
                let stop = first.fields["KMS_PREVIOUS_STOP"] ?? ""
                let linkSeq = UInt64(first.fields["KMS_PREVIOUS_SEQ"] ?? "") ?? 0
                let lastSeq = earlier.keys.max() ?? 0
                if earlier[linkSeq]?.chain != first.fields["KMS_PREVIOUS_CHAIN"], lastSeq >= linkSeq {
                    report.problems.append("run \(run) links to KMS_SEQ \(linkSeq) of run \(before), which does not match")
                }
                if lastSeq < linkSeq {
                    report.problems.append("missing records: run \(before) KMS_SEQ \(lastSeq + 1)...\(linkSeq) (its end)")
                } else if stop == "clean", lastSeq > linkSeq {
                    report.problems.append("run \(before) has records after the end its successor recorded (KMS_SEQ \(linkSeq + 1)...\(lastSeq))")
                } else if stop == "unclean" {
                    report.warnings.append("run \(before) stopped uncleanly: its records after KMS_SEQ \(linkSeq) (its last checkpoint; \(lastSeq - linkSeq) present) cannot be proven complete")
                }
            }
            if run == currentRun, let last = seqs.last, last < currentSequence {
                report.problems.append("missing records: run \(run) KMS_SEQ \(last + 1)...\(currentSequence) (the newest, which kmsd wrote)")
            }
        }
        try await flush()
    }

    static func unhex(_ s: String) -> [UInt8]? {
        let u = Array(s.utf8)
        guard u.count == 64 else { return nil }
        var out: [UInt8] = []
        for i in stride(from: 0, to: 64, by: 2) {
            guard let b = UInt8(String(decoding: u[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            out.append(b)
        }
        return out
    }
}
