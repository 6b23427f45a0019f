import Foundation
import KMSProtocol

/// An encryption context as the request carried it: every pair, byte for byte (a dictionary
/// would merge keys that differ only in Unicode normalisation, which the ciphertext does not).
public typealias ContextPairs = [(key: String, value: String)]

extension Dictionary where Key == String, Value == String {
    /// The pairs of a context given as a map (tests, simulations).
    public var contextPairs: ContextPairs { map { (key: $0.key, value: $0.value) } }
}

/// What a policy is evaluated against: the request, the caller and the key.
public struct RequestFacts: @unchecked Sendable {
    /// `PolicyActions` index of the action (`kms:Encrypt`, `kms:ReEncryptFrom`, ...).
    public var action: Int
    public var caller: Principal
    public var isAdministrator: Bool
    public var key: KeyRecord?
    /// The request's encryption context; nil when the request carries none.
    public var encryptionContext: ContextPairs? = nil
    /// The alias the request named the key by.
    public var requestAlias: String? = nil
    /// The key's aliases, looked up only when a condition asks.
    public var resourceAliases: (() -> [String])? = nil
    /// Else where the key's aliases are read from (a reference, not a closure: every decision
    /// sets it, and a closure would be an allocation each time).
    public var aliasSource: KeyRepository? = nil
    public var bypassPolicyLockoutSafetyCheck: Bool? = nil
    public var pendingWindowInDays: UInt32? = nil
    public var grantOperations: [String]? = nil
    public var granteePrincipal: String? = nil
    public var retiringPrincipal: String? = nil
    /// The region of the kmsd deciding (multi-region keys: each replica's policy can test it).
    public var region: String? = nil

    public init(action: Int, caller: Principal, isAdministrator: Bool, key: KeyRecord?) {
        self.action = action
        self.caller = caller
        self.isAdministrator = isAdministrator
        self.key = key
    }

    /// Facts for `kms:Name`; nil when kmsd knows no such action.
    public init?(action name: String, caller: Principal, isAdministrator: Bool, key: KeyRecord?) {
        guard let i = PolicyActions.index(of: "kms:" + name) else { return nil }
        self.init(action: i, caller: caller, isAdministrator: isAdministrator, key: key)
    }
}

/// The outcome of an evaluation and what decided it.
public struct PolicyDecision: Sendable, Equatable {
    public enum Effect: String, Sendable { case allow = "Allow", explicitDeny = "ExplicitDeny", implicitDeny = "ImplicitDeny" }
    public let effect: Effect
    /// `key-policy:Sid` (or `key-policy:#n`), `grant:ID`, `identity-policy:NAME:Sid`, or
    /// `implicit-deny`: what audit records carry as KMS_DECIDED_BY.
    public let decidedBy: String
    /// A key policy that did not decide itself lets identity policies decide this request.
    public var delegated = false

    public var allowed: Bool { effect == .allow }

    public init(effect: Effect, decidedBy: String, delegated: Bool = false) {
        self.effect = effect
        self.decidedBy = decidedBy
        self.delegated = delegated
    }

    public static let implicitDeny = PolicyDecision(effect: .implicitDeny, decidedBy: "implicit-deny")
}

extension KeyPolicy {
    /// AWS's evaluation for one policy: an explicit Deny that applies wins; else an Allow that
    /// applies allows (the first one names the decision); else the request is implicitly
    /// denied. Pure: the same facts and policy always give the same decision.
    public func evaluate(_ f: RequestFacts, source: String = "key-policy") -> PolicyDecision {
        var allow: Statement? = nil
        var delegated = false
        for s in statements {
            guard s.actions.contains(f.action) != s.notAction else { continue }
            if let resources = s.resources {
                guard let key = f.key, case let arn = key.keyID.arn, resources.contains(where: { $0.matches(arn) }) else { continue }
            }
            if s.principal.identityPolicies {
                if !delegated, s.conditions.allSatisfy({ $0.holds(f) }) { delegated = true }
                continue
            }
            let match = s.principal.match(f)
            let applies: Bool
            switch (match, s.effect) {
            case (.yes, _): applies = !s.notPrincipal
            case (.no, _): applies = s.notPrincipal
            // Unknown: an Allow does not apply, a Deny does (fail safe either way).
            case (.unknown, .allow): applies = false
            case (.unknown, .deny): applies = true
            }
            guard applies else { continue }
            if s.effect == .allow, allow != nil { continue }  // already allowed; only a Deny can change that
            guard s.conditions.allSatisfy({ $0.holds(f) }) else { continue }
            if s.effect == .deny { return PolicyDecision(effect: .explicitDeny, decidedBy: s.decidedBy(source)) }
            allow = s
        }
        if let allow { return PolicyDecision(effect: .allow, decidedBy: allow.decidedBy(source)) }
        return PolicyDecision(effect: .implicitDeny, decidedBy: "implicit-deny", delegated: delegated)
    }
}

/// An identity policy: statements (no Principal) attached to users, groups, units or
/// executables, from a file in kmsd's identity-policy directory (IAM's analogue).
///
/// ```json
/// {"Version": "2012-10-17", "AttachTo": {"Group": "payroll"},
///  "Statement": [{"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "kmsd:key/*"}]}
/// ```
public struct IdentityPolicy: Sendable {
    public let name: String
    let attachTo: PrincipalPattern
    public let policy: KeyPolicy
    /// AttachTo as written, for access reviews.
    public var attachText: [String] = []

    /// The statements that cover `key` (their Resource names it).
    public func statements(covering key: KeyID) -> [KeyPolicy.Statement] {
        policy.statements.filter { s in s.resources.map { $0.contains { $0.matches(key.arn) } } ?? true }
    }

    /// Parses one identity policy (strictly, as PutKeyPolicy does); `name` names it in decisions.
    public static func parse(_ text: String, name: String) throws(KMSError) -> IdentityPolicy {
        guard text.utf8.count <= KeyPolicy.maxBytes else { throw KeyPolicy.invalid("\(name): more than \(KeyPolicy.maxBytes) bytes") }
        guard let doc = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] else {
            throw KeyPolicy.invalid("\(name) is not a JSON object")
        }
        try KeyPolicy.allowOnly(doc, ["Version", "Id", "AttachTo", "Statement"], at: name)
        if let version = doc["Version"], version as? String != "2012-10-17" { throw KeyPolicy.invalid("\(name).Version must be \"2012-10-17\"") }
        guard let attach = doc["AttachTo"] else { throw KeyPolicy.invalid("\(name) needs AttachTo, e.g. {\"User\": \"alice\"}") }
        let attachTo = try PrincipalPattern.parse(attach, at: "\(name).AttachTo", strict: true)
        guard !attachTo.everyone, !attachTo.identityPolicies else { throw KeyPolicy.invalid("\(name).AttachTo must name users, groups, uids, units or executables") }
        guard let raw = doc["Statement"] else { throw KeyPolicy.invalid("\(name) has no Statement") }
        let list: [Any] = (raw as? [Any]) ?? [raw]
        guard !list.isEmpty else { throw KeyPolicy.invalid("\(name).Statement is empty") }
        var statements: [KeyPolicy.Statement] = []
        var sids = Set<String>()
        for (i, item) in list.enumerated() {
            guard let s = item as? [String: Any] else { throw KeyPolicy.invalid("\(name).Statement[\(i)] must be an object") }
            let statement = try KeyPolicy.parseStatement(s, index: i, at: "\(name).Statement[\(i)]", strict: true, identity: true)
            if let sid = statement.sid, !sid.isEmpty, !sids.insert(sid).inserted {
                throw KeyPolicy.invalid("\(name).Statement[\(i)].Sid \"\(sid)\" is used by an earlier statement; Sids must be unique")
            }
            statements.append(statement)
        }
        var attachText: [String] = []
        if let object = attach as? [String: Any] {
            for kind in object.keys.sorted() { for v in (try? KeyPolicy.strings(object[kind]!, at: "")) ?? [] { attachText.append("\(kind):\(v)") } }
        }
        return IdentityPolicy(name: name, attachTo: attachTo, policy: KeyPolicy(id: doc["Id"] as? String, statements: statements), attachText: attachText)
    }
}

/// The identity policies in force; replaced as a whole on reload.
public struct IdentityPolicySet: Sendable {
    public let policies: [IdentityPolicy]
    public init(_ policies: [IdentityPolicy] = []) { self.policies = policies }

    /// Loads every `*.json` file of `directory` (none: an empty set). Throws ValidationException
    /// naming the first file that is wrong; nothing is half-loaded.
    public static func load(directory: String) throws(KMSError) -> IdentityPolicySet {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else {
            throw KMSError(.validation, "cannot read the identity-policy directory \(directory)")
        }
        var policies: [IdentityPolicy] = []
        for file in names.sorted() where file.hasSuffix(".json") {
            var st = stat()
            guard lstat(directory + "/" + file, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_mode & 0o022 == 0,
                  st.st_uid == 0 || st.st_uid == geteuid() else {
                throw KMSError(.validation, "identity policy \(directory)/\(file) must be a regular file owned by root or kmsd's user that only its owner may write")
            }
            guard !file.contains(":") else { throw KMSError(.validation, "identity policy file names may not contain ':' (\(file))") }
            guard let data = FileManager.default.contents(atPath: directory + "/" + file), let text = String(data: data, encoding: .utf8) else {
                throw KMSError(.validation, "cannot read identity policy \(directory)/\(file)")
            }
            policies.append(try IdentityPolicy.parse(text, name: String(file.dropLast(".json".count))))
        }
        return IdentityPolicySet(policies)
    }

    /// The identity policies attached to the caller, together: an explicit Deny wins, else the
    /// first Allow names the decision, else implicit deny. An attachment kmsd cannot establish
    /// (groups, unit, executable unknown) brings the policy's Denies, never its Allows.
    public func evaluate(_ f: RequestFacts) -> PolicyDecision {
        var allow: PolicyDecision? = nil
        for p in policies {
            let attached = p.attachTo.match(f)
            guard attached != .no else { continue }
            let d = p.policy.evaluate(f, source: "identity-policy:\(p.name)")
            if d.effect == .explicitDeny { return d }
            if attached == .yes, d.allowed, allow == nil { allow = d }
        }
        return allow ?? .implicitDeny
    }
}

/// One condition: an operator (with an optional ForAllValues:/ForAnyValue: prefix and IfExists
/// suffix), a condition key and the policy's values.
struct Condition: Sendable {
    enum Op: String, CaseIterable, Sendable {
        case stringEquals = "StringEquals", stringNotEquals = "StringNotEquals"
        case stringEqualsIgnoreCase = "StringEqualsIgnoreCase", stringNotEqualsIgnoreCase = "StringNotEqualsIgnoreCase"
        case stringLike = "StringLike", stringNotLike = "StringNotLike"
        case numericEquals = "NumericEquals", numericNotEquals = "NumericNotEquals"
        case numericLessThan = "NumericLessThan", numericLessThanEquals = "NumericLessThanEquals"
        case numericGreaterThan = "NumericGreaterThan", numericGreaterThanEquals = "NumericGreaterThanEquals"
        case bool = "Bool", null = "Null"

        /// Operators whose sense is "matches none of the values": true when the key is absent.
        var negated: Bool { [.stringNotEquals, .stringNotEqualsIgnoreCase, .stringNotLike, .numericNotEquals].contains(self) }
        var numeric: Bool { rawValue.hasPrefix("Numeric") }
    }

    enum SetMode: Sendable { case single, forAllValues, forAnyValue }

    let op: Op
    let mode: SetMode
    let ifExists: Bool
    let key: ConditionKey
    let values: [String]
    let globs: [Glob]
    let numbers: [Double]

    static func parse(operator raw: String, key rawKey: String, values rawValues: Any, at: String) throws(KMSError) -> Condition {
        var name = Substring(raw)
        var mode = SetMode.single
        if name.hasPrefix("ForAllValues:") { mode = .forAllValues; name = name.dropFirst("ForAllValues:".count) }
        else if name.hasPrefix("ForAnyValue:") { mode = .forAnyValue; name = name.dropFirst("ForAnyValue:".count) }
        var ifExists = false
        if name.hasSuffix("IfExists") { ifExists = true; name = name.dropLast("IfExists".count) }
        guard let op = Op(rawValue: String(name)) else {
            throw KeyPolicy.invalid("\(at): \"\(raw.prefix(60))\" is not a condition operator kmsd knows (\(Op.allCases.map(\.rawValue).joined(separator: ", ")), with ForAllValues:/ForAnyValue: and ...IfExists)")
        }
        if op == .null && (ifExists || mode != .single) { throw KeyPolicy.invalid("\(at): Null takes neither IfExists nor a set prefix") }
        guard let key = ConditionKey(parsing: rawKey) else {
            throw KeyPolicy.invalid("\(at): \"\(rawKey.prefix(80))\" is not a condition key kmsd knows (\(ConditionKey.names))")
        }
        if key.isMultiValued && mode == .single && op != .null {
            throw KeyPolicy.invalid("\(at): \(rawKey) has many values; use ForAllValues:\(op.rawValue) or ForAnyValue:\(op.rawValue)")
        }
        let values = try KeyPolicy.strings(rawValues, at: at)
        var numbers: [Double] = []
        if op.numeric {
            for (i, v) in values.enumerated() {
                guard let n = Double(v) else { throw KeyPolicy.invalid("\(at)[\(i)] \"\(v.prefix(40))\" is not a number") }
                numbers.append(n)
            }
        }
        if op == .bool || op == .null {
            for (i, v) in values.enumerated() where v.lowercased() != "true" && v.lowercased() != "false" {
                throw KeyPolicy.invalid("\(at)[\(i)] must be true or false")
            }
        }
        return Condition(op: op, mode: mode, ifExists: ifExists, key: key, values: values,
                         globs: op == .stringLike || op == .stringNotLike ? values.map(Glob.init) : [], numbers: numbers)
    }

    func holds(_ f: RequestFacts) -> Bool {
        // Single-valued keys (most of them) without building an array per evaluation.
        if !key.isMultiValued {
            let value = key.value(in: f)
            if op == .null { return values.contains { $0.lowercased() == (value == nil ? "true" : "false") } }
            guard let value else { return absent }
            return matches(value)  // one value: ForAllValues and ForAnyValue agree with it
        }
        let actual = key.values(in: f)
        if op == .null {
            let isAbsent = actual == nil || actual!.isEmpty
            return values.contains { $0.lowercased() == (isAbsent ? "true" : "false") }
        }
        guard let actual else { return absent }
        switch mode {
        case .single: return actual.first.map(matches) ?? op.negated
        case .forAllValues: return actual.allSatisfy(matches)
        case .forAnyValue: return actual.contains(where: matches)
        }
    }

    /// Whether the condition holds when the request has no value for its key: IfExists passes;
    /// ForAllValues over nothing holds; a negated operator holds (nothing matches the values);
    /// anything else fails (AWS's rules).
    private var absent: Bool {
        if ifExists { return true }
        switch mode {
        case .forAllValues: return true
        case .forAnyValue: return false
        case .single: return op.negated
        }
    }

    /// One request value against the policy's values.
    private func matches(_ v: String) -> Bool {
        switch op {
        // Bytes, not Unicode equivalence: contexts are bound byte for byte everywhere else.
        case .stringEquals: return values.contains { $0.utf8.elementsEqual(v.utf8) }
        case .stringNotEquals: return !values.contains { $0.utf8.elementsEqual(v.utf8) }
        case .stringEqualsIgnoreCase: return values.contains { $0.caseInsensitiveCompare(v) == .orderedSame }
        case .stringNotEqualsIgnoreCase: return !values.contains { $0.caseInsensitiveCompare(v) == .orderedSame }
        case .stringLike: return globs.contains { $0.matches(v) }
        case .stringNotLike: return !globs.contains { $0.matches(v) }
        case .bool: return values.contains { $0.lowercased() == v.lowercased() }
        case .null: return false
        case .numericEquals, .numericNotEquals, .numericLessThan, .numericLessThanEquals, .numericGreaterThan, .numericGreaterThanEquals:
            guard let n = Double(v) else { return op.negated }
            switch op {
            case .numericEquals: return numbers.contains(n)
            case .numericNotEquals: return !numbers.contains(n)
            case .numericLessThan: return numbers.contains { n < $0 }
            case .numericLessThanEquals: return numbers.contains { n <= $0 }
            case .numericGreaterThan: return numbers.contains { n > $0 }
            default: return numbers.contains { n >= $0 }
            }
        }
    }
}

/// The condition keys kmsd evaluates.
enum ConditionKey: Sendable, Equatable {
    case encryptionContext(String), resourceTag(String)
    case encryptionContextKeys, callerUnit, callerExecutable, callerUid, callerUser, requestAlias, resourceAliases
    case keySpec, keyOrigin, keyUsage, bypassPolicyLockoutSafetyCheck, pendingWindowInDays
    case grantOperations, granteePrincipal, retiringPrincipal
    case region, multiRegion, multiRegionKeyType

    static let simple: [String: ConditionKey] = [
        "kms:encryptioncontextkeys": .encryptionContextKeys, "kms:callerunit": .callerUnit,
        "kms:callerexecutable": .callerExecutable, "kms:calleruid": .callerUid, "kms:calleruser": .callerUser,
        "kms:requestalias": .requestAlias, "kms:resourcealiases": .resourceAliases, "kms:keyspec": .keySpec,
        "kms:keyorigin": .keyOrigin, "kms:keyusage": .keyUsage,
        "kms:bypasspolicylockoutsafetycheck": .bypassPolicyLockoutSafetyCheck,
        "kms:schedulekeydeletionpendingwindowindays": .pendingWindowInDays,
        "kms:grantoperations": .grantOperations, "kms:granteeprincipal": .granteePrincipal,
        "kms:retiringprincipal": .retiringPrincipal,
        "kms:region": .region, "kms:multiregion": .multiRegion, "kms:multiregionkeytype": .multiRegionKeyType,
    ]

    static let names = "kms:EncryptionContext:KEY, kms:EncryptionContextKeys, kms:CallerUnit, kms:CallerExecutable, kms:CallerUid, kms:CallerUser, kms:RequestAlias, kms:ResourceAliases, kms:ResourceTag/KEY, kms:KeySpec, kms:KeyOrigin, kms:KeyUsage, kms:BypassPolicyLockoutSafetyCheck, kms:ScheduleKeyDeletionPendingWindowInDays, kms:GrantOperations, kms:GranteePrincipal, kms:RetiringPrincipal, kms:Region, kms:MultiRegion, kms:MultiRegionKeyType"

    /// Condition key names are case-insensitive (as in AWS); the part after
    /// `kms:EncryptionContext:` or `kms:ResourceTag/` is kept exactly.
    init?(parsing raw: String) {
        let lower = raw.lowercased()
        if lower.hasPrefix("kms:encryptioncontext:") {
            let name = String(raw.dropFirst("kms:EncryptionContext:".count))
            guard !name.isEmpty else { return nil }
            self = .encryptionContext(name)
        } else if lower.hasPrefix("kms:resourcetag/") {
            let name = String(raw.dropFirst("kms:ResourceTag/".count))
            guard !name.isEmpty else { return nil }
            self = .resourceTag(name)
        } else if let k = Self.simple[lower] {
            self = k
        } else {
            return nil
        }
    }

    var isMultiValued: Bool {
        switch self {
        case .encryptionContextKeys, .resourceAliases, .grantOperations: true
        default: false
        }
    }

    /// A single-valued key's value; nil when the request has none.
    func value(in f: RequestFacts) -> String? {
        switch self {
        case .encryptionContext(let k): return f.encryptionContext?.first { $0.key.utf8.elementsEqual(k.utf8) }?.value
        case .callerUnit: return f.caller.systemdUnit
        case .callerExecutable: return f.caller.executable
        case .callerUid: return String(f.caller.uid)
        case .callerUser: return f.caller.userName.isEmpty ? nil : f.caller.userName
        case .requestAlias: return f.requestAlias
        case .resourceTag(let k): return f.key?.tags.first { $0.key.utf8.elementsEqual(k.utf8) }?.value
        case .keySpec: return f.key?.keySpec.rawValue
        case .keyOrigin: return f.key?.origin
        case .keyUsage: return f.key?.keyUsage.rawValue
        case .bypassPolicyLockoutSafetyCheck: return f.bypassPolicyLockoutSafetyCheck.map { $0 ? "true" : "false" }
        case .pendingWindowInDays: return f.pendingWindowInDays.map { String($0) }
        case .granteePrincipal: return f.granteePrincipal
        case .retiringPrincipal: return f.retiringPrincipal
        case .region: return f.region
        case .multiRegion: return f.key.map { $0.keyID.isMultiRegion ? "true" : "false" }
        case .multiRegionKeyType: return f.key?.multiRegionKeyType
        case .encryptionContextKeys, .resourceAliases, .grantOperations: return values(in: f)?.first
        }
    }

    /// The request's values for this key; nil when the request has none.
    func values(in f: RequestFacts) -> [String]? {
        switch self {
        case .encryptionContext(let k): return f.encryptionContext?.first { $0.key.utf8.elementsEqual(k.utf8) }.map { [$0.value] }
        case .encryptionContextKeys: return f.encryptionContext.map { $0.map(\.key) }
        case .callerUnit: return f.caller.systemdUnit.map { [$0] }
        case .callerExecutable: return f.caller.executable.map { [$0] }
        case .callerUid: return [String(f.caller.uid)]
        case .callerUser: return f.caller.userName.isEmpty ? nil : [f.caller.userName]
        case .requestAlias: return f.requestAlias.map { [$0] }
        case .resourceAliases:
            if let lookup = f.resourceAliases { return lookup() }
            guard let repository = f.aliasSource, let id = f.key?.keyID else { return nil }
            return (try? repository.aliasNames(keyID: id, after: nil, limit: 100)) ?? []
        case .resourceTag(let k): return f.key?.tags.first { $0.key.utf8.elementsEqual(k.utf8) }.map { [$0.value] }
        case .keySpec: return f.key.map { [$0.keySpec.rawValue] }
        case .keyOrigin: return f.key.map { [$0.origin] }
        case .keyUsage: return f.key.map { [$0.keyUsage.rawValue] }
        case .bypassPolicyLockoutSafetyCheck: return f.bypassPolicyLockoutSafetyCheck.map { [$0 ? "true" : "false"] }
        case .pendingWindowInDays: return f.pendingWindowInDays.map { [String($0)] }
        case .grantOperations: return f.grantOperations
        case .granteePrincipal: return f.granteePrincipal.map { [$0] }
        case .retiringPrincipal: return f.retiringPrincipal.map { [$0] }
        case .region: return f.region.map { [$0] }
        case .multiRegion: return f.key.map { [$0.keyID.isMultiRegion ? "true" : "false"] }
        case .multiRegionKeyType: return f.key?.multiRegionKeyType.map { [$0] }
        }
    }
}

/// The policy a key has until PutKeyPolicy replaces it: its creator and kmsd's administrators
/// may administer and use it; identity policies (configured by administrators) may grant more,
/// as AWS's default key policy lets IAM policies do; nobody else.
public enum DefaultKeyPolicy {
    public static func text(owner: UInt32) -> String {
        """
        {
          "Version": "2012-10-17",
          "Id": "kmsd-default-key-policy",
          "Statement": [
            {
              "Sid": "KeyCreator",
              "Effect": "Allow",
              "Principal": {"Uid": "\(owner)"},
              "Action": "kms:*",
              "Resource": "*"
            },
            {
              "Sid": "Administrators",
              "Effect": "Allow",
              "Principal": {"Role": "Administrators"},
              "Action": "kms:*",
              "Resource": "*"
            },
            {
              "Sid": "EnableIdentityPolicies",
              "Effect": "Allow",
              "Principal": {"Role": "IdentityPolicies"},
              "Action": "kms:*",
              "Resource": "*"
            }
          ]
        }
        """
    }
}
