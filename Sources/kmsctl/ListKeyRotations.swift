import ArgumentParser
import KMSClient

struct ListKeyRotations: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-key-rotations",
        abstract: "List a KMS key's rotations, oldest first.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @OptionGroup var page: PageOptions

    func run() async throws {
        let r = try await global.withClient { try await $0.listKeyRotations(keyID: key.keyID, limit: page.limit, marker: page.marker) }
        if global.json {
            var out: [String: Any] = [
                "Rotations": r.rotations.map { ["KeyId": $0.keyID, "RotationDate": Int($0.rotationDate), "RotationType": $0.rotationType,
                                                "KeyVersion": Int($0.keyVersion)] as [String: Any] },
                "Truncated": r.truncated,
            ]
            if r.truncated { out["NextMarker"] = r.nextMarker }
            try printJSON(out)
        } else {
            printColumns(headers: ["KeyVersion", "RotationType", "RotationDate"],
                         rows: r.rotations.map { [String($0.keyVersion), $0.rotationType, formatUnixTime($0.rotationDate)] })
            if r.truncated { writeStdout("NextMarker: \(r.nextMarker)\n") }
        }
    }
}
