import ArgumentParser
import Foundation
import KMSClient

struct Audit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "kmsd's audit trail in journald: query it, report on it, verify it.",
        subcommands: [AuditQuery.self, AuditReport.self, AuditVerify.self],
        defaultSubcommand: AuditQuery.self)
}

/// Filters shared by `kmsctl audit` and `kmsctl audit report`, as journal field matches
/// (applied by sd_journal with the journal's field indexes, so a large journal costs what the
/// answer costs).
struct AuditFilters: ParsableArguments {
    @Option(name: .customLong("key-id"), help: ArgumentHelp("Records of this key (key id, ARN or alias).", valueName: "id"))
    var keyID: String?
    @Option(name: .customLong("uid"), help: ArgumentHelp("Records of this caller uid.", valueName: "n"))
    var uid: UInt32?
    @Option(name: .customLong("user"), help: ArgumentHelp("Records of this caller user name.", valueName: "name"))
    var user: String?
    @Option(name: .customLong("unit"), help: ArgumentHelp("Records of callers in this systemd unit.", valueName: "unit"))
    var unit: String?
    @Option(name: .customLong("executable"), help: ArgumentHelp("Records of callers running this executable.", valueName: "path"))
    var executable: String?
    @Option(name: .customLong("action"), help: ArgumentHelp("Records of this operation or event (Encrypt, KeyCreated, Alarm, ...).", valueName: "name"))
    var action: String?
    @Option(name: .customLong("result"), help: ArgumentHelp("Allowed, Denied or Failed.", valueName: "result"))
    var result: String?
    @Option(name: .customLong("since"), help: ArgumentHelp("From this time (journalctl's syntax: \"today\", \"2026-12-01 10:00\", \"1 hour ago\", \"@UNIX\"; write a leading - as --since=-1h).", valueName: "time"))
    var since: String?
    @Option(name: .customLong("until"), help: ArgumentHelp("Up to this time (the same syntax).", valueName: "time"))
    var until: String?

    func validate() throws {
        if let result, !["Allowed", "Denied", "Failed"].contains(result) { throw ValidationError("--result takes Allowed, Denied or Failed") }
        _ = try timeWindow()
    }

    /// --since and --until in µs since the epoch.
    func timeWindow() throws -> (since: UInt64?, until: UInt64?) {
        try (auditTime(since, "--since"), auditTime(until, "--until"))
    }

    /// The journal query; an alias is resolved to its key through kmsd when possible.
    func journalQuery(socket: String, follow: Bool = false) async throws -> JournalQuery {
        var args = ["SYSLOG_IDENTIFIER=kmsd"]
        if let keyID {
            if keyID.hasPrefix("alias/") || keyID.contains(":alias/") {
                let client = KMSClient(socketPath: socket)
                if let id = try? await client.describeKey(keyID: keyID).keyID { args.append("KMS_KEY_ID=\(id)") } else {
                    args.append("KMS_ALIAS=\(keyID.hasPrefix("alias/") ? keyID : "alias/" + keyID.components(separatedBy: ":alias/").last!)")
                }
                await client.close()
            } else {
                args.append("KMS_KEY_ID=\(keyID.hasPrefix("kmsd:key/") ? String(keyID.dropFirst("kmsd:key/".count)) : keyID.lowercased())")
            }
        }
        if let uid { args.append("KMS_PEER_UID=\(uid)") }
        if let user { args.append("KMS_PEER_USER=\(user)") }
        if let unit { args.append("KMS_PEER_UNIT=\(unit)") }
        if let executable { args.append("KMS_PEER_EXE=\(executable)") }
        if let action { args.append("KMS_ACTION=\(action)") }
        if let result { args.append("KMS_RESULT=\(result)") }
        let window = try timeWindow()
        return JournalQuery(matches: args, since: window.since, until: window.until, follow: follow)
    }
}

/// A --since or --until value in µs since the epoch (nil when not given).
func auditTime(_ text: String?, _ option: String) throws -> UInt64? {
    guard let text else { return nil }
    guard let t = JournalTime.parse(text) else {
        throw ValidationError("\(option): cannot read '\(text)' as a time (e.g. \"2026-12-01 10:00\", \"today\", \"1 hour ago\", \"-30min\", \"@1764547200\")")
    }
    return t
}

struct AuditQuery: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "query",
        abstract: "Show kmsd's audit records (the default: kmsctl audit --key-id K ...).",
        discussion: "Reads the journal through sd_journal (root or a member of systemd-journal). --json prints one object per line.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var filters: AuditFilters

    @Flag(name: .customLong("follow"), help: "Keep printing new records as they come.")
    var follow = false

    func run() async throws {
        let query = try await filters.journalQuery(socket: global.socket, follow: follow)
        if !global.json {
            writeStdout("TIME                 ACTION                RESULT   ERROR                        KEY                                   CALLER           DECIDED BY\n")
        }
        try readJournal(query) { r in
            if global.json {
                let data = try JSONSerialization.data(withJSONObject: r.awsStyle, options: [.sortedKeys, .withoutEscapingSlashes])
                writeStdout(data)
                writeStdout("\n")
            } else {
                let f = r.fields
                func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
                writeStdout(pad(r.timeText, 21) + pad(f["KMS_ACTION"] ?? "", 22) + pad(f["KMS_RESULT"] ?? "", 9) + pad(f["KMS_ERROR"] ?? "", 29)
                            + pad(f["KMS_KEY_ID"] ?? "", 38) + pad("\(f["KMS_PEER_UID"] ?? "")(\(f["KMS_PEER_USER"] ?? ""))", 17)
                            + (f["KMS_DECIDED_BY"] ?? "") + "\n")
            }
        }
    }
}

struct AuditReport: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Counts of requests per key and per caller, by action and result, for the regular review.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var filters: AuditFilters

    func run() async throws {
        var query = try await filters.journalQuery(socket: global.socket)
        query.matches.append("MESSAGE_ID=\(JournalRecord.requestMessageID)")
        query.fields = ["KMS_RESULT", "KMS_KEY_ID", "KMS_PEER_UID", "KMS_PEER_USER"]
        var byKey: [String: [String: Int]] = [:], byCaller: [String: [String: Int]] = [:]
        var total = 0
        try readJournal(query) { r in
            let f = r.fields
            let cell = "\(f["KMS_ACTION"] ?? "?")/\(f["KMS_RESULT"] ?? "?")"
            if let key = f["KMS_KEY_ID"], !key.isEmpty, key != "invalid" { byKey[key, default: [:]][cell, default: 0] += 1 }
            byCaller["uid:\(f["KMS_PEER_UID"] ?? "?") (\(f["KMS_PEER_USER"] ?? ""))", default: [:]][cell, default: 0] += 1
            total += 1
        }
        if global.json {
            try printJSON(["Requests": total, "ByKey": byKey, "ByCaller": byCaller])
            return
        }
        writeStdout("\(total) requests\n\nBy key:\n")
        printColumns(headers: ["KeyId", "Action/Result", "Count"], rows: byKey.sorted { $0.key < $1.key }.flatMap { k, cells in
            cells.sorted { $0.key < $1.key }.map { [k, $0.key, String($0.value)] }
        })
        writeStdout("\nBy caller:\n")
        printColumns(headers: ["Caller", "Action/Result", "Count"], rows: byCaller.sorted { $0.key < $1.key }.flatMap { c, cells in
            cells.sorted { $0.key < $1.key }.map { [c, $0.key, String($0.value)] }
        })
    }
}

/// One audit record, as read from the journal or from `journalctl -o json` output.
struct JournalRecord {
    let fields: [String: String]

    /// A kmsd record from an entry's fields (nil for anything else, and when `requireChain`,
    /// for records without KMS_RUN_ID, KMS_SEQ and KMS_CHAIN).
    init?(fields: [String: String], requireChain: Bool) {
        guard fields["KMS_ACTION"] != nil,
              !requireChain || (fields["KMS_RUN_ID"] != nil && fields["KMS_SEQ"] != nil && fields["KMS_CHAIN"] != nil) else { return nil }
        self.fields = fields
    }
    var runID: String { fields["KMS_RUN_ID"] ?? "" }
    var seq: UInt64 { UInt64(fields["KMS_SEQ"] ?? "") ?? 0 }
    var chain: String { fields["KMS_CHAIN"] ?? "" }
    /// journald's receive time (µs since the epoch).
    var time: UInt64 { UInt64(fields["__REALTIME_TIMESTAMP"] ?? "") ?? 0 }

    /// The fields kmsd wrote (journald's own, `_` and `__` prefixed, left out).
    var written: [(name: String, value: String)] {
        fields.filter { !$0.key.hasPrefix("_") }.map { ($0.key, $0.value) }
    }

    static let requestMessageID = "3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31"

    var timeText: String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: Date(timeIntervalSince1970: Double(time) / 1_000_000))
    }

    /// The record with AWS-style field names (for --json).
    var awsStyle: [String: Any] {
        let f = fields
        var identity: [String: Any] = [:]
        for (name, field) in [("Uid", "KMS_PEER_UID"), ("Gid", "KMS_PEER_GID"), ("Pid", "KMS_PEER_PID")] {
            if let v = f[field].flatMap({ Int($0) }) { identity[name] = v }
        }
        for (name, field) in [("User", "KMS_PEER_USER"), ("Executable", "KMS_PEER_EXE"), ("Unit", "KMS_PEER_UNIT"), ("Unresolved", "KMS_PEER_UNRESOLVED")] {
            if let v = f[field], !v.isEmpty { identity[name] = v }
        }
        var out: [String: Any] = ["EventTime": timeText, "EventName": f["KMS_ACTION"] ?? "", "Result": f["KMS_RESULT"] ?? "",
                                  "UserIdentity": identity, "Message": f["MESSAGE"] ?? ""]
        for (name, field) in [("ErrorCode", "KMS_ERROR"), ("KeyId", "KMS_KEY_ID"), ("Alias", "KMS_ALIAS"), ("DecidedBy", "KMS_DECIDED_BY"),
                              ("EncryptionContextKeys", "KMS_ENCRYPTION_CONTEXT"), ("GrantId", "KMS_GRANT_ID"), ("Alarm", "KMS_ALARM"),
                              ("RunId", "KMS_RUN_ID"), ("Chain", "KMS_CHAIN"), ("SourceKeyId", "KMS_SOURCE_KEY_ID")] {
            if let v = f[field], !v.isEmpty { out[name] = v }
        }
        for (name, field) in [("KeyVersion", "KMS_KEY_VERSION"), ("RequestId", "KMS_REQUEST_ID"), ("DurationMicros", "KMS_DURATION_US"),
                              ("Sequence", "KMS_SEQ")] {
            if let v = f[field].flatMap({ UInt64($0) }) { out[name] = v }
        }
        out["Kind"] = f["MESSAGE_ID"] == Self.requestMessageID ? "Request" : (f["KMS_ALARM"] != nil ? "Alarm" : "Event")
        return out
    }

    /// kmsd's records from `journalctl -o json` lines (other lines and fields are skipped).
    static func parse(_ data: Data, requireChain: Bool = true) -> [JournalRecord] {
        data.split(separator: UInt8(ascii: "\n")).compactMap { line in
            guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else { return nil }
            var fields: [String: String] = [:]
            for (k, v) in object {
                if let s = v as? String { fields[k] = s }
                // journalctl prints values with control characters or invalid UTF-8 as byte arrays.
                else if let bytes = v as? [Int], bytes.allSatisfy({ (0...255).contains($0) }) {
                    fields[k] = String(decoding: bytes.map { UInt8($0) }, as: UTF8.self)
                }
            }
            return JournalRecord(fields: fields, requireChain: requireChain)
        }
    }
}

struct AuditVerify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check that no audit record was removed or altered (KMS_SEQ gap-free, KMS_CHAIN intact, runs linked).",
        discussion: """
        Reads kmsd's records from journald (sd_journal; root or a member of systemd-journal), or from \
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
        // Whether the window holds kmsd's whole current run: without --since, or with one
        // before the run began (Status asked only then).
        var currentRunInWindow = true
        if file == nil, until == nil, let since = try auditTime(since, "--since") {
            currentRunInWindow = since <= UInt64(max(0, try await client.status().startedAt)) * 1_000_000
        }
        var records = try readRecords()
        if file == nil && until == nil {
            // journald may take a moment to show the newest records.
            for _ in 0..<10 where (records.filter { $0.runID == start.currentRunID }.map(\.seq).max() ?? 0) < start.currentSequence {
                try await Task.sleep(for: .milliseconds(300))
                records = try readRecords()
            }
        }
        var report = VerifyReport()
        try await verify(records, currentRun: start.currentRunID, currentSequence: file == nil && until == nil ? start.currentSequence : 0,
                         currentRunInWindow: currentRunInWindow, client: client, report: &report)
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
        let query = JournalQuery(since: try auditTime(since, "--since"), until: try auditTime(until, "--until"))
        var records: [JournalRecord] = []
        try readJournal(query) { r in
            if r.fields["KMS_RUN_ID"] != nil, r.fields["KMS_SEQ"] != nil, r.fields["KMS_CHAIN"] != nil { records.append(r) }
        }
        return records
    }

    struct VerifyReport {
        var records = 0
        var runs = 0
        var problems: [String] = []
        var warnings: [String] = []
    }

    /// Orders records by run and sequence, finds gaps and broken links between runs, and has
    /// kmsd check every KMS_CHAIN it can (each against the record before it).
    func verify(_ all: [JournalRecord], currentRun: String, currentSequence: UInt64, currentRunInWindow: Bool = true, client: KMSClient,
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
        // kmsd says its current run wrote records, yet none of them is in what was read: they
        // were removed (or never reached journald), not merely outside the window, since
        // `currentSequence` is only given when reading up to now, and the window began before
        // the run did (no --since, or one before kmsd started).
        if currentSequence > 0, byRun[currentRun] == nil {
            if currentRunInWindow {
                report.problems.append("missing records: run \(currentRun) (kmsd's current run) KMS_SEQ 1...\(currentSequence): none is in the journal")
            } else {
                report.warnings.append("kmsd's current run \(currentRun) wrote \(currentSequence) records, none of them in the window read (all before --since?)")
            }
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
        // Runs the walk did not reach: if their own records chain under this kmsd's key they are
        // this keystore's, cut off from the rest (a run's first record removed); else they are
        // another keystore's (or written by someone else) and not checked.
        for run in order where !chain.contains(run) {
            let records = byRun[run]!.sorted { $0.key < $1.key }.map(\.value)
            var pairs: [(previousChain: [UInt8], fields: [(name: String, value: String)])] = []
            for (a, b) in zip(records, records.dropFirst()) where b.seq == a.seq + 1 {
                if let prior = Self.chainBytes(a.chain) { pairs.append((prior, b.written)) }
                if pairs.count >= 20 { break }
            }
            var ours = false
            // One pair that chains is proof enough: nobody without the key can make one.
            if !pairs.isEmpty { ours = try await client.verifyAuditRecords(pairs).valid.contains(true) }
            if ours {
                report.problems.append("unlinked run: \(run) chains under this kmsd's key but no later run links to it (its successor's first records were removed)")
            } else {
                report.warnings.append("run \(run) is not this keystore's (its records do not chain under this kmsd's key): not checked")
            }
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
                    prior = stop == "none" ? [UInt8](repeating: 0, count: 32) : r.fields["KMS_PREVIOUS_CHAIN"].flatMap(Self.chainBytes)
                    if prior == nil && stop != "none" { report.problems.append("run \(run) starts without a link to the run before") }
                } else if let p = previous, p.seq == seq - 1 {
                    prior = Self.chainBytes(p.chain)
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


    /// A KMS_CHAIN value: 32 bytes in hex.
    static func chainBytes(_ text: String) -> [UInt8]? { Hex.decode(text).flatMap { $0.count == 32 ? $0 : nil } }
}
