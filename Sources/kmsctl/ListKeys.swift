import ArgumentParser
import Foundation
import KMSClient

struct ListKeys: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-keys",
        abstract: "List the KMS keys (key id and ARN), one page at a time or all with --all.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .long, help: ArgumentHelp("Most keys per page (the server's default when omitted).", valueName: "n"))
    var limit: UInt32?

    @Option(name: .long, help: ArgumentHelp("Start after this marker (the NextMarker of the previous page).", valueName: "marker"))
    var marker: String?

    @Flag(name: .long, help: "Follow NextMarker and list every key.")
    var all = false

    func run() async throws {
        let pageLimit = limit ?? 0
        let firstMarker = marker ?? ""
        let followPages = all
        let (keys, nextMarker, truncated) = try await global.withClient {
            (client: KMSClient) async throws -> ([Kmsd_V1_KeyListEntry], String, Bool) in
            var current = firstMarker
            var page = try await client.listKeys(limit: pageLimit, marker: current)
            var collected = page.keys
            while followPages, page.truncated, !page.nextMarker.isEmpty, page.nextMarker != current {
                current = page.nextMarker
                page = try await client.listKeys(limit: pageLimit, marker: current)
                collected.append(contentsOf: page.keys)
            }
            return (collected, page.nextMarker, page.truncated)
        }

        if global.json {
            var object: [String: Any] = [
                "Keys": keys.map { ["KeyId": $0.keyID, "KeyArn": $0.keyArn] as [String: Any] },
                "Truncated": truncated,
            ]
            if truncated && !nextMarker.isEmpty { object["NextMarker"] = nextMarker }
            try printJSON(object)
        } else {
            printColumns(headers: ["KeyId", "Arn"], rows: keys.map { [$0.keyID, $0.keyArn] })
            if truncated && !nextMarker.isEmpty {
                writeStderr("kmsctl: more keys follow; run again with --marker \(nextMarker), or use --all\n")
            }
        }
    }
}
