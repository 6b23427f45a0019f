import Foundation
import KMSCore
import KMSProtocol
import Synchronization

/// Alarm rules (the CloudWatch-alarm analogue), checked against every request's audit record.
/// A rule that fires writes one record at PRIORITY alert (1) with the alarm MESSAGE_ID, so
/// `journalctl -p alert` and any journal forwarder see it, and counts in the metrics. Each rule
/// fires at most once a minute per subject (a uid, a key), so a flood does not become a flood
/// of alarms.
struct AlarmRules: Sendable, Equatable {
    /// More than this many AccessDenied answers to one uid within a minute; 0: off.
    var accessDeniedPerMinute = 20
    /// Any cryptographic use (attempted) of a key pending deletion.
    var pendingDeletionUse = true
    /// Any cryptographic use (attempted) of a disabled key.
    var disabledKeyUse = false
    /// Any integrity failure: a tampered or rolled-back row (KeyUnavailableException), a record
    /// left out of a listing for failing its check.
    var integrityFailure = true
    /// A Decrypt (allowed) of a key by an executable or a systemd unit never seen decrypting
    /// that key before. The callers seen are kept in the state directory, so a restart does
    /// not make every caller new again. Off by default: a key's first decrypting program is
    /// new too, so this is for keys whose users are settled.
    var newDecryptCaller = false
}

final class Alarms: Sendable {
    static let messageID = "9d4e7a1c3b2f48e6a5c0d9b8e7f6a1b2"
    static let cryptographic: Set<String> = ["Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext"]

    /// The rules in force (replaced whole when SIGHUP reloads the configuration).
    var rules: AlarmRules { ruleSet.withLock { $0 } }
    private let ruleSet: Mutex<AlarmRules>
    func setRules(_ r: AlarmRules) { ruleSet.withLock { $0 = r } }
    private struct State {
        /// uid → (minute, AccessDenied count in it).
        var denied: [UInt32: (minute: Int, count: Int)] = [:]
        /// (rule, subject) → the minute it last fired.
        var fired: [String: Int] = [:]
        var counts: [String: UInt64] = [:]
    }
    private let state = Mutex(State())

    /// Executables and units seen decrypting each key (for `newDecryptCaller`).
    let decryptCallers: DecryptCallers

    init(rules: AlarmRules, decryptCallersFile: String? = nil) {
        ruleSet = Mutex(rules)
        decryptCallers = DecryptCallers(path: decryptCallersFile)
    }

    /// Alarms fired since kmsd started, by rule.
    var counts: [String: UInt64] { state.withLock { $0.counts } }

    /// Counts an alarm raised outside `check` (the IntegrityFailure of a rollback found at start).
    func noteFired(_ rule: String) { state.withLock { $0.counts[rule, default: 0] += 1 } }

    /// The alarms `record` sets off (rule, subject, message), each at most once a minute per subject.
    func check(_ record: AuditRecord) -> [(rule: String, message: String)] {
        let keyState = record.details.keyState
        // The common case, nothing to look at, costs a lock and a few comparisons.
        let rules = self.rules
        let denied = rules.accessDeniedPerMinute > 0 && record.error == .accessDenied
        let keyUse = (rules.pendingDeletionUse && keyState == KeyState.pendingDeletion.rawValue)
            || (rules.disabledKeyUse && keyState == KeyState.disabled.rawValue)
        let integrity = rules.integrityFailure && (record.error == .keyUnavailable || !record.details.integrityFailures.isEmpty)
        let decrypt = rules.newDecryptCaller && record.result == .allowed && record.action == "Decrypt" && !record.details.keyID.isEmpty
        guard denied || keyUse || integrity || decrypt else { return [] }
        let minute = Int(Date().timeIntervalSince1970 / 60)
        var due: [(rule: String, subject: String, message: String)] = []
        let who = "uid \(record.principal.uid) (\(record.principal.userName))"
        if rules.accessDeniedPerMinute > 0, record.error == .accessDenied {
            let count = state.withLock { s -> Int in
                var entry = s.denied[record.principal.uid] ?? (minute, 0)
                if entry.minute != minute { entry = (minute, 0) }
                entry.count += 1
                s.denied[record.principal.uid] = entry
                if s.denied.count > 10_000 { s.denied = s.denied.filter { $0.value.minute == minute } }
                return entry.count
            }
            if count > rules.accessDeniedPerMinute {
                due.append(("AccessDeniedRate", "uid:\(record.principal.uid)", "more than \(rules.accessDeniedPerMinute) requests of \(who) were denied within a minute"))
            }
        }
        if Self.cryptographic.contains(record.action), !record.details.keyID.isEmpty {
            if rules.pendingDeletionUse, keyState == KeyState.pendingDeletion.rawValue {
                due.append(("PendingDeletionKeyUse", "key:\(record.details.keyID)", "\(record.action) by \(who) tried to use key \(record.details.keyID), which is pending deletion"))
            }
            if rules.disabledKeyUse, keyState == KeyState.disabled.rawValue {
                due.append(("DisabledKeyUse", "key:\(record.details.keyID)", "\(record.action) by \(who) tried to use key \(record.details.keyID), which is disabled"))
            }
        }
        if rules.integrityFailure, record.error == .keyUnavailable || !record.details.integrityFailures.isEmpty {
            let subject = record.details.keyID.isEmpty ? "keystore" : record.details.keyID
            due.append(("IntegrityFailure", "integrity:\(subject)", "\(record.action) by \(who) met a keystore record that failed its integrity check\(record.details.keyID.isEmpty ? "" : " (key \(record.details.keyID))")"))
        }
        if decrypt {
            let p = record.principal
            let callers = [("executable", p.executableKnown ? p.executable ?? "(none)" : "(unknown)"),
                           ("unit", p.unitKnown ? p.systemdUnit ?? "(none)" : "(unknown)")]
            for (kind, value) in callers {
                switch decryptCallers.see(keyID: record.details.keyID, kind: kind, value: value) {
                case .known: break
                case .new:
                    due.append(("NewDecryptCaller", "key:\(record.details.keyID)/\(kind):\(value)",
                                "\(who) decrypted with key \(record.details.keyID) from \(kind) \(value), never seen decrypting with it before"))
                case .overLimit:
                    due.append(("NewDecryptCaller", "key:\(record.details.keyID)/over-limit",
                                "\(who) decrypted with key \(record.details.keyID) from \(kind) \(value); the key already has \(DecryptCallers.perKeyLimit) callers on record, so new ones are no longer remembered"))
                }
            }
        }
        guard !due.isEmpty else { return [] }
        return state.withLock { s in
            var out: [(rule: String, message: String)] = []
            for d in due where s.fired["\(d.rule)/\(d.subject)"] != minute {
                s.fired["\(d.rule)/\(d.subject)"] = minute
                s.counts[d.rule, default: 0] += 1
                out.append((d.rule, d.message))
            }
            if s.fired.count > 10_000 { s.fired = s.fired.filter { $0.value == minute } }
            return out
        }
    }
}

/// The executables and units seen decrypting each key, remembered across restarts in an
/// append-only file of the state directory (`decrypt-callers`): one line per (key, kind,
/// value), the value in hex (a path may hold any byte). A damaged line is skipped with a
/// warning; losing the file costs only alarms for callers seen again. Bounded per key.
final class DecryptCallers: Sendable {
    enum Sighting { case known, new, overLimit }
    static let perKeyLimit = 256
    private let path: String?
    private let seen = Mutex<[String: Set<String>]>([:])

    init(path: String?) {
        self.path = path
        guard let path, let data = FileManager.default.contents(atPath: path) else { return }
        var table: [String: Set<String>] = [:]
        var damaged = 0
        for line in data.split(separator: UInt8(ascii: "\n")) {
            let parts = line.split(separator: UInt8(ascii: "\t"), omittingEmptySubsequences: false)
            guard parts.count == 3, let key = String(bytes: parts[0], encoding: .utf8), (try? KeyID(parsing: key))?.description == key,
                  let kind = String(bytes: parts[1], encoding: .utf8), kind == "executable" || kind == "unit",
                  let value = Hex.decode(String(decoding: parts[2], as: UTF8.self)) else { damaged += 1; continue }
            table[key, default: []].insert(kind + ":" + String(decoding: value, as: UTF8.self))
        }
        if damaged > 0 { StandardError.write("kmsd: WARNING: \(path): skipped \(damaged) damaged line(s)\n") }
        seen.withLock { $0 = table }
    }

    /// Whether `value` (of `kind`) was seen decrypting with `keyID` before; remembers it now.
    func see(keyID: String, kind: String, value: String) -> Sighting {
        let entry = kind + ":" + value
        let result: Sighting = seen.withLock { table in
            if table[keyID]?.contains(entry) == true { return .known }
            if table[keyID, default: []].count >= Self.perKeyLimit { return .overLimit }
            table[keyID, default: []].insert(entry)
            return .new
        }
        if result == .new, let path {
            let line = Array("\(keyID)\t\(kind)\t\(Hex.encode(Array(value.utf8)))\n".utf8)
            let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
            if fd >= 0 {
                let written = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
                if written != line.count { StandardError.write("kmsd: WARNING: cannot record a decrypting caller in \(path)\n") }
            } else {
                StandardError.write("kmsd: WARNING: cannot open \(path): \(String(cString: strerror(errno)))\n")
            }
        }
        return result
    }
}
