import ArgumentParser
import Foundation
import KMSClient

/// `--constraints` as the aws CLI takes it: shorthand
/// `EncryptionContextSubset={k=v,k2=v2}` and/or `EncryptionContextEquals={...}` (several
/// separated by commas or given as separate words), or JSON (`file://PATH` or inline).
func parseGrantConstraints(_ raw: [String]) throws -> (subset: [String: String]?, equals: [String: String]?) {
    let text = try raw.map { try readTextArgument($0, option: "--constraints") }.joined(separator: ",")
    let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
    if trimmed.hasPrefix("{") {
        guard let object = try? JSONSerialization.jsonObject(with: Data(trimmed.utf8)) as? [String: Any] else {
            throw ValidationError("--constraints: not a JSON object")
        }
        for key in object.keys where key != "EncryptionContextSubset" && key != "EncryptionContextEquals" {
            throw ValidationError("--constraints: unknown field \(key) (EncryptionContextSubset, EncryptionContextEquals)")
        }
        func map(_ v: Any?) throws -> [String: String]? {
            guard let v else { return nil }
            guard let m = v as? [String: String] else { throw ValidationError("--constraints: each constraint is an object of strings") }
            return m
        }
        return (try map(object["EncryptionContextSubset"]), try map(object["EncryptionContextEquals"]))
    }
    var subset: [String: String]? = nil, equals: [String: String]? = nil
    var rest = Substring(trimmed)
    while !rest.isEmpty {
        guard let eq = rest.firstIndex(of: "="), rest[rest.index(after: eq)...].hasPrefix("{"),
              let close = rest.firstIndex(of: "}") else {
            throw ValidationError("--constraints takes EncryptionContextSubset={k=v,...} or EncryptionContextEquals={k=v,...}")
        }
        let name = rest[..<eq].trimmingCharacters(in: CharacterSet(charactersIn: ", "))
        let body = rest[rest.index(eq, offsetBy: 2)..<close]
        let pairs = try parseKeyValuePairs(body.split(separator: ",").map(String.init), option: "--constraints \(name)")
        switch name {
        case "EncryptionContextSubset": subset = pairs
        case "EncryptionContextEquals": equals = pairs
        default: throw ValidationError("--constraints: unknown constraint \(name) (EncryptionContextSubset, EncryptionContextEquals)")
        }
        rest = rest[rest.index(after: close)...].drop { $0 == "," || $0 == " " }
    }
    return (subset, equals)
}

func grantDictionary(_ g: Kmsd_V1_GrantListEntry) -> [String: Any] {
    var d: [String: Any] = [
        "KeyId": g.keyID, "GrantId": g.grantID, "Name": g.name, "CreationDate": Int(g.creationDate),
        "GranteePrincipal": g.granteePrincipal, "IssuingPrincipal": g.issuingPrincipal, "Operations": g.operations,
    ]
    if !g.retiringPrincipal.isEmpty { d["RetiringPrincipal"] = g.retiringPrincipal }
    if g.hasConstraints {
        var c: [String: Any] = [:]
        if !g.constraints.encryptionContextSubset.isEmpty { c["EncryptionContextSubset"] = g.constraints.encryptionContextSubset }
        if !g.constraints.encryptionContextEquals.isEmpty { c["EncryptionContextEquals"] = g.constraints.encryptionContextEquals }
        d["Constraints"] = c
    }
    return d
}

func printGrants(_ grants: [Kmsd_V1_GrantListEntry], nextMarker: String, json: Bool) throws {
    if json {
        var out: [String: Any] = ["Grants": grants.map(grantDictionary), "Truncated": !nextMarker.isEmpty]
        if !nextMarker.isEmpty { out["NextMarker"] = nextMarker }
        try printJSON(out)
        return
    }
    printColumns(headers: ["GrantId", "Grantee", "Operations", "Retiring", "Name", "Constraints"], rows: grants.map { g in
        var constraints: [String] = []
        for (k, v) in g.constraints.encryptionContextSubset.sorted(by: { $0.key < $1.key }) { constraints.append("\(k)⊇\(v)") }
        for (k, v) in g.constraints.encryptionContextEquals.sorted(by: { $0.key < $1.key }) { constraints.append("\(k)=\(v)") }
        return [g.grantID, g.granteePrincipal, g.operations.joined(separator: ","), g.retiringPrincipal, g.name, constraints.joined(separator: " ")]
    })
    if !nextMarker.isEmpty { writeStderr("kmsctl: more grants: --marker \(nextMarker)\n") }
}

struct CreateGrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create-grant",
        abstract: "Let a principal use a key for some operations, without changing its policy; effective at once.",
        discussion: "Principals: uid:N, user:NAME, group:NAME, unit:NAME, exe:/PATH.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("grantee-principal"), help: ArgumentHelp("Who receives the permission.", valueName: "principal"))
    var grantee: String

    @Option(name: .customLong("operations"), parsing: .upToNextOption,
            help: ArgumentHelp("Operations, space or comma separated: Encrypt Decrypt GenerateDataKey ...", valueName: "op"))
    var operations: [String]

    @Option(name: .customLong("retiring-principal"), help: ArgumentHelp("Who may retire the grant.", valueName: "principal"))
    var retiring: String = ""

    @Option(name: .customLong("constraints"), parsing: .upToNextOption,
            help: ArgumentHelp("EncryptionContextSubset={k=v,...} and/or EncryptionContextEquals={k=v,...}, or JSON (file://PATH).", valueName: "constraints"))
    var constraints: [String] = []

    @Option(name: .customLong("name"), help: ArgumentHelp("A name; the same name and parameters again return the same grant.", valueName: "name"))
    var name: String = ""

    @Option(name: .customLong("grant-tokens"), parsing: .upToNextOption, help: ArgumentHelp("Accepted for compatibility; grants take effect at once.", valueName: "token"))
    var grantTokens: [String] = []

    func run() async throws {
        let ops = operations.flatMap { $0.split(separator: ",").map(String.init) }
        let c = try parseGrantConstraints(constraints)
        let r = try await global.withClient {
            try await $0.createGrant(keyID: key.keyID, granteePrincipal: grantee, operations: ops, retiringPrincipal: retiring,
                                     contextSubset: c.subset, contextEquals: c.equals, name: name, grantTokens: grantTokens)
        }
        if global.json { try printJSON(["GrantToken": r.grantToken, "GrantId": r.grantID]) } else {
            printFields([("GrantId", r.grantID), ("GrantToken", r.grantToken)])
        }
    }
}

struct ListGrants: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list-grants", abstract: "List a key's grants.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption
    @OptionGroup var page: PageOptions

    @Option(name: .customLong("grant-id"), help: ArgumentHelp("Only this grant.", valueName: "id"))
    var grantID: String = ""

    @Option(name: .customLong("grantee-principal"), help: ArgumentHelp("Only grants to this principal (as written).", valueName: "principal"))
    var grantee: String = ""

    func run() async throws {
        let r = try await global.withClient {
            try await $0.listGrants(keyID: key.keyID, grantID: grantID, granteePrincipal: grantee, limit: page.limit, marker: page.marker)
        }
        try printGrants(r.grants, nextMarker: r.nextMarker, json: global.json)
    }
}

struct ListRetirableGrants: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-retirable-grants",
        abstract: "List the grants a principal may retire (yourself; administrators: anyone).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var page: PageOptions

    @Option(name: .customLong("retiring-principal"), help: ArgumentHelp("The retiring principal, as written in the grants.", valueName: "principal"))
    var retiring: String

    func run() async throws {
        let r = try await global.withClient {
            try await $0.listRetirableGrants(retiringPrincipal: retiring, limit: page.limit, marker: page.marker)
        }
        try printGrants(r.grants, nextMarker: r.nextMarker, json: global.json)
    }
}

struct RetireGrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retire-grant",
        abstract: "Retire a grant (its retiring principal, or its grantee when it grants RetireGrant).")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("grant-token"), help: ArgumentHelp("The grant's token.", valueName: "token"))
    var grantToken: String = ""

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key (with --grant-id).", valueName: "id"))
    var keyID: String = ""

    @Option(name: .customLong("grant-id"), help: ArgumentHelp("The grant (with --key-id).", valueName: "id"))
    var grantID: String = ""

    func validate() throws {
        guard !grantToken.isEmpty || (!keyID.isEmpty && !grantID.isEmpty) else {
            throw ValidationError("give --grant-token, or --key-id and --grant-id")
        }
    }

    func run() async throws {
        try await global.withClient { try await $0.retireGrant(grantToken: grantToken, keyID: keyID, grantID: grantID) }
        if global.json { try printJSON([:]) }
    }
}

struct RevokeGrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "revoke-grant", abstract: "Revoke a grant (who the key policy allows kms:RevokeGrant).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("grant-id"), help: ArgumentHelp("The grant.", valueName: "id"))
    var grantID: String

    func run() async throws {
        try await global.withClient { try await $0.revokeGrant(keyID: key.keyID, grantID: grantID) }
        if global.json { try printJSON([:]) }
    }
}
