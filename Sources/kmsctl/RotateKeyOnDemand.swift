import ArgumentParser
import KMSClient

struct RotateKeyOnDemand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rotate-key-on-demand",
        abstract: "Give a KMS key a new version now (at most 10 times per key); old versions keep decrypting.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    func run() async throws {
        let r = try await global.withClient { try await $0.rotateKeyOnDemand(keyID: key.keyID) }
        if global.json { try printJSON(["KeyId": r.keyID, "KeyVersion": Int(r.keyVersion)]) } else {
            printFields([("KeyId", r.keyID), ("KeyVersion", String(r.keyVersion))])
        }
    }
}
