import ArgumentParser
import Foundation
import KMSClient

struct GetKeyPolicy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get-key-policy",
        abstract: "Print a key's policy (JSON); a key without one shows the default (its creator and the administrators).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("policy-name"), help: ArgumentHelp("The policy's name; a key has one, named default.", valueName: "name"))
    var policyName = "default"

    func run() async throws {
        let policy = try await global.withClient { try await $0.getKeyPolicy(keyID: key.keyID, policyName: policyName) }
        if global.json { try printJSON(["Policy": policy, "PolicyName": "default"]) } else {
            writeStdout(policy.hasSuffix("\n") ? policy : policy + "\n")
        }
    }
}

struct PutKeyPolicy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put-key-policy",
        abstract: "Replace a key's policy. Refused when it would lock you out of changing it again, unless --bypass-policy-lockout-safety-check.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("policy"), help: ArgumentHelp("The policy: file://PATH, - for standard input, or the JSON itself.", valueName: "file://path"))
    var policy: String

    @Option(name: .customLong("policy-name"), help: ArgumentHelp("The policy's name; a key has one, named default.", valueName: "name"))
    var policyName = "default"

    @Flag(name: .customLong("bypass-policy-lockout-safety-check"), help: "Accept a policy that does not let you change it again.")
    var bypass = false

    func run() async throws {
        let text = try readTextArgument(policy, option: "--policy")
        try await global.withClient {
            try await $0.putKeyPolicy(keyID: key.keyID, policy: text, policyName: policyName, bypassPolicyLockoutSafetyCheck: bypass)
        }
        if global.json { try printJSON([:]) }
    }
}

struct ListKeyPolicies: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-key-policies",
        abstract: "List the names of a key's policies (always: default).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    func run() async throws {
        let names = try await global.withClient { try await $0.listKeyPolicies(keyID: key.keyID) }
        if global.json { try printJSON(["PolicyNames": names, "Truncated": false]) } else {
            for n in names { writeStdout(n + "\n") }
        }
    }
}

struct SimulatePolicy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate-policy",
        abstract: "Would a principal be allowed an action on a key, and which statement decides? (beyond AWS)",
        discussion: """
        The principal is a uid or user, with optional groups, systemd unit and executable. With only
        --unit or --executable, the process is taken to run as nobody (uid 65534). --policy evaluates a
        candidate policy instead of the key's, so a policy can be tried before put-key-policy.
        """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("action"), help: ArgumentHelp("The action, e.g. kms:Decrypt.", valueName: "kms:Action"))
    var action: String

    @Option(name: .customLong("uid"), help: ArgumentHelp("The principal's uid.", valueName: "n"))
    var uid: UInt32?

    @Option(name: .customLong("user"), help: ArgumentHelp("The principal's user name.", valueName: "name"))
    var user: String?

    @Option(name: .customLong("group"), help: ArgumentHelp("A group of the principal (name or gid). Repeatable.", valueName: "group"))
    var groups: [String] = []

    @Option(name: .customLong("unit"), help: ArgumentHelp("The systemd unit the principal runs in.", valueName: "unit"))
    var unit: String?

    @Option(name: .customLong("executable"), help: ArgumentHelp("The principal's executable (absolute path).", valueName: "path"))
    var executable: String?

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE. Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @Option(name: .customLong("policy"), help: ArgumentHelp("A candidate policy to evaluate instead of the key's: file://PATH, - or JSON.", valueName: "file://path"))
    var policy: String?

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        guard uid != nil || user != nil || unit != nil || executable != nil else {
            throw ValidationError("name the principal: --uid N, --user NAME, --unit UNIT or --executable PATH")
        }
    }

    func run() async throws {
        let principal = Kmsd_V1_SimulatedPrincipal.with {
            if let uid { $0.uid = uid; $0.hasUid_p = true } else if user == nil { $0.uid = 65534; $0.hasUid_p = true }
            $0.user = user ?? ""
            $0.groups = groups
            $0.unit = unit ?? ""
            $0.executable = executable ?? ""
        }
        let candidate = try policy.map { try readTextArgument($0, option: "--policy") } ?? ""
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        let r = try await global.withClient {
            try await $0.simulatePolicy(keyID: key.keyID, action: action, principal: principal, context: contextMap, policy: candidate)
        }
        if global.json {
            try printJSON(["Decision": r.decision, "DecidedBy": r.decidedBy, "KeyId": r.keyID])
        } else {
            printFields([("Decision", r.decision), ("DecidedBy", r.decidedBy), ("KeyId", r.keyID)])
        }
    }
}
