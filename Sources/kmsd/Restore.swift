import ArgumentParser
import Foundation
import KMSServer

/// kmsd restore: installs a backup (kmsctl backup) as the keystore of an empty state directory.
struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsd restore",
        abstract: "Install a backup file as the keystore of a state directory that has none (kmsd stopped).",
        discussion: """
        Reads a backup file written by `kmsctl backup`, checks that it was made under the root key \
        given (read as kmsd reads it: $CREDENTIALS_DIRECTORY/root-key, else --root-key-file) and \
        that not a byte of it was changed, and only then installs it as STATE_DIR's keystore. A \
        backup made under another root key, or truncated, altered or extended, is refused and \
        nothing is written. README: "Backup and restore".
        """
    )

    @Option(name: .long, help: ArgumentHelp("kmsd's JSON configuration file.", valueName: "file"))
    var config: String?

    @Flag(name: .long, help: "Development mode (as kmsd --dev): the root key may be STATE_DIR/root-key.")
    var dev = false

    @Option(name: .customLong("state-dir"), help: ArgumentHelp("State directory to restore into. Default /var/lib/kmsd.", valueName: "dir"))
    var stateDir: String?

    @Option(name: .customLong("root-key-file"), help: ArgumentHelp("The root key the backed-up kmsd used, when $CREDENTIALS_DIRECTORY/root-key is absent.", valueName: "file"))
    var rootKeyFile: String?

    @Option(name: .long, help: ArgumentHelp("The backup file; - for standard input.", valueName: "file"))
    var from: String

    func run() throws {
        let c = try offlineConfiguration(config: config, dev: dev, stateDir: stateDir, rootKeyFile: rootKeyFile)
        do {
            print("kmsd restore: \(try BackupRestore.run(configuration: c, from: from))")
        } catch {
            FileHandle.standardError.write(Data("kmsd restore: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
