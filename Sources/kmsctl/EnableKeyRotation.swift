import ArgumentParser
import KMSClient

struct EnableKeyRotation: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enable-key-rotation",
        abstract: "Rotate a KMS key automatically every period; old versions keep decrypting. Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("rotation-period-in-days"), help: ArgumentHelp("Days between rotations, 90...2560. Default 365.", valueName: "days"))
    var rotationPeriodInDays: UInt32 = 365

    func validate() throws {
        guard (90...2560).contains(rotationPeriodInDays) else { throw ValidationError("--rotation-period-in-days must be 90...2560") }
    }

    func run() async throws {
        try await global.withClient { try await $0.enableKeyRotation(keyID: key.keyID, rotationPeriodInDays: rotationPeriodInDays) }
    }
}
