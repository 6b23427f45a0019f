import ArgumentParser
import KMSClient

struct ScheduleKeyDeletion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "schedule-key-deletion",
        abstract: "Schedule a KMS key for deletion after a waiting period; cancel-key-deletion stops it until then.",
        discussion: "When the period ends kmsd deletes the key and every version of its material: everything encrypted under it is lost.")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    @Option(name: .customLong("pending-window-in-days"), help: ArgumentHelp("Days before the deletion, 7...30. Default 30.", valueName: "days"))
    var pendingWindowInDays: UInt32 = 30

    func validate() throws {
        guard (7...30).contains(pendingWindowInDays) else { throw ValidationError("--pending-window-in-days must be 7...30") }
    }

    func run() async throws {
        let r = try await global.withClient { try await $0.scheduleKeyDeletion(keyID: key.keyID, pendingWindowInDays: pendingWindowInDays) }
        // A replica's deletion notice, for import-replica at its primary (base64).
        let notice = r.replicaDeletionNotice.isEmpty ? nil : r.replicaDeletionNotice.base64EncodedString()
        if global.json {
            var object: [String: Any] = ["KeyId": r.keyID, "DeletionDate": Int(r.deletionDate), "KeyState": r.keyState,
                                         "PendingWindowInDays": Int(r.pendingWindowInDays)]
            if let notice { object["ReplicaDeletionNotice"] = notice }
            try printJSON(object)
        } else {
            printFields([("KeyId", r.keyID), ("DeletionDate", formatUnixTime(r.deletionDate)), ("KeyState", r.keyState),
                         ("PendingWindowInDays", String(r.pendingWindowInDays))] + (notice.map { [("ReplicaDeletionNotice", $0)] } ?? []))
        }
    }
}
