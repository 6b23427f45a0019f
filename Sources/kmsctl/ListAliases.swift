import ArgumentParser
import KMSClient

struct ListAliases: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-aliases",
        abstract: "List aliases: all you may see, or one key's.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("Only this key's aliases (key id or key ARN).", valueName: "id"))
    var keyID: String = ""

    @OptionGroup var page: PageOptions

    func run() async throws {
        let r = try await global.withClient { try await $0.listAliases(keyID: keyID, limit: page.limit, marker: page.marker) }
        if global.json {
            var out: [String: Any] = [
                "Aliases": r.aliases.map { a in
                    ["AliasName": a.aliasName, "AliasArn": a.aliasArn, "TargetKeyId": a.targetKeyID,
                     "CreationDate": Int(a.creationDate), "LastUpdatedDate": Int(a.lastUpdatedDate)] as [String: Any]
                },
                "Truncated": r.truncated,
            ]
            if r.truncated { out["NextMarker"] = r.nextMarker }
            try printJSON(out)
        } else {
            printColumns(headers: ["AliasName", "TargetKeyId", "LastUpdatedDate"], rows:
                       r.aliases.map { [$0.aliasName, $0.targetKeyID, formatUnixTime($0.lastUpdatedDate)] })
            if r.truncated { writeStdout("NextMarker: \(r.nextMarker)\n") }
        }
    }
}
