import ArgumentParser
import Foundation
import KMSClient

struct ReviewAccess: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "review-access",
        abstract: "List who may do what with each key (key policies, identity policies, grants); flag wildcards and unused permissions. (beyond AWS)",
        discussion: """
        Without --key-id, every key (administrators only). --unused-days N reads kmsd's audit records of the \
        last N days from journald (sd_journal; root or a member of systemd-journal) and flags each Allow that \
        decided no request in that time.
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("One key (needs kms:GetKeyPolicy on it).", valueName: "id"))
    var keyID: String = ""

    @Option(name: .customLong("unused-days"), help: ArgumentHelp("Flag permissions that decided no request in this many days.", valueName: "n"))
    var unusedDays: Int?

    func validate() throws {
        if let unusedDays, !(1...3650).contains(unusedDays) { throw ValidationError("--unused-days must be 1...3650") }
    }

    func run() async throws {
        var keys: [Kmsd_V1_KeyAccess] = []
        try await global.withClient { client in
            var marker = ""
            repeat {
                let page = try await client.reviewAccess(keyID: keyID, marker: marker)
                keys += page.keys
                marker = page.nextMarker
            } while !marker.isEmpty
        }
        let used = try unusedDays.map { try Self.decidersInAuditTrail(days: $0) }
        var rows: [[String]] = []
        var json: [[String: Any]] = []
        for k in keys {
            var entries: [[String: Any]] = []
            for e in k.entries {
                var flags = e.flags
                if let used, e.effect == "Allow", !used.contains(Self.use(key: k.keyID, decider: e.source)) { flags.append("unused-\(unusedDays!)d") }
                rows.append([k.keyID, e.source, e.effect, (e.notPrincipal ? "NOT " : "") + e.principals.joined(separator: ","),
                             (e.notAction ? "NOT " : "") + e.actions.joined(separator: ","), e.conditions, flags.joined(separator: ",")])
                var entry: [String: Any] = ["Source": e.source, "Effect": e.effect, "Principals": e.principals, "Actions": e.actions, "Flags": flags]
                if e.notPrincipal { entry["NotPrincipal"] = true }
                if e.notAction { entry["NotAction"] = true }
                if !e.conditions.isEmpty { entry["Conditions"] = e.conditions }
                entries.append(entry)
            }
            json.append(["KeyId": k.keyID, "Permissions": entries])
        }
        if global.json { try printJSON(["Keys": json]) } else {
            printColumns(headers: ["KeyId", "Source", "Effect", "Principals", "Actions", "Conditions", "Flags"], rows: rows)
        }
    }

    /// A permission used on a key: the key id and the statement or grant that decided.
    static func use(key: String, decider: String) -> String { key + "\u{1F}" + decider }

    /// Every (key, KMS_DECIDED_BY) of an allowed request in the last `days` days: a statement
    /// counts as used on the key it decided for, not on every key whose policy has a statement
    /// of that name (identity policies and copied key policies name theirs alike).
    static func decidersInAuditTrail(days: Int) throws -> Set<String> {
        let since = UInt64(max(0, Int(Date().timeIntervalSince1970) - days * 86_400)) * 1_000_000
        var uses = Set<String>()
        try readJournal(JournalQuery(matches: JournalQuery().matches + ["KMS_RESULT=Allowed"], since: since,
                                     fields: ["KMS_DECIDED_BY", "KMS_KEY_ID", "KMS_SOURCE_KEY_ID"])) { r in
            guard let by = r.fields["KMS_DECIDED_BY"] else { return }
            let key = r.fields["KMS_KEY_ID"] ?? ""
            // ReEncrypt: "from X; to Y", X decided on the source key (KMS_SOURCE_KEY_ID).
            // UpdateAlias: "from X; to Y" on the alias's old and new keys; the record names the
            // new one, so X counts for the old key where the record names it, else for the new.
            for part in by.split(separator: ";") {
                var p = part.trimmingCharacters(in: .whitespaces)
                var on = key
                if p.hasPrefix("from ") {
                    p = String(p.dropFirst(5))
                    if let source = r.fields["KMS_SOURCE_KEY_ID"], !source.isEmpty { on = source }
                } else if p.hasPrefix("to ") {
                    p = String(p.dropFirst(3))
                }
                uses.insert(use(key: on, decider: p))
            }
        }
        return uses
    }
}
