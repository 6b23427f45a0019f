import ArgumentParser
import Foundation
import Glibc
import KMSClient
import KMSProtocol

/// The unit and credential id a command acts on.
struct CredentialOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The unit the credential is for, as systemd names it (payroll.service).", valueName: "unit"))
    var unit: String

    @Option(name: .long, help: ArgumentHelp("The credential id: the ID of LoadCredential=ID:/run/kmsd/credentials.sock.", valueName: "id"))
    var name: String

    func validate() throws {
        guard CredentialNames.isValidUnit(unit) else { throw ValidationError("--unit \(unit) is not a unit name (NAME.TYPE, up to 255 of the characters systemd allows)") }
        guard CredentialNames.isValidID(name) else { throw ValidationError("--name \(name) is not a credential id (1–255 of A–Z a–z 0–9 : - _ . @)") }
    }
}

/// Where credentials are kept: --credential-dir, else $KMSD_CREDENTIAL_DIR, else
/// /etc/kmsd/credentials (kmsd's credentialDirectory must name the same place).
struct CredentialStoreOption: ParsableArguments {
    @Option(name: .customLong("credential-dir"), help: ArgumentHelp("Where credentials are kept ($KMSD_CREDENTIAL_DIR, else /etc/kmsd/credentials).", valueName: "dir"))
    var credentialDir: String?

    var directory: String {
        credentialDir ?? ProcessInfo.processInfo.environment["KMSD_CREDENTIAL_DIR"] ?? CredentialNames.defaultDirectory
    }
}

struct PutCredential: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put-credential",
        abstract: "Encrypt standard input under a key as a unit's credential, for systemd's LoadCredential= through kmsd.",
        discussion: """
        The secret is encrypted under --key-id with the encryption context \
        {"systemd-unit": UNIT, "credential": ID} and stored as CREDENTIAL_DIR/UNIT/ID (written \
        whole or not at all; only the ciphertext touches the disk). kmsd serves it to \
        LoadCredential=ID:/run/kmsd/credentials.sock in UNIT when the key's policy lets the unit \
        Decrypt (Principal {"Unit": UNIT}). Needs write access to the credential directory \
        (root's), and kms:Encrypt on the key.
        """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var credential: CredentialOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key to encrypt under: key id, key ARN or alias/NAME.", valueName: "id"))
    var keyID: String

    @OptionGroup var store: CredentialStoreOption

    @Flag(name: .long, help: "Standard input is base64 text.")
    var base64 = false

    func run() async throws {
        let secret = try readStandardInput(base64: base64, what: "credential")
        guard !secret.isEmpty else { throw ValidationError("the credential (standard input) is empty") }
        let r = try await global.withClient {
            try await $0.encrypt(keyID: keyID, plaintext: Array(secret), context: CredentialNames.context(unit: credential.unit, id: credential.name))
        }
        let dir = store.directory
        let path = try storeAtomically(Array(r.ciphertextBlob), directory: dir + "/" + credential.unit, name: credential.name)
        if global.json {
            try printJSON(["Unit": credential.unit, "Name": credential.name, "KeyId": r.keyID, "Path": path])
        } else {
            writeStdout(path + "\n")
        }
    }

    /// Writes `bytes` to DIR/NAME through a temporary file, fsync and rename (then fsync of the
    /// directory): readers see the old credential or the new one, never part of one.
    func storeAtomically(_ bytes: [UInt8], directory: String, name: String) throws -> String {
        let old = umask(0o022)
        defer { umask(old) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        let path = directory + "/" + name, temporary = directory + "/.\(name).\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot write \(temporary): \(String(cString: strerror(errno)))") }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == bytes.count, synced, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw ValidationError("cannot store \(path): \(String(cString: strerror(errno)))")
        }
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
        return path
    }
}

struct DeleteCredential: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete-credential",
        abstract: "Remove a unit's stored credential (kmsd then serves it no more).")

    @OptionGroup var credential: CredentialOptions

    @OptionGroup var store: CredentialStoreOption

    func run() throws {
        let path = store.directory + "/" + credential.unit + "/" + credential.name
        guard unlink(path) == 0 else {
            reportError(code: errno == ENOENT ? "NotFoundException" : "ValidationException", message: "cannot remove \(path): \(String(cString: strerror(errno)))")
            terminate(errno == ENOENT ? 254 : 255)
        }
    }
}

/// What systemd does for LoadCredential=ID:SOCKET in UNIT, for trying a policy out: bind the
/// abstract address \0RANDOM/unit/UNIT/ID, connect, read until EOF. kmsd serves only root.
struct LoadCredential: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load-credential",
        abstract: "Fetch a unit's credential from kmsd's credential socket as systemd would, to standard output (root only).")

    @OptionGroup var credential: CredentialOptions

    @Option(name: .customLong("credential-socket"), help: ArgumentHelp("kmsd's credential socket ($KMSD_CREDENTIAL_SOCKET, else /run/kmsd/credentials.sock).", valueName: "path"))
    var credentialSocket: String?

    func run() throws {
        let path = credentialSocket ?? ProcessInfo.processInfo.environment["KMSD_CREDENTIAL_SOCKET"] ?? CredentialNames.defaultSocketPath
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("cannot create a socket") }
        defer { close(fd) }
        let random = Hex.encode((0..<8).map { _ in UInt8.random(in: 0...255) })
        let local = [UInt8(0)] + Array("\(random)/unit/\(credential.unit)/\(credential.name)".utf8)
        guard try connectUnix(fd, bind: local, to: Array(path.utf8)) else {
            reportError(code: "KMSInternalException", message: "cannot reach \(path): \(String(cString: strerror(errno)))")
            terminate(255)
        }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            received += buffer[0..<n]
        }
        guard !received.isEmpty else {
            reportError(code: "AccessDeniedException", message: "kmsd served nothing for \(credential.unit)/\(credential.name): refused (not root, no such credential, or the key's policy does not let the unit decrypt it); the audit trail says which")
            terminate(254)
        }
        writeStdout(Data(received))
        received.withUnsafeMutableBytes { if let base = $0.baseAddress { memset(base, 0, $0.count) } }
    }

    /// Binds `fd` to the abstract `local` address and connects it to the path `remote`.
    func connectUnix(_ fd: Int32, bind local: [UInt8], to remote: [UInt8]) throws -> Bool {
        func address(_ bytes: [UInt8]) throws -> (sockaddr_un, socklen_t) {
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else { throw ValidationError("address too long") }
            withUnsafeMutableBytes(of: &a.sun_path) { $0.copyBytes(from: bytes) }
            return (a, socklen_t(MemoryLayout<sa_family_t>.size + bytes.count))
        }
        var (l, ll) = try address(local)
        var (r, rl) = try address(remote + [0])
        let bound = withUnsafePointer(to: &l) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, ll) } }
        guard bound == 0 else { return false }
        return withUnsafePointer(to: &r) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, rl) } } == 0
    }
}
