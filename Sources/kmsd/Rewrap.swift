import ArgumentParser
import Foundation
import KMSServer

/// kmsd rewrap: root-key rotation while kmsd is stopped.
struct Rewrap: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsd rewrap",
        abstract: "Move the keystore to a new root key (kmsd must be stopped).",
        discussion: """
        Re-wraps the keystore key, under which every key's material is wrapped, from the current \
        root key to a new one, in one durable write: interrupted at any point, the keystore is \
        under exactly one of the two (kmsd names the one it needs by fingerprint), and running \
        rewrap again finishes or confirms the move. The current root key is read as kmsd reads it \
        ($CREDENTIALS_DIRECTORY/root-key, else --root-key-file); the new one from \
        --new-root-key-file or $CREDENTIALS_DIRECTORY/new-root-key. README: "Rotating the root key".
        """
    )

    @Option(name: .long, help: ArgumentHelp("kmsd's JSON configuration file.", valueName: "file"))
    var config: String?

    @Flag(name: .long, help: "Development mode: the current root key is STATE_DIR/root-key.")
    var dev = false

    @Option(name: .customLong("state-dir"), help: ArgumentHelp("State directory. Default /var/lib/kmsd.", valueName: "dir"))
    var stateDir: String?

    @Option(name: .customLong("root-key-file"), help: ArgumentHelp("The current root key, when $CREDENTIALS_DIRECTORY/root-key is absent.", valueName: "file"))
    var rootKeyFile: String?

    @Option(name: .customLong("new-root-key-file"), help: ArgumentHelp("The new root key (32 raw bytes, mode 0600).", valueName: "file"))
    var newRootKeyFile: String?

    func run() throws {
        let c = try offlineConfiguration(config: config, dev: dev, stateDir: stateDir, rootKeyFile: rootKeyFile)
        do {
            let message = try RootKeyRotation.run(configuration: c, newKeyFile: newRootKeyFile)
            print("kmsd rewrap: \(message)")
        } catch {
            FileHandle.standardError.write(Data("kmsd rewrap: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// The configuration of an offline command (rewrap, restore): the file, then its flags.
func offlineConfiguration(config: String?, dev: Bool, stateDir: String?, rootKeyFile: String?) throws -> ServerConfiguration {
    var c = ServerConfiguration()
    if let config { c = try ServerConfiguration.load(file: config) }
    if dev { c.development = true }
    if let stateDir { c.stateDirectory = stateDir }
    if let rootKeyFile { c.rootKeyFile = rootKeyFile }
    return c
}
