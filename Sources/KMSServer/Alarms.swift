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

    init(rules: AlarmRules) { ruleSet = Mutex(rules) }

    /// Alarms fired since kmsd started, by rule.
    var counts: [String: UInt64] { state.withLock { $0.counts } }

    /// The alarms `record` sets off (rule, subject, message), each at most once a minute per subject.
    func check(_ record: AuditRecord) -> [(rule: String, message: String)] {
        let keyState = record.details.keyState
        // The common case, nothing to look at, costs a lock and a few comparisons.
        let rules = self.rules
        let denied = rules.accessDeniedPerMinute > 0 && record.error == .accessDenied
        let keyUse = (rules.pendingDeletionUse && keyState == KeyState.pendingDeletion.rawValue)
            || (rules.disabledKeyUse && keyState == KeyState.disabled.rawValue)
        let integrity = rules.integrityFailure && (record.error == .keyUnavailable || !record.details.integrityFailures.isEmpty)
        guard denied || keyUse || integrity else { return [] }
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
