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
        let wantDetails = !global.json
        let (keys, nextMarker, truncated, details) = try await global.withClient {
            (client: KMSClient) async throws -> ([Kmsd_V1_KeyListEntry], String, Bool, [String: KeyDetails]) in
            var current = firstMarker
            var page = try await client.listKeys(limit: pageLimit, marker: current)
            var collected = page.keys
            while followPages, page.truncated, !page.nextMarker.isEmpty, page.nextMarker != current {
                current = page.nextMarker
                page = try await client.listKeys(limit: pageLimit, marker: current)
                collected.append(contentsOf: page.keys)
            }
            // For people: each key's state, description and aliases (one request per key,
            // pipelined on the one connection).
            var details: [String: KeyDetails] = [:]
            if wantDetails {
                for key in collected {
                    if let m = try? await client.describeKey(keyID: key.keyID) {
                        let rotation = try? await client.getKeyRotationStatus(keyID: key.keyID)
                        details[key.keyID] = KeyDetails(state: m.keyState, description: m.description_p, aliases: [],
                                                        rotation: rotation.map { $0.keyRotationEnabled ? "every \($0.rotationPeriodInDays)d" : "off" } ?? "?")
                    }
                }
                var marker = ""
                repeat {
                    guard let aliases = try? await client.listAliases(limit: 1000, marker: marker) else { break }
                    for a in aliases.aliases { details[a.targetKeyID]?.aliases.append(a.aliasName) }
                    marker = aliases.truncated ? aliases.nextMarker : ""
                } while !marker.isEmpty
            }
            return (collected, page.nextMarker, page.truncated, details)
        }

        if global.json {
            var object: [String: Any] = [
                "Keys": keys.map { ["KeyId": $0.keyID, "KeyArn": $0.keyArn] as [String: Any] },
                "Truncated": truncated,
            ]
            if truncated && !nextMarker.isEmpty { object["NextMarker"] = nextMarker }
            try printJSON(object)
        } else {
            printColumns(headers: ["KeyId", "Alias", "State", "Rotation", "Description"], rows: keys.map { key in
                let d = details[key.keyID]
                return [key.keyID, d.map { $0.aliases.joined(separator: ",") }.flatMap { $0.isEmpty ? nil : $0 } ?? "-",
                        d?.state ?? "?", d?.rotation ?? "?", d.map { $0.description.isEmpty ? "-" : String($0.description.prefix(40)) } ?? "?"]
            })
            if truncated && !nextMarker.isEmpty {
                writeStderr("kmsctl: more keys follow; run again with --marker \(nextMarker), or use --all\n")
            }
        }
    }
}

/// What the table shows beside a key's id.
struct KeyDetails {
    var state: String
    var description: String
    var aliases: [String]
    var rotation: String
}
