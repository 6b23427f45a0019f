import ArgumentParser
import Foundation
import Glibc
import KMSClient
import KMSCrypto

/// glibc 2.27+; the header hides it behind _GNU_SOURCE.
@_silgen_name("memfd_create")
private func memfdCreate(_ name: UnsafePointer<CChar>, _ flags: UInt32) -> Int32

private let mfdAllowSealing: UInt32 = 2
private let fAddSeals: Int32 = 1033
private let fSealSeal: Int32 = 1, fSealShrink: Int32 = 2, fSealGrow: Int32 = 4, fSealWrite: Int32 = 8

struct Exec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command with secrets decrypted by kmsd in its environment or in memory-only files.",
        discussion: """
        Each --secret NAME=PATH names a ciphertext blob made by `kmsctl encrypt`; kmsctl decrypts \
        them all (with the --context pairs, as given at encryption), then replaces itself with \
        COMMAND (execvp), so COMMAND's exit status is kmsctl's and signals reach it directly \
        (it starts with no signal blocked and SIGPIPE at its default). --key-id makes every \
        secret's key a requirement. \
        NAME=value goes into COMMAND's environment; a secret containing a NUL byte must use \
        --secret-file. --secret-file NAME=PATH puts the plaintext in a sealed memfd (a file in \
        the kernel's memory-backed tmpfs, never on a disk, gone when the last process holding it \
        exits) and sets NAME to its path /dev/fd/N. Nothing is written to disk. If any secret \
        fails to decrypt, COMMAND is not run (status 1). Status 127: COMMAND not found; 126: not \
        executable.

          kmsctl encrypt --key-id alias/app --context app=web < db-password > db-password.enc
          kmsctl exec --context app=web --secret DB_PASSWORD=db-password.enc \\
                      --secret-file TLS_KEY=tls.key.enc -- /usr/bin/myapp --tls-key-from-env TLS_KEY
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("secret"), help: ArgumentHelp("NAME=PATH: decrypt the blob at PATH (fileb://PATH also accepted) into environment variable NAME. Repeatable.", valueName: "name=path"))
    var secrets: [String] = []

    @Option(name: .customLong("secret-file"), help: ArgumentHelp("NAME=PATH: decrypt into a memory-only file and set NAME to its path. Repeatable.", valueName: "name=path"))
    var secretFiles: [String] = []

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE for every secret (split at the first '='). Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @Option(name: .customLong("key-id"), help: ArgumentHelp("Fail unless every secret was encrypted under this key (so a blob of another key with the same context cannot be swapped in).", valueName: "id"))
    var keyID: String?

    @Argument(parsing: .postTerminator, help: ArgumentHelp("The command and its arguments, after --.", valueName: "command"))
    var command: [String] = []

    struct Secret {
        let name: String
        let path: String
        let asFile: Bool
    }

    func parsedSecrets() throws -> [Secret] {
        var seen = Set<String>()
        return try (secrets.map { ($0, false) } + secretFiles.map { ($0, true) }).map { item, asFile in
            let option = asFile ? "--secret-file" : "--secret"
            guard let eq = item.firstIndex(of: "=") else { throw ValidationError("\(option) '\(item)' is not NAME=PATH") }
            let name = String(item[..<eq])
            var path = String(item[item.index(after: eq)...])
            if path.hasPrefix("fileb://") { path.removeFirst("fileb://".count) }
            guard let first = name.unicodeScalars.first, first == "_" || (first.isASCII && first.properties.isAlphabetic),
                  name.unicodeScalars.allSatisfy({ $0 == "_" || ($0.isASCII && $0.properties.isAlphabetic) || ("0"..."9").contains($0) }) else {
                throw ValidationError("\(option): '\(name)' is not an environment variable name (letters, digits, _; not starting with a digit)")
            }
            guard !path.isEmpty else { throw ValidationError("\(option) \(name)= names no file") }
            guard seen.insert(name).inserted else { throw ValidationError("the secret name \(name) is given twice") }
            return Secret(name: name, path: path, asFile: asFile)
        }
    }

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        guard !command.isEmpty else { throw ValidationError("give the command to run after --: kmsctl exec --secret NAME=FILE -- COMMAND [ARG...]") }
        guard !(secrets.isEmpty && secretFiles.isEmpty) else { throw ValidationError("give at least one --secret or --secret-file") }
        _ = try parsedSecrets()
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        let list = try parsedSecrets()
        var blobs: [[UInt8]] = []
        for s in list {
            guard let data = FileManager.default.contents(atPath: s.path) else {
                throw ValidationError("cannot read \(s.path) for secret \(s.name)")
            }
            blobs.append(Array(data))
        }
        // Decrypt them all before anything runs: one connection, all requests pipelined.
        var plaintexts = try await global.withClient { client in
            try await client.pipeline(blobs.map { blob in
                var r = KMSRequest()
                r.operation = .decrypt(.with { $0.ciphertextBlob = Data(blob); $0.encryptionContext = contextMap; $0.keyID = keyID ?? "" })
                return r
            })
        }.enumerated().map { i, response -> [UInt8] in
            if let error = response.kmsError { throw KMSError(error.code, "secret \(list[i].name) (\(list[i].path)): \(error.message)") }
            guard case .decrypt(let d)? = response.result else { throw KMSTransportError("the server answered with a different operation's result") }
            return Array(d.plaintext)
        }
        defer { for i in plaintexts.indices { plaintexts[i].withUnsafeMutableBytes { kmsExplicitBzero($0) } } }
        for (i, s) in list.enumerated() {
            if s.asFile {
                setenv(s.name, try Self.memoryFile(name: s.name, contents: plaintexts[i]), 1)
            } else {
                guard !plaintexts[i].contains(0) else {
                    throw ValidationError("secret \(s.name) contains a NUL byte and cannot be an environment variable; use --secret-file")
                }
                let ok = plaintexts[i].withUnsafeBufferPointer { p -> Bool in
                    // NUL-terminated copy for setenv, zeroed right after (setenv keeps its own).
                    var bytes = Array(p) + [0]
                    defer { bytes.withUnsafeMutableBytes { kmsExplicitBzero($0) } }
                    return bytes.withUnsafeBufferPointer { setenv(s.name, UnsafeRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self), 1) } == 0
                }
                guard ok else { throw ValidationError("cannot set the environment variable \(s.name)") }
            }
        }
        // The command starts with default signal handling: SwiftNIO ignores SIGPIPE in this
        // process and this thread may block signals, and both would pass through exec.
        signal(SIGPIPE, SIG_DFL)
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
        let argv = command.map { strdup($0) } + [nil]
        execvp(command[0], argv)
        let error = errno
        writeStderr("kmsctl: exec: \(command[0]): \(String(cString: strerror(error)))\n")
        throw ExitCode(error == ENOENT ? 127 : 126)
    }

    /// A sealed memfd holding `contents`, inherited by the command; returns its /dev/fd path.
    static func memoryFile(name: String, contents: [UInt8]) throws -> String {
        let fd = memfdCreate("kmsctl-secret-\(name)", mfdAllowSealing)
        guard fd >= 0 else { throw KMSError(.internalError, "memfd_create failed: \(String(cString: strerror(errno)))") }
        var out = FileDescriptorOutput(fd: fd)
        try contents.withUnsafeBytes { try out.write($0) }
        guard lseek(fd, 0, SEEK_SET) == 0,
              fcntl(fd, fAddSeals, fSealWrite | fSealGrow | fSealShrink | fSealSeal) == 0 else {
            throw KMSError(.internalError, "cannot seal the memory file for \(name): \(String(cString: strerror(errno)))")
        }
        return "/dev/fd/\(fd)"
    }
}
