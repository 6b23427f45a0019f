import Foundation
import Glibc
import KMSClient
import Testing

/// `kmsctl exec`: secrets decrypted by a real kmsd reach the command (environment or
/// memory-only file) byte for byte, the command's status is kmsctl's, nothing is written to
/// disk, and a secret that does not decrypt means the command never runs.
@Suite(.serialized)
final class ExecTests {
    let daemon: Daemon
    let dir: String

    init() throws {
        daemon = try Daemon()
        dir = try Paths.tempDir("exec")
    }

    deinit {
        daemon.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func kmsctl(_ args: [String], stdin: Data = Data()) throws -> ProcessResult { try daemon.kmsctl(args, stdin: stdin) }

    /// Encrypts `secret` with `kmsctl encrypt` into a file in the test directory.
    func seal(_ secret: [UInt8], name: String, key: String, context: String = "app=web") throws -> String {
        let enc = try kmsctl(["encrypt", "--key-id", key, "--context", context], stdin: Data(secret))
        #expect(enc.status == 0, "\(enc.stderr)")
        let path = "\(dir)/\(name).enc"
        try enc.stdout.write(to: URL(fileURLWithPath: path))
        return path
    }

    static func sha256(_ bytes: [UInt8]) throws -> String {
        let r = try run("/usr/bin/sha256sum", [], stdin: Data(bytes))
        return String(r.text.prefix(64))
    }

    @Test func theCommandReceivesTheSecretsAndItsStatusIsKmsctls() async throws {
        let key = try await daemon.client().createKey(description: "exec").keyID
        let password = Array("correct horse battery staple".utf8)
        let binary: [UInt8] = (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) }  // has NUL bytes
        let pw = try seal(password, name: "pw", key: key), bin = try seal(binary, name: "bin", key: key)
        // The child prints hashes of what it got, where the file is, and exits 7.
        let child = #"printf %s "$DB_PASSWORD" | sha256sum; sha256sum < "$TLS_KEY"; readlink "$TLS_KEY"; printf '%s\n' "$TLS_KEY"; exit 7"#
        let r = try kmsctl(["exec", "--context", "app=web", "--secret", "DB_PASSWORD=\(pw)", "--secret-file", "TLS_KEY=fileb://\(bin)", "--", "/bin/sh", "-c", child])
        #expect(r.status == 7, "\(r.stderr)")
        let lines = r.text.split(separator: "\n").map(String.init)
        #expect(lines.count == 4, "\(r.text)")
        guard lines.count == 4 else { return }
        #expect(lines[0].hasPrefix(try Self.sha256(password)))
        #expect(lines[1].hasPrefix(try Self.sha256(binary)))
        // A memfd: memory-backed, no path on any filesystem.
        #expect(lines[2].hasPrefix("/memfd:kmsctl-secret-TLS_KEY"), "\(lines[2])")
        #expect(lines[3].hasPrefix("/dev/fd/"))
        // Nothing of the secrets in kmsctl's own output, nor any file left in the directory.
        #expect(!r.stderr.contains("correct horse"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["bin.enc", "pw.enc"])
    }

    /// The command starts with no signal blocked and SIGPIPE at its default (kmsctl's own
    /// runtime ignores SIGPIPE and may block signals on its threads), so `systemctl stop`,
    /// Ctrl-C and broken pipes reach it as they would without kmsctl in front.
    @Test func theCommandStartsWithDefaultSignals() async throws {
        let key = try await daemon.client().createKey(description: "exec").keyID
        let pw = try seal(Array("x".utf8), name: "sig", key: key)
        let r = try kmsctl(["exec", "--context", "app=web", "--secret", "S=\(pw)", "--", "/bin/grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"])
        #expect(r.status == 0, "\(r.stderr)")
        let fields = Dictionary(uniqueKeysWithValues: r.text.split(separator: "\n").compactMap { line -> (String, UInt64)? in
            let parts = line.split(separator: ":")
            guard parts.count == 2 else { return nil }
            return (String(parts[0]), UInt64(parts[1].trimmingCharacters(in: .whitespaces), radix: 16) ?? .max)
        })
        #expect(fields["SigBlk"] == 0, "blocked signals: \(r.text)")
        let sigpipe: UInt64 = 1 << (UInt64(SIGPIPE) - 1)
        #expect(fields["SigIgn"].map { $0 & sigpipe } == 0, "SIGPIPE ignored: \(r.text)")
    }

    /// --key-id: a blob of another key with the same context cannot be swapped in.
    @Test func keyIDPinsTheSecretsKey() async throws {
        let key = try await daemon.client().createKey(description: "exec").keyID
        let other = try await daemon.client().createKey(description: "exec other").keyID
        let mine = try seal(Array("mine".utf8), name: "mine", key: key)
        let swapped = try seal(Array("theirs".utf8), name: "theirs", key: other)
        let ok = try kmsctl(["exec", "--key-id", key, "--context", "app=web", "--secret", "S=\(mine)", "--", "sh", "-c", "test \"$S\" = mine"])
        #expect(ok.status == 0, "\(ok.stderr)")
        let refused = try kmsctl(["exec", "--key-id", key, "--context", "app=web", "--secret", "S=\(swapped)", "--", "/bin/true"])
        #expect(refused.status == 1 && refused.stderr.contains("IncorrectKeyException"), "\(refused.stderr)")
    }

    @Test func aSecretThatDoesNotDecryptMeansTheCommandNeverRuns() async throws {
        let key = try await daemon.client().createKey(description: "exec").keyID
        let good = try seal(Array("a".utf8), name: "good", key: key)
        let wrongContext = try seal(Array("b".utf8), name: "other", key: key, context: "app=other")
        let marker = dir + "/ran"
        let r = try kmsctl(["exec", "--context", "app=web", "--secret", "A=\(good)", "--secret", "B=\(wrongContext)", "--", "/usr/bin/touch", marker])
        #expect(r.status == 1)
        #expect(r.stderr.contains("InvalidCiphertextException") && r.stderr.contains("secret B"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker))
        // A disabled key too.
        try await daemon.client().disableKey(keyID: key)
        let disabled = try kmsctl(["exec", "--context", "app=web", "--secret", "A=\(good)", "--", "/usr/bin/touch", marker])
        #expect(disabled.status == 1 && disabled.stderr.contains("DisabledException"), "\(disabled.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker))
    }

    @Test func usageAndExecFailures() async throws {
        let key = try await daemon.client().createKey(description: "exec").keyID
        let nul = try seal([0x61, 0x00, 0x62], name: "nul", key: key)
        let withNUL = try kmsctl(["exec", "--context", "app=web", "--secret", "X=\(nul)", "--", "/bin/true"])
        #expect(withNUL.status == 2 && withNUL.stderr.contains("--secret-file"), "\(withNUL.stderr)")
        let missing = try kmsctl(["exec", "--context", "app=web", "--secret", "X=\(dir)/absent.enc", "--", "/bin/true"])
        #expect(missing.status == 2, "\(missing.stderr)")
        let noCommand = try kmsctl(["exec", "--secret", "X=\(nul)"])
        #expect(noCommand.status == 2)
        let badName = try kmsctl(["exec", "--secret", "1X=\(nul)", "--", "/bin/true"])
        #expect(badName.status == 2)
        let good = try seal(Array("v".utf8), name: "v", key: key)
        let notFound = try kmsctl(["exec", "--context", "app=web", "--secret", "V=\(good)", "--", "/nonexistent/command"])
        #expect(notFound.status == 127, "\(notFound.stderr)")
        let found = try kmsctl(["exec", "--context", "app=web", "--secret", "V=\(good)", "--", "sh", "-c", "test \"$V\" = v"])
        #expect(found.status == 0, "PATH lookup and the value: \(found.stderr)")
    }
}
