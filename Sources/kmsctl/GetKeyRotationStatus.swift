import ArgumentParser
import KMSClient

struct GetKeyRotationStatus: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get-key-rotation-status",
        abstract: "Print whether a KMS key rotates automatically, and when next.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    func run() async throws {
        let r = try await global.withClient { try await $0.getKeyRotationStatus(keyID: key.keyID) }
        var object: [String: Any] = ["KeyId": r.keyID, "KeyRotationEnabled": r.keyRotationEnabled,
                                     "CurrentKeyVersion": Int(r.currentKeyVersion), "MinimumDecryptionVersion": Int(r.minimumDecryptionVersion)]
        if r.keyRotationEnabled {
            object["RotationPeriodInDays"] = Int(r.rotationPeriodInDays)
            object["NextRotationDate"] = Int(r.nextRotationDate)
        }
        if global.json { try printJSON(object); return }
        printFields([("KeyId", r.keyID), ("KeyRotationEnabled", r.keyRotationEnabled ? "true" : "false")]
            + (r.keyRotationEnabled ? [("RotationPeriodInDays", String(r.rotationPeriodInDays)), ("NextRotationDate", formatUnixTime(r.nextRotationDate))] : [])
            + [("CurrentKeyVersion", String(r.currentKeyVersion)), ("MinimumDecryptionVersion", String(r.minimumDecryptionVersion))])
    }
}
