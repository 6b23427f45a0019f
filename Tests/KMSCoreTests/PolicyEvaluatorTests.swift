import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// The policy evaluator as a pure function: request facts + policy → decision, over a table of
/// cases (AWS's evaluation logic: default deny, explicit Deny wins, Allow needs a matching
/// statement; conditions, set operators, IfExists, Null, NotPrincipal, NotAction), and the
/// strict parser's errors, each naming where the problem is.
struct PolicyEvaluatorTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let statements: [String]
        var action = "Encrypt"
        var uid: UInt32 = 1000
        var gid: UInt32 = 1000
        var groups: [UInt32] = []
        var groupsKnown = true
        var unit: String? = nil
        var exe: String? = nil
        var unresolved = false
        var admin = false
        var context: [String: String]? = nil
        var tags: [KMSCore.Tag] = []
        var alias: String? = nil
        var aliases: [String]? = nil
        var origin = "AWS_KMS"
        var bypass: Bool? = nil
        var window: UInt32? = nil
        let expect: PolicyDecision.Effect
        var by: String? = nil

        var testDescription: String { name }

        var policy: String { #"{"Version": "2012-10-17", "Statement": [\#(statements.joined(separator: ","))]}"# }

        var facts: RequestFacts {
            var caller = Principal(uid: uid, gid: gid, pid: 42, userName: uid == 0 ? "root" : "user\(uid)", groups: groups,
                                   executable: exe, systemdUnit: unit)
            caller.groupsKnown = groupsKnown
            if unresolved {
                caller.unresolved = "test: identity not established"
                caller.executableKnown = false
                caller.unitKnown = false
            }
            var key = KeyRecord(keyID: KeyID(bytes: Array(repeating: 7, count: 16)), createdAt: Date(timeIntervalSince1970: 0),
                                description: "", keyUsage: .encryptDecrypt, keySpec: .symmetricDefault, state: .enabled,
                                ownerUID: 1000, currentVersion: 1, tags: tags, origin: origin)
            key.description = "t"
            var f = RequestFacts(action: action, caller: caller, isAdministrator: admin, key: key)!
            f.encryptionContext = context?.contextPairs
            f.requestAlias = alias
            if let aliases { f.resourceAliases = { aliases } }
            f.bypassPolicyLockoutSafetyCheck = bypass
            f.pendingWindowInDays = window
            return f
        }
    }

    static func allow(_ sid: String, _ principal: String = #"{"Uid": "1000"}"#, _ action: String = #""kms:*""#, _ condition: String? = nil,
                      effect: String = "Allow", notPrincipal: Bool = false, notAction: Bool = false) -> String {
        var s = #"{"Sid": "\#(sid)", "Effect": "\#(effect)", "\#(notPrincipal ? "NotPrincipal" : "Principal")": \#(principal), "\#(notAction ? "NotAction" : "Action")": \#(action), "Resource": "*""#
        if let condition { s += #", "Condition": \#(condition)"# }
        return s + "}"
    }

    static func deny(_ sid: String, _ principal: String = #"{"Uid": "1000"}"#, _ action: String = #""kms:*""#, _ condition: String? = nil,
                     notPrincipal: Bool = false, notAction: Bool = false) -> String {
        allow(sid, principal, action, condition, effect: "Deny", notPrincipal: notPrincipal, notAction: notAction)
    }

    static let cases: [Case] = [
        // Default deny, explicit allow, explicit deny wins (AWS evaluation logic).
        Case(name: "no statement applies: implicit deny", statements: [allow("Other", #"{"Uid": "2000"}"#)], expect: .implicitDeny, by: "implicit-deny"),
        Case(name: "uid allowed", statements: [allow("Me")], expect: .allow, by: "key-policy:Me"),
        Case(name: "explicit deny beats allow", statements: [allow("Me"), deny("NoEncrypt", #"{"Uid": "1000"}"#, #""kms:Encrypt""#)], expect: .explicitDeny, by: "key-policy:NoEncrypt"),
        Case(name: "deny listed first still wins", statements: [deny("D"), allow("A")], expect: .explicitDeny, by: "key-policy:D"),
        Case(name: "deny for another action leaves allow", statements: [allow("A"), deny("D", #"{"Uid": "1000"}"#, #""kms:Decrypt""#)], expect: .allow, by: "key-policy:A"),
        Case(name: "first matching allow names the decision", statements: [allow("First"), allow("Second")], expect: .allow, by: "key-policy:First"),
        Case(name: "statement without Sid is named by position", statements: [#"{"Effect": "Allow", "Principal": "*", "Action": "kms:Encrypt"}"#], expect: .allow, by: "key-policy:#0"),
        Case(name: "everyone principal", statements: [allow("All", #""*""#)], uid: 4242, expect: .allow),
        Case(name: "deny everyone", statements: [allow("Me"), deny("Nobody", #""*""#)], expect: .explicitDeny),
        // Actions.
        Case(name: "exact action", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:Encrypt""#)], expect: .allow),
        Case(name: "other action not allowed", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:Encrypt""#)], action: "Decrypt", expect: .implicitDeny),
        Case(name: "action names are case-insensitive", statements: [allow("A", #"{"Uid": "1000"}"#, #""KMS:encrypt""#)], expect: .allow),
        Case(name: "wildcard GenerateDataKey* covers WithoutPlaintext", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:GenerateDataKey*""#)], action: "GenerateDataKeyWithoutPlaintext", expect: .allow),
        Case(name: "wildcard GenerateDataKey* does not cover Encrypt", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:GenerateDataKey*""#)], expect: .implicitDeny),
        Case(name: "ReEncrypt* covers ReEncryptFrom", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:ReEncrypt*""#)], action: "ReEncryptFrom", expect: .allow),
        Case(name: "action list", statements: [allow("A", #"{"Uid": "1000"}"#, #"["kms:Decrypt", "kms:Encrypt"]"#)], expect: .allow),
        Case(name: "question mark wildcard", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:?ncrypt""#)], expect: .allow),
        Case(name: "NotAction allows everything else", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:Decrypt""#, notAction: true)], expect: .allow),
        Case(name: "NotAction excludes its action", statements: [allow("A", #"{"Uid": "1000"}"#, #""kms:Encrypt""#, notAction: true)], expect: .implicitDeny),
        Case(name: "deny NotAction denies the rest", statements: [allow("A"), deny("OnlyDescribe", #"{"Uid": "1000"}"#, #""kms:DescribeKey""#, notAction: true)], expect: .explicitDeny),
        Case(name: "deny NotAction spares its action", statements: [allow("A"), deny("OnlyDescribe", #"{"Uid": "1000"}"#, #""kms:DescribeKey""#, notAction: true)], action: "DescribeKey", expect: .allow),
        // Principals.
        Case(name: "user by name", statements: [allow("Root", #"{"User": "root"}"#)], uid: 0, expect: .allow),
        Case(name: "user by name, other uid", statements: [allow("Root", #"{"User": "root"}"#)], expect: .implicitDeny),
        Case(name: "uid as a JSON number", statements: [allow("N", #"{"Uid": 1000}"#)], expect: .allow),
        Case(name: "uid list", statements: [allow("L", #"{"Uid": ["5", "1000"]}"#)], expect: .allow),
        Case(name: "primary group", statements: [allow("G", #"{"Group": "1000"}"#)], uid: 3000, gid: 1000, expect: .allow),
        Case(name: "supplementary group", statements: [allow("G", #"{"Group": "4321"}"#)], groups: [4321], expect: .allow),
        Case(name: "group not held", statements: [allow("G", #"{"Group": "4321"}"#)], groups: [1], expect: .implicitDeny),
        Case(name: "unknown groups never allow", statements: [allow("G", #"{"Group": "4321"}"#)], groups: [4321], groupsKnown: false, expect: .implicitDeny),
        Case(name: "unknown groups always deny", statements: [allow("A"), deny("G", #"{"Group": "4321"}"#)], groupsKnown: false, expect: .explicitDeny),
        Case(name: "unit", statements: [allow("U", #"{"Unit": "payroll.service"}"#)], uid: 2000, unit: "payroll.service", expect: .allow),
        Case(name: "unit glob", statements: [allow("U", #"{"Unit": "backup-*.service"}"#)], uid: 2000, unit: "backup-db.service", expect: .allow),
        Case(name: "other unit", statements: [allow("U", #"{"Unit": "payroll.service"}"#)], uid: 2000, unit: "web.service", expect: .implicitDeny),
        Case(name: "no unit", statements: [allow("U", #"{"Unit": "payroll.service"}"#)], uid: 2000, expect: .implicitDeny),
        Case(name: "unresolved unit denies", statements: [allow("A", #""*""#), deny("U", #"{"Unit": "evil.service"}"#)], uid: 2000, unresolved: true, expect: .explicitDeny),
        Case(name: "executable", statements: [allow("E", #"{"Executable": "/usr/bin/app"}"#)], uid: 2000, exe: "/usr/bin/app", expect: .allow),
        Case(name: "other executable", statements: [allow("E", #"{"Executable": "/usr/bin/app"}"#)], uid: 2000, exe: "/tmp/app", expect: .implicitDeny),
        Case(name: "administrators role", statements: [allow("Admins", #"{"Role": "Administrators"}"#)], uid: 2000, admin: true, expect: .allow),
        Case(name: "administrators role, not one", statements: [allow("Admins", #"{"Role": "Administrators"}"#)], uid: 2000, expect: .implicitDeny),
        Case(name: "NotPrincipal allow covers others", statements: [allow("NP", #"{"Uid": "1000"}"#, notPrincipal: true)], uid: 2000, expect: .allow),
        Case(name: "NotPrincipal allow excludes its principal", statements: [allow("NP", #"{"Uid": "1000"}"#, notPrincipal: true)], expect: .implicitDeny),
        Case(name: "NotPrincipal deny spares its principal", statements: [allow("All", #""*""#), deny("OnlyOwner", #"{"Uid": "1000"}"#, notPrincipal: true)], expect: .allow),
        Case(name: "NotPrincipal deny hits everyone else", statements: [allow("All", #""*""#), deny("OnlyOwner", #"{"Uid": "1000"}"#, notPrincipal: true)], uid: 2000, expect: .explicitDeny),
        // Conditions: encryption context.
        Case(name: "context equals", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:Decrypt""#, #"{"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}"#)], action: "Decrypt", context: ["dept": "payroll"], expect: .allow),
        Case(name: "context differs", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:Decrypt""#, #"{"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}"#)], action: "Decrypt", context: ["dept": "sales"], expect: .implicitDeny),
        Case(name: "context missing", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:Decrypt""#, #"{"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}"#)], action: "Decrypt", context: [:], expect: .implicitDeny),
        Case(name: "context value case matters", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:EncryptionContext:dept": "payroll"}}"#)], context: ["dept": "Payroll"], expect: .implicitDeny),
        Case(name: "context IgnoreCase", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEqualsIgnoreCase": {"kms:EncryptionContext:dept": "payroll"}}"#)], context: ["dept": "Payroll"], expect: .allow),
        Case(name: "StringNotEquals with absent key holds", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringNotEquals": {"kms:EncryptionContext:dept": "payroll"}}"#)], context: [:], expect: .allow),
        Case(name: "StringLike", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringLike": {"kms:EncryptionContext:path": "/data/*"}}"#)], context: ["path": "/data/x/y"], expect: .allow),
        Case(name: "StringNotLike", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringNotLike": {"kms:EncryptionContext:path": "/data/*"}}"#)], context: ["path": "/data/x"], expect: .implicitDeny),
        Case(name: "IfExists passes when absent", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEqualsIfExists": {"kms:EncryptionContext:dept": "payroll"}}"#)], context: [:], expect: .allow),
        Case(name: "IfExists still checks when present", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEqualsIfExists": {"kms:EncryptionContext:dept": "payroll"}}"#)], context: ["dept": "x"], expect: .implicitDeny),
        Case(name: "ForAllValues keys subset", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a", "b"]}}"#)], context: ["a": "1"], expect: .allow),
        Case(name: "ForAllValues extra key", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a", "b"]}}"#)], context: ["a": "1", "c": "2"], expect: .implicitDeny),
        Case(name: "ForAllValues over no context holds (AWS's gotcha)", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["a"]}}"#)], expect: .allow),
        Case(name: "ForAnyValue needs one", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["a"]}}"#)], context: ["z": "1", "a": "2"], expect: .allow),
        Case(name: "ForAnyValue over no context fails", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["a"]}}"#)], expect: .implicitDeny),
        Case(name: "Null true: no context", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"Null": {"kms:EncryptionContextKeys": "true"}}"#)], expect: .allow),
        Case(name: "Null false: context required", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"Null": {"kms:EncryptionContextKeys": "false"}}"#)], context: [:], expect: .implicitDeny),
        Case(name: "Deny without context (Null)", statements: [allow("A"), deny("NeedContext", #""*""#, #""kms:Encrypt""#, #"{"Null": {"kms:EncryptionContext:app": "true"}}"#)], context: ["other": "x"], expect: .explicitDeny),
        Case(name: "two conditions both hold", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:EncryptionContext:a": "1", "kms:EncryptionContext:b": "2"}}"#)], context: ["a": "1", "b": "2"], expect: .allow),
        Case(name: "two conditions, one fails", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:EncryptionContext:a": "1", "kms:EncryptionContext:b": "2"}}"#)], context: ["a": "1", "b": "3"], expect: .implicitDeny),
        Case(name: "condition value list is OR", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:EncryptionContext:a": ["1", "2"]}}"#)], context: ["a": "2"], expect: .allow),
        // Conditions: caller and key attributes.
        Case(name: "CallerUnit condition", statements: [allow("U", #""*""#, #""kms:Decrypt""#, #"{"StringEquals": {"kms:CallerUnit": "payroll.service"}}"#)], action: "Decrypt", uid: 2000, unit: "payroll.service", expect: .allow),
        Case(name: "CallerUnit absent", statements: [allow("U", #""*""#, #""kms:Decrypt""#, #"{"StringEquals": {"kms:CallerUnit": "payroll.service"}}"#)], action: "Decrypt", uid: 2000, expect: .implicitDeny),
        Case(name: "CallerExecutable like", statements: [allow("E", #""*""#, #""kms:*""#, #"{"StringLike": {"kms:CallerExecutable": "/opt/app/*"}}"#)], uid: 2000, exe: "/opt/app/bin/run", expect: .allow),
        Case(name: "CallerUid numeric less than", statements: [allow("N", #""*""#, #""kms:*""#, #"{"NumericLessThan": {"kms:CallerUid": 1000}}"#)], uid: 999, expect: .allow),
        Case(name: "CallerUid numeric not less than", statements: [allow("N", #""*""#, #""kms:*""#, #"{"NumericLessThan": {"kms:CallerUid": 1000}}"#)], uid: 1000, expect: .implicitDeny),
        Case(name: "ResourceTag", statements: [allow("T", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:ResourceTag/category": "finance"}}"#)], tags: [KMSCore.Tag(key: "category", value: "finance")], expect: .allow),
        Case(name: "ResourceTag other value", statements: [allow("T", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:ResourceTag/category": "finance"}}"#)], tags: [KMSCore.Tag(key: "category", value: "pii")], expect: .implicitDeny),
        Case(name: "ResourceTag deny for pii", statements: [allow("A", #""*""#), deny("Pii", #"{"Unit": "reader.service"}"#, #""kms:*""#, #"{"StringEquals": {"kms:ResourceTag/category": "pii"}}"#, notPrincipal: true)], uid: 2000, tags: [KMSCore.Tag(key: "category", value: "pii")], expect: .explicitDeny),
        Case(name: "RequestAlias", statements: [allow("R", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:RequestAlias": "alias/app"}}"#)], alias: "alias/app", expect: .allow),
        Case(name: "RequestAlias absent", statements: [allow("R", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:RequestAlias": "alias/app"}}"#)], expect: .implicitDeny),
        Case(name: "ResourceAliases any", statements: [allow("R", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"ForAnyValue:StringLike": {"kms:ResourceAliases": "alias/finance-*"}}"#)], aliases: ["alias/x", "alias/finance-eu"], expect: .allow),
        Case(name: "KeySpec", statements: [allow("S", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:KeySpec": "SYMMETRIC_DEFAULT"}}"#)], expect: .allow),
        Case(name: "KeyOrigin EXTERNAL only", statements: [allow("O", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"kms:KeyOrigin": "EXTERNAL"}}"#)], expect: .implicitDeny),
        Case(name: "condition key names are case-insensitive", statements: [allow("C", #"{"Uid": "1000"}"#, #""kms:*""#, #"{"StringEquals": {"KMS:encryptioncontext:dept": "x"}}"#)], context: ["dept": "x"], expect: .allow),
        Case(name: "Bool on the lockout bypass", statements: [allow("A"), deny("NoBypass", #""*""#, #""kms:PutKeyPolicy""#, #"{"Bool": {"kms:BypassPolicyLockoutSafetyCheck": true}}"#)], action: "PutKeyPolicy", bypass: true, expect: .explicitDeny),
        Case(name: "window at least 14 days", statements: [allow("A"), deny("Window", #""*""#, #""kms:ScheduleKeyDeletion""#, #"{"NumericLessThan": {"kms:ScheduleKeyDeletionPendingWindowInDays": 14}}"#)], action: "ScheduleKeyDeletion", window: 7, expect: .explicitDeny),
    ]

    @Test(arguments: cases)
    func decision(_ c: Case) throws {
        let policy = try KeyPolicy.parse(c.policy, strict: false)
        let d = policy.evaluate(c.facts)
        #expect(d.effect == c.expect, "\(c.name): \(d)")
        if let by = c.by { #expect(d.decidedBy == by) }
    }

    @Test func theTableIsLargeEnough() { #expect(Self.cases.count >= 60) }

    @Test func theDefaultPolicyIsTodaysRule() throws {
        let policy = try KeyPolicy.parse(DefaultKeyPolicy.text(owner: 1000))
        for action in ["Encrypt", "PutKeyPolicy", "ScheduleKeyDeletion"] {
            var owner = Case(name: "", statements: [], expect: .allow).facts
            owner.action = PolicyActions.index(of: "kms:" + action)!
            #expect(policy.evaluate(owner).decidedBy == "key-policy:KeyCreator")
            var stranger = owner
            stranger.caller.uid = 2000
            #expect(policy.evaluate(stranger).effect == .implicitDeny)
            stranger.isAdministrator = true
            #expect(policy.evaluate(stranger).decidedBy == "key-policy:Administrators")
        }
    }

    /// Each malformed policy is refused with ValidationException naming the place.
    @Test(arguments: [
        ("not json", "not valid JSON"),
        (#"{"Statement": []}"#, "Statement is empty"),
        (#"{"Version": "2008-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}"#, "Version"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Colour": "red"}]}"#, "Statement[0].Colour"),
        (#"{"Statement": [{"Effect": "Permit", "Principal": "*", "Action": "kms:*"}]}"#, "Statement[0].Effect"),
        (#"{"Statement": [{"Effect": "Allow", "Action": "kms:*"}]}"#, "Statement[0] needs exactly one of Principal"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["kms:Encrypt", "kms:Encrpt"]}]}"#, "Statement[0].Action[1]"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject"}]}"#, "Statement[0].Action[0]"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*"}]}"#, "Statement[0].Principal.AWS"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": {"Uid": "alice"}, "Action": "kms:*"}]}"#, "Statement[0].Principal.Uid[0]"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": {"User": "no-such-user-kmsd"}, "Action": "kms:*"}]}"#, "Statement[0].Principal.User[0]"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": {"Executable": "relative/path"}, "Action": "kms:*"}]}"#, "Statement[0].Principal.Executable[0]"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "arn:aws:kms:*"}]}"#, "Statement[0].Resource"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Condition": {"StringEqual": {"kms:KeySpec": "x"}}}]}"#, "Statement[0].Condition.StringEqual"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Condition": {"StringEquals": {"kms:Colour": "x"}}}]}"#, "Statement[0].Condition.StringEquals.kms:Colour"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Condition": {"StringEquals": {"kms:EncryptionContextKeys": "x"}}}]}"#, "ForAllValues"),
        (#"{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Condition": {"NumericLessThan": {"kms:CallerUid": "ten"}}}]}"#, "is not a number"),
        (#"{"Statement": [{"Sid": "A", "Effect": "Allow", "Principal": "*", "Action": "kms:*"}, {"Sid": "A", "Effect": "Deny", "Principal": "*", "Action": "kms:*"}]}"#, "Statement[1].Sid"),
    ])
    func malformedPoliciesAreRefused(policy: String, place: String) {
        do {
            _ = try KeyPolicy.parse(policy)
            Issue.record("accepted: \(policy)")
        } catch {
            #expect(error.code == .validation)
            #expect(error.message.contains(place), "\(error.message) should name \(place)")
        }
    }

    // MARK: - Identity policies combined with key policies

    static let delegating = #"{"Version": "2012-10-17", "Statement": [{"Sid": "Delegate", "Effect": "Allow", "Principal": {"Role": "IdentityPolicies"}, "Action": "kms:*", "Resource": "*"}, {"Sid": "Owner", "Effect": "Allow", "Principal": {"Uid": "1000"}, "Action": "kms:*", "Resource": "*"}]}"#
    static let notDelegating = #"{"Version": "2012-10-17", "Statement": [{"Sid": "Owner", "Effect": "Allow", "Principal": {"Uid": "1000"}, "Action": "kms:*", "Resource": "*"}]}"#

    static func identity(_ name: String, attach: String, _ statement: String) throws -> IdentityPolicy {
        try IdentityPolicy.parse(#"{"Version": "2012-10-17", "AttachTo": \#(attach), "Statement": [\#(statement)]}"#, name: name)
    }

    func decide(keyPolicy: String, identities: [IdentityPolicy], uid: UInt32, groups: [UInt32] = [], action: String = "Decrypt") throws -> PolicyDecision {
        var c = Case(name: "", statements: [], action: action, uid: uid, groups: groups, expect: .allow)
        c.context = [:]
        var f = c.facts
        f.key?.policy = keyPolicy
        let service = try KeyService(repository: KeyRepository(storage: SQLiteKeyStorage(path: ":memory:"), root: RootKey(material: SecureBytes.random(count: 32))),
                                     administrators: Administrators(uids: [0]))
        service.setIdentityPolicies(IdentityPolicySet(identities))
        return service.decide(f)
    }

    @Test func identityPoliciesAllowOnlyWhereTheKeyPolicyDelegates() throws {
        let alice = try Self.identity("alice", attach: #"{"Uid": "2000"}"#, #"{"Sid": "Reads", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*"}"#)
        #expect(try decide(keyPolicy: Self.delegating, identities: [alice], uid: 2000).decidedBy == "identity-policy:alice:Reads")
        #expect(try decide(keyPolicy: Self.notDelegating, identities: [alice], uid: 2000).effect == .implicitDeny)
        #expect(try decide(keyPolicy: Self.delegating, identities: [alice], uid: 2001).effect == .implicitDeny)
        #expect(try decide(keyPolicy: Self.delegating, identities: [alice], uid: 2000, action: "Encrypt").effect == .implicitDeny)
    }

    @Test func anIdentityPolicyDenyBeatsTheKeyPolicy() throws {
        let deny = try Self.identity("no-decrypt", attach: #"{"Group": "4321"}"#, #"{"Sid": "NoDecrypt", "Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}"#)
        let d = try decide(keyPolicy: Self.notDelegating, identities: [deny], uid: 1000, groups: [4321])
        #expect(d.effect == .explicitDeny && d.decidedBy == "identity-policy:no-decrypt:NoDecrypt")
        #expect(try decide(keyPolicy: Self.notDelegating, identities: [deny], uid: 1000).decidedBy == "key-policy:Owner")
    }

    @Test func identityPolicyResourcesNameKeys() throws {
        let key = KeyID(bytes: Array(repeating: 7, count: 16))
        let this = try Self.identity("this", attach: #"{"Uid": "2000"}"#, #"{"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "kmsd:key/\#(key)"}"#)
        let other = try Self.identity("other", attach: #"{"Uid": "2000"}"#, #"{"Effect": "Allow", "Action": "kms:Decrypt", "Resource": ["kmsd:key/00000000-0000-0000-0000-000000000000"]}"#)
        #expect(try decide(keyPolicy: Self.delegating, identities: [this], uid: 2000).allowed)
        #expect(try decide(keyPolicy: Self.delegating, identities: [other], uid: 2000).effect == .implicitDeny)
    }

    @Test(arguments: [
        (#"{"AttachTo": {"Uid": "1"}, "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}"#, "Statement[0].Principal"),
        (#"{"AttachTo": {"Uid": "1"}, "Statement": [{"Effect": "Allow", "Action": "kms:*"}]}"#, "needs Resource"),
        (#"{"AttachTo": {"Uid": "1"}, "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "arn:aws:kms:x"}]}"#, "Resource[0]"),
        (#"{"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#, "needs AttachTo"),
        (#"{"AttachTo": "*", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#, "AttachTo"),
    ])
    func malformedIdentityPoliciesAreRefused(text: String, place: String) {
        do {
            _ = try IdentityPolicy.parse(text, name: "p")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.code == .validation && error.message.contains(place), "\(error.message)")
        }
    }

    @Test func aDelegationIsAnAllowOfItsOwn() {
        let bad = #"{"Statement": [{"Effect": "Deny", "Principal": {"Role": "IdentityPolicies"}, "Action": "kms:*", "Resource": "*"}]}"#
        do {
            _ = try KeyPolicy.parse(bad)
            Issue.record("a Deny naming the IdentityPolicies role was accepted")
        } catch {
            #expect(error.code == .validation && error.message.contains("Statement[0]") && error.message.contains("IdentityPolicies"), "\(error.message)")
        }
    }
}
