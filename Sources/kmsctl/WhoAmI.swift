import ArgumentParser
import Foundation
import KMSClient

struct WhoAmI: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "whoami",
        abstract: "Show who kmsd thinks you are: uid, gid, groups, executable, systemd unit, and whether you administer kmsd.")

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let r = try await global.withClient { try await $0.whoAmI() }
        if global.json {
            try printJSON([
                "Uid": Int(r.uid),
                "Gid": Int(r.gid),
                "Pid": Int(r.pid),
                "UserName": r.userName,
                "Groups": r.groups.map { Int($0) } as [Int],
                "Executable": r.executable,
                "SystemdUnit": r.systemdUnit,
                "IsAdministrator": r.isAdministrator,
            ])
        } else {
            printFields([
                ("Uid", String(r.uid)),
                ("Gid", String(r.gid)),
                ("Pid", String(r.pid)),
                ("UserName", r.userName),
                ("Groups", r.groups.map { String($0) }.joined(separator: ", ")),
                ("Executable", r.executable),
                ("SystemdUnit", r.systemdUnit),
                ("IsAdministrator", r.isAdministrator ? "true" : "false"),
            ])
        }
    }
}
