import Foundation
import KMSProtocol

/// A key policy in the AWS style, parsed strictly and compiled for evaluation.
///
/// ```json
/// {"Version": "2012-10-17",
///  "Statement": [{"Sid": "AppEncrypts", "Effect": "Allow",
///                 "Principal": {"Unit": "app.service"}, "Action": "kms:Encrypt", "Resource": "*",
///                 "Condition": {"StringEquals": {"kms:EncryptionContext:app": "orders"}}}]}
/// ```
///
/// Principals are local: `"*"`, or an object with `Uid`, `User`, `Group`, `Unit`,
/// `Executable` (each a string or a list; units and executables may use `*` and `?`) and
/// `Role: "Administrators"` (whoever kmsd's configuration names as administrators at the time
/// of the request). Anything the parser does not know is a ValidationException naming where.
public struct KeyPolicy: Sendable {
    public let id: String?
    public let statements: [Statement]
    /// Beyond AWS: `"AuditEncryptionContext": "KeysAndValues"` puts the encryption context's
    /// values in this key's audit records too (default `"Keys"`: keys only, as values may be
    /// sensitive).
    public var auditContextValues = false

    /// True when a statement names a user or group: the parse looked them up in the account
    /// database, so it holds only as long as that database does (never shared between keys).
    public var namesAccounts: Bool { statements.contains { $0.principal.namesAccounts } }

    /// AWS's limit on a key policy document.
    public static let maxBytes = 32_768

    /// A compiled statement. A class, so evaluating a policy walks references instead of
    /// copying each statement's many fields.
    public final class Statement: Sendable {
        public enum Effect: Sendable { case allow, deny }
        public let sid: String?
        /// Position in the document, from 0.
        public let index: Int
        public let effect: Effect
        let principal: PrincipalPattern
        let notPrincipal: Bool
        let actions: ActionSet
        let notAction: Bool
        let conditions: [Condition]
        /// Identity policies only: the keys it covers (`kmsd:key/ID` patterns); nil: any.
        let resources: [Glob]?
        /// As written, for access reviews: `Uid:1000`, `Unit:app.service`, `*`, ...
        public let principalText: [String]
        public let actionText: [String]
        /// The Condition block as compact JSON with sorted keys; nil when there is none.
        public let conditionText: String?
        /// How an audit record names it: its Sid, or `#index` when it has none.
        public let name: String
        /// `key-policy:NAME`, how a key-policy decision by it is named (made once, not per request).
        let keyPolicyDecidedBy: String

        init(sid: String?, index: Int, effect: Effect, principal: PrincipalPattern, notPrincipal: Bool, actions: ActionSet,
             notAction: Bool, conditions: [Condition], resources: [Glob]?, principalText: [String], actionText: [String],
             conditionText: String?) {
            self.sid = sid
            self.index = index
            self.effect = effect
            self.principal = principal
            self.notPrincipal = notPrincipal
            self.actions = actions
            self.notAction = notAction
            self.conditions = conditions
            self.resources = resources
            self.principalText = principalText
            self.actionText = actionText
            self.conditionText = conditionText
            self.name = (sid?.isEmpty ?? true) ? "#\(index)" : sid!
            self.keyPolicyDecidedBy = "key-policy:\(self.name)"
        }

        /// `SOURCE:NAME`.
        func decidedBy(_ source: String) -> String {
            source == "key-policy" ? keyPolicyDecidedBy : "\(source):\(name)"
        }
        public var isNotPrincipal: Bool { notPrincipal }
        public var isNotAction: Bool { notAction }
        public var delegatesToIdentityPolicies: Bool { principal.identityPolicies }
        /// Names every local principal (`*`) or every action (`kms:*` and the like).
        public var wildcardPrincipal: Bool { principal.everyone || (notPrincipal && effect == .allow) }
        public var wildcardAction: Bool { actionText.contains { $0.hasSuffix("*") } || notAction }
    }

    /// Parses and checks a policy document.
    ///
    /// `strict` (PutKeyPolicy, CreateKey) also requires every user and group it names to exist
    /// on this host. A stored policy is loaded with `strict: false`: a name that no longer
    /// resolves then matches nobody, and the rest of the policy still applies.
    /// Throws ValidationException naming the first thing wrong and where it is.
    public static func parse(_ text: String, strict: Bool = true) throws(KMSError) -> KeyPolicy {
        guard text.utf8.count <= maxBytes else {
            throw invalid("the policy is \(text.utf8.count) bytes; at most \(maxBytes) are allowed")
        }
        let root: Any
        do { root = try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed]) } catch {
            throw invalid("the policy is not valid JSON")
        }
        guard let doc = root as? [String: Any] else { throw invalid("the policy must be a JSON object") }
        try allowOnly(doc, ["Version", "Id", "Statement", "AuditEncryptionContext"], at: "")
        var auditValues = false
        if let audit = doc["AuditEncryptionContext"] {
            switch audit as? String {
            case "Keys": auditValues = false
            case "KeysAndValues": auditValues = true
            default: throw invalid("AuditEncryptionContext must be \"Keys\" or \"KeysAndValues\"")
            }
        }
        if let version = doc["Version"] {
            guard version as? String == "2012-10-17" else { throw invalid("Version must be \"2012-10-17\"") }
        }
        let id = try doc["Id"].map { (v) throws(KMSError) in try string(v, at: "Id") }
        guard let raw = doc["Statement"] else { throw invalid("the policy has no Statement") }
        let list: [Any] = (raw as? [Any]) ?? [raw]
        guard !list.isEmpty else { throw invalid("Statement is empty") }
        var statements: [Statement] = []
        var sids = Set<String>()
        for (i, item) in list.enumerated() {
            let at = "Statement[\(i)]"
            guard let s = item as? [String: Any] else { throw invalid("\(at) must be an object") }
            let statement = try parseStatement(s, index: i, at: at, strict: strict)
            if let sid = statement.sid, !sid.isEmpty, !sids.insert(sid).inserted {
                throw invalid("\(at).Sid \"\(sid)\" is used by an earlier statement; Sids must be unique")
            }
            statements.append(statement)
        }
        return KeyPolicy(id: id, statements: statements, auditContextValues: auditValues)
    }

    static func parseStatement(_ s: [String: Any], index: Int, at: String, strict: Bool, identity: Bool = false) throws(KMSError) -> Statement {
        try allowOnly(s, identity ? ["Sid", "Effect", "Action", "NotAction", "Resource", "Condition"]
                                  : ["Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource", "Condition"], at: at)
        let sid = try s["Sid"].map { (v) throws(KMSError) in try string(v, at: "\(at).Sid") }
        if let sid, !sid.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == " " || $0 == ".") }) {
            throw invalid("\(at).Sid may hold letters, digits, spaces and - _ . only")
        }
        let effect: Statement.Effect
        switch s["Effect"] as? String {
        case "Allow": effect = .allow
        case "Deny": effect = .deny
        default: throw invalid("\(at).Effect must be \"Allow\" or \"Deny\"")
        }
        var principalField = "Principal"
        var principal = PrincipalPattern()
        if identity {
            principal.everyone = true  // the identities it is attached to; checked before
        } else {
            guard (s["Principal"] == nil) != (s["NotPrincipal"] == nil) else {
                throw invalid("\(at) needs exactly one of Principal and NotPrincipal")
            }
            principalField = s["Principal"] != nil ? "Principal" : "NotPrincipal"
            principal = try PrincipalPattern.parse(s[principalField]!, at: "\(at).\(principalField)", strict: strict)
        }
        guard (s["Action"] == nil) != (s["NotAction"] == nil) else {
            throw invalid("\(at) needs exactly one of Action and NotAction")
        }
        let actionField = s["Action"] != nil ? "Action" : "NotAction"
        var actions = ActionSet()
        let patterns = try strings(s[actionField]!, at: "\(at).\(actionField)")
        for (j, pattern) in patterns.enumerated() {
            let matched = ActionSet.matching(pattern)
            guard !matched.isEmpty else {
                throw invalid("\(at).\(actionField)[\(j)] \"\(pattern.prefix(80))\" names no kms action (write kms:Encrypt, kms:GenerateDataKey*, kms:*)")
            }
            actions.bits.0 |= matched.bits.0
            actions.bits.1 |= matched.bits.1
        }
        var resources: [Glob]? = nil
        if identity {
            guard let resource = s["Resource"] else { throw invalid("\(at) needs Resource: \"*\", or key ARNs such as \"kmsd:key/ID\" (\"kmsd:key/*\" for all)") }
            let values = try strings(resource, at: "\(at).Resource")
            for (j, v) in values.enumerated() where v != "*" && !v.hasPrefix(KeyID.arnPrefix) {
                throw invalid("\(at).Resource[\(j)] \"\(v.prefix(80))\" must be \"*\" or a key ARN such as \"\(KeyID.arnPrefix)ID\"")
            }
            if !values.contains("*") { resources = values.map(Glob.init) }
        } else {
            if s["NotResource"] != nil { throw invalid("\(at).NotResource is not supported in a key policy; use \"Resource\": \"*\"") }
            if let resource = s["Resource"] {
                let values = try strings(resource, at: "\(at).Resource")
                guard values == ["*"] else { throw invalid("\(at).Resource must be \"*\" (a key policy covers its own key)") }
            }
        }
        var conditions: [Condition] = []
        if let raw = s["Condition"] {
            guard let block = raw as? [String: Any] else { throw invalid("\(at).Condition must be an object") }
            for op in block.keys.sorted() {
                guard let keys = block[op] as? [String: Any] else { throw invalid("\(at).Condition.\(op) must be an object") }
                for key in keys.keys.sorted() {
                    conditions.append(try Condition.parse(operator: op, key: key, values: keys[key]!, at: "\(at).Condition.\(op).\(key)"))
                }
            }
        }
        var principalText: [String] = []
        if let raw = s[principalField] {
            if raw as? String == "*" { principalText = ["*"] } else if let object = raw as? [String: Any] {
                for kind in object.keys.sorted() {
                    for v in (try? strings(object[kind]!, at: "")) ?? [] { principalText.append("\(kind):\(v)") }
                }
            }
        }
        var conditionText: String? = nil
        if let raw = s["Condition"], let data = try? JSONSerialization.data(withJSONObject: raw, options: [.sortedKeys, .withoutEscapingSlashes]) {
            conditionText = String(decoding: data, as: UTF8.self)
        }
        if principal.identityPolicies && (effect == .deny || principalField == "NotPrincipal" || !principal.onlyIdentityPolicies) {
            throw invalid("\(at): {\"Role\": \"IdentityPolicies\"} delegates to identity policies: use it alone, in an Allow with Principal")
        }
        return Statement(sid: sid, index: index, effect: effect, principal: principal, notPrincipal: principalField == "NotPrincipal",
                         actions: actions, notAction: actionField == "NotAction", conditions: conditions, resources: resources,
                         principalText: principalText, actionText: patterns, conditionText: conditionText)
    }

    static func invalid(_ message: String) -> KMSError {
        KMSError(.validation, "invalid policy: \(message)")
    }

    static func allowOnly(_ object: [String: Any], _ fields: Set<String>, at: String) throws(KMSError) {
        for key in object.keys.sorted() where !fields.contains(key) {
            let place = at.isEmpty ? key : "\(at).\(key)"
            throw invalid("\(place) is not a field kmsd knows (allowed: \(fields.sorted().joined(separator: ", ")))")
        }
    }

    static func string(_ value: Any, at: String) throws(KMSError) -> String {
        guard let s = value as? String else { throw invalid("\(at) must be a string") }
        return s
    }

    /// A string, a number or a boolean (as AWS accepts in conditions), or a non-empty list of them.
    static func strings(_ value: Any, at: String) throws(KMSError) -> [String] {
        func scalar(_ v: Any, _ place: String) throws(KMSError) -> String {
            if let s = v as? String { return s }
            if let n = v as? NSNumber {
                // JSON true/false come back as NSNumbers of C type char.
                if String(cString: n.objCType) == "c" { return n.boolValue ? "true" : "false" }
                return n.stringValue
            }
            throw invalid("\(place) must be a string or a list of strings")
        }
        if let list = value as? [Any] {
            guard !list.isEmpty else { throw invalid("\(at) is an empty list") }
            var out: [String] = []
            for (i, v) in list.enumerated() { out.append(try scalar(v, "\(at)[\(i)]")) }
            return out
        }
        return [try scalar(value, at)]
    }
}

/// Who a statement names. Matching is tri-state: an attribute kmsd could not establish safely
/// (groups, unit, executable) matches no Allow and every Deny that names that kind.
struct PrincipalPattern: Sendable {
    var everyone = false
    var administrators = false
    /// `Role: IdentityPolicies`: this statement lets identity policies decide (AWS's account
    /// root statement); it names nobody directly.
    var identityPolicies = false
    var uids: Set<UInt32> = []
    var gids: Set<UInt32> = []
    var units: [Glob] = []
    var executables: [Glob] = []
    /// Named a user or group, looked up in the account database while parsing: what the
    /// pattern matches depends on that database at the time of the parse.
    var namesAccounts = false

    static func parse(_ value: Any, at: String, strict: Bool) throws(KMSError) -> PrincipalPattern {
        var p = PrincipalPattern()
        if let s = value as? String {
            guard s == "*" else { throw KeyPolicy.invalid("\(at) must be \"*\" or an object such as {\"Uid\": \"1000\"}") }
            p.everyone = true
            return p
        }
        guard let object = value as? [String: Any], !object.isEmpty else {
            throw KeyPolicy.invalid("\(at) must be \"*\" or an object such as {\"Uid\": \"1000\"}")
        }
        try KeyPolicy.allowOnly(object, ["Uid", "User", "Group", "Unit", "Executable", "Role"], at: at)
        for kind in object.keys.sorted() {
            let values = try KeyPolicy.strings(object[kind]!, at: "\(at).\(kind)")
            for (i, v) in values.enumerated() {
                let place = "\(at).\(kind)[\(i)]"
                switch kind {
                case "Uid":
                    guard let uid = UInt32(v) else { throw KeyPolicy.invalid("\(place) \"\(v.prefix(40))\" is not a uid") }
                    p.uids.insert(uid)
                case "User":
                    p.namesAccounts = true
                    if let uid = Self.uid(of: v) { p.uids.insert(uid) } else if strict {
                        throw KeyPolicy.invalid("\(place): there is no user \"\(v.prefix(40))\" on this host")
                    }
                case "Group":
                    p.namesAccounts = true
                    if let gid = Self.gid(of: v) ?? UInt32(v) { p.gids.insert(gid) } else if strict {
                        throw KeyPolicy.invalid("\(place): there is no group \"\(v.prefix(40))\" on this host")
                    }
                case "Unit":
                    guard !v.isEmpty, !v.contains("/") else { throw KeyPolicy.invalid("\(place) must be a unit name such as app.service") }
                    p.units.append(Glob(v))
                case "Executable":
                    guard v.hasPrefix("/") || v == "*" else { throw KeyPolicy.invalid("\(place) must be an absolute path") }
                    p.executables.append(Glob(v))
                default:  // Role
                    switch v {
                    case "Administrators": p.administrators = true
                    case "IdentityPolicies": p.identityPolicies = true
                    default: throw KeyPolicy.invalid("\(place) must be \"Administrators\" or \"IdentityPolicies\"")
                    }
                }
            }
        }
        return p
    }

    static func uid(of name: String) -> UInt32? {
        var pwd = passwd(), result: UnsafeMutablePointer<passwd>? = nil
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getpwnam_r(name, &pwd, &buffer, buffer.count, &result) == 0, result != nil else { return nil }
        return pwd.pw_uid
    }

    static func gid(of name: String) -> UInt32? {
        var grp = group(), result: UnsafeMutablePointer<group>? = nil
        var buffer = [CChar](repeating: 0, count: 16384)
        guard getgrnam_r(name, &grp, &buffer, buffer.count, &result) == 0, result != nil else { return nil }
        return grp.gr_gid
    }

    var onlyIdentityPolicies: Bool {
        identityPolicies && !everyone && !administrators && uids.isEmpty && gids.isEmpty && units.isEmpty && executables.isEmpty
    }

    enum Match { case yes, no, unknown }

    func match(_ f: RequestFacts) -> Match {
        if everyone { return .yes }
        if uids.contains(f.caller.uid) { return .yes }
        if administrators && f.isAdministrator { return .yes }
        var unknown = false
        if !gids.isEmpty {
            if gids.contains(f.caller.gid) { return .yes }
            if f.caller.groupsKnown { if f.caller.groups.contains(where: gids.contains) { return .yes } } else { unknown = true }
        }
        if !units.isEmpty {
            if let unit = f.caller.systemdUnit { if units.contains(where: { $0.matches(unit) }) { return .yes } } else if !f.caller.unitKnown { unknown = true }
        }
        if !executables.isEmpty {
            if let exe = f.caller.executable { if executables.contains(where: { $0.matches(exe) }) { return .yes } } else if !f.caller.executableKnown { unknown = true }
        }
        return unknown ? .unknown : .no
    }
}
