import Foundation
import KMSClient
import Testing

/// kmsctl as a user runs it: raw bytes on stdin/stdout, --base64, --json with AWS field names,
/// errors on stderr as `kmsctl: <Code>: <message>` with a non-zero status.
@Suite(.serialized)
final class CLITests {
    let daemon: Daemon

    init() throws { daemon = try Daemon() }
    deinit { daemon.stop() }

    func kmsctl(_ args: [String], stdin: Data = Data(), socketFlag: Bool = false) throws -> ProcessResult {
        if socketFlag { return try run(Paths.kmsctl, args + ["--socket", daemon.socket], stdin: stdin, env: ["KMSD_SOCKET": "/nonexistent"]) }
        return try run(Paths.kmsctl, args, stdin: stdin, env: ["KMSD_SOCKET": daemon.socket])
    }

    func json(_ r: ProcessResult) throws -> [String: Any] {
        #expect(r.status == 0, "\(r.stderr)")
        return try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
    }

    func createKey() throws -> String {
        let meta = try #require(try json(try kmsctl(["create-key", "--json", "--description", "cli", "--tag", "env=test"]))["KeyMetadata"] as? [String: Any])
        return try #require(meta["KeyId"] as? String)
    }

    @Test func createKeyJSONUsesAWSFieldNames() throws {
        let r = try json(try kmsctl(["create-key", "--json", "--description", "cli"]))
        let meta = try #require(r["KeyMetadata"] as? [String: Any])
        for field in ["KeyId", "Arn", "CreationDate", "Enabled", "Description", "KeyUsage", "KeyState", "KeySpec", "Origin", "KeyManager", "EncryptionAlgorithms"] {
            #expect(meta[field] != nil, "\(field)")
        }
        #expect(meta["KeySpec"] as? String == "SYMMETRIC_DEFAULT")
        #expect(meta["Description"] as? String == "cli")
        let table = try kmsctl(["describe-key", "--key-id", meta["KeyId"] as! String])
        #expect(table.status == 0 && table.text.contains("KeyState") && table.text.contains("Enabled"))
    }

    /// The lifecycle subcommands as an administrator scripts them: descriptions from
    /// file://, rotation on and off with its period and next date, on-demand rotation and the
    /// list of versions, and an alias moved to another key with update-alias.
    @Test func rotationAliasAndDescriptionSubcommands() throws {
        let dir = try Paths.tempDir("cli-lifecycle")
        try "from a file\n".write(toFile: dir + "/d.txt", atomically: true, encoding: .utf8)
        let meta = try #require(try json(try kmsctl(["create-key", "--json", "--description", "file://" + dir + "/d.txt"]))["KeyMetadata"] as? [String: Any])
        let id = try #require(meta["KeyId"] as? String)
        #expect(meta["Description"] as? String == "from a file\n")
        #expect(try kmsctl(["update-key-description", "--key-id", id, "--description", "file://" + dir + "/missing"]).status != 0)
        try "renamed".write(toFile: dir + "/d.txt", atomically: true, encoding: .utf8)
        #expect(try kmsctl(["update-key-description", "--key-id", id, "--description", "file://" + dir + "/d.txt"]).status == 0)
        #expect(try json(try kmsctl(["describe-key", "--key-id", id, "--json"]))["KeyMetadata"].flatMap { ($0 as? [String: Any])?["Description"] as? String } == "renamed")

        let off = try json(try kmsctl(["get-key-rotation-status", "--key-id", id, "--json"]))
        #expect(off["KeyRotationEnabled"] as? Bool == false && off["NextRotationDate"] == nil)
        let short = try kmsctl(["enable-key-rotation", "--key-id", id, "--rotation-period-in-days", "89"])
        #expect(short.status == 2 && short.stderr.contains("90...2560"), "a usage error: \(short.stderr)")
        #expect(try kmsctl(["enable-key-rotation", "--key-id", id]).status == 0)
        let on = try json(try kmsctl(["get-key-rotation-status", "--key-id", id, "--json"]))
        let next = try #require(on["NextRotationDate"] as? Int)
        #expect(on["KeyRotationEnabled"] as? Bool == true && on["RotationPeriodInDays"] as? Int == 365, "the default period: \(on)")
        #expect(abs(next - Int(Date().timeIntervalSince1970) - 365 * 86_400) < 120, "\(next)")
        #expect(try kmsctl(["enable-key-rotation", "--key-id", id, "--rotation-period-in-days", "90"]).status == 0)
        #expect(try json(try kmsctl(["get-key-rotation-status", "--key-id", id, "--json"]))["RotationPeriodInDays"] as? Int == 90)
        #expect(try kmsctl(["disable-key-rotation", "--key-id", id]).status == 0)
        #expect(try json(try kmsctl(["get-key-rotation-status", "--key-id", id, "--json"]))["KeyRotationEnabled"] as? Bool == false)

        let blob = try kmsctl(["encrypt", "--key-id", id], stdin: Data("v1".utf8))
        let rotated = try json(try kmsctl(["rotate-key-on-demand", "--key-id", id, "--json"]))
        #expect(rotated["KeyId"] as? String == id && rotated["KeyVersion"] as? Int == 2)
        let list = try json(try kmsctl(["list-key-rotations", "--key-id", id, "--json"]))
        let rotations = try #require(list["Rotations"] as? [[String: Any]])
        #expect(rotations.map { $0["KeyVersion"] as? Int } == [2] && rotations.first?["RotationType"] as? String == "ON_DEMAND", "\(rotations)")
        #expect(try kmsctl(["decrypt"], stdin: blob.stdout).stdout == Data("v1".utf8), "the old version still decrypts")

        let other = try createKey()
        let alias = "alias/cli-\(UUID().uuidString.prefix(8))"
        #expect(try kmsctl(["create-alias", "--alias-name", alias, "--target-key-id", id]).status == 0)
        #expect(try kmsctl(["update-alias", "--alias-name", alias, "--target-key-id", other]).status == 0)
        let aliases = try #require(try json(try kmsctl(["list-aliases", "--key-id", other, "--json"]))["Aliases"] as? [[String: Any]])
        #expect(aliases.map { $0["AliasName"] as? String } == [alias])
        #expect((try json(try kmsctl(["list-aliases", "--key-id", id, "--json"]))["Aliases"] as? [Any])?.isEmpty == true)
        let missing = try kmsctl(["update-alias", "--alias-name", "alias/none-\(UUID().uuidString.prefix(8))", "--target-key-id", other])
        #expect(missing.status == 1 && missing.stderr.contains("NotFoundException"), "\(missing.stderr)")
    }

    /// A reader that went away (`kmsctl ... | head`): kmsctl ends by SIGPIPE, as `cat` would,
    /// not by a crash with a backtrace on standard error.
    @Test func aClosedStandardOutputEndsKmsctlBySIGPIPE() throws {
        let script = """
        import os, subprocess, sys
        r, w = os.pipe()
        os.close(r)
        p = subprocess.run(sys.argv[1:], stdout=w, stderr=subprocess.PIPE)
        sys.stdout.write("%d\\n%s" % (p.returncode, p.stderr.decode(errors="replace")))
        """
        let r = try run("/usr/bin/python3", ["-c", script, Paths.kmsctl, "generate-random", "--number-of-bytes", "64", "--base64"],
                        env: ["KMSD_SOCKET": daemon.socket])
        let lines = r.text.split(separator: "\n", maxSplits: 1).map(String.init)
        #expect(lines.first == "-13", "killed by SIGPIPE: \(r.text) \(r.stderr)")
        #expect(!r.text.contains("Fatal error") && !r.text.contains("crashed"), "\(r.text)")
    }

    @Test func rawBytesRoundTripThroughStdinAndStdout() throws {
        let id = try createKey()
        var binary = Data((0...255).map { UInt8($0) })
        binary.append(contentsOf: [0, 0, 10, 13])
        let enc = try kmsctl(["encrypt", "--key-id", id, "--context", "app=web", "--context", "tier=db"], stdin: binary)
        #expect(enc.status == 0, "\(enc.stderr)")
        #expect(enc.stdout.count == binary.count + 82)
        #expect(enc.stdout.first == 0x01)
        let dec = try kmsctl(["decrypt", "--context", "tier=db", "--context", "app=web"], stdin: enc.stdout)
        #expect(dec.status == 0 && dec.stdout == binary)
        // --key-id on decrypt must match; --socket overrides KMSD_SOCKET.
        let viaFlag = try kmsctl(["decrypt", "--key-id", id, "--context", "app=web", "--context", "tier=db"], stdin: enc.stdout, socketFlag: true)
        #expect(viaFlag.status == 0 && viaFlag.stdout == binary, "\(viaFlag.stderr)")
    }

    @Test func base64InAndOut() throws {
        let id = try createKey()
        let enc = try kmsctl(["encrypt", "--key-id", id, "--base64"], stdin: Data("aGVsbG8gd29ybGQ=\n".utf8))
        #expect(enc.status == 0, "\(enc.stderr)")
        let text = enc.text.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(Data(base64Encoded: text) != nil)
        let dec = try kmsctl(["decrypt", "--base64"], stdin: Data(text.utf8))
        #expect(dec.text.trimmingCharacters(in: .whitespacesAndNewlines) == "aGVsbG8gd29ybGQ=")
        let bad = try kmsctl(["decrypt", "--base64"], stdin: Data("not base64!!".utf8))
        #expect(bad.status != 0 && bad.stderr.hasPrefix("kmsctl: ValidationException: "))
    }

    @Test func jsonOutputsOfDataCommands() throws {
        let id = try createKey()
        let enc = try json(try kmsctl(["encrypt", "--key-id", id, "--json"], stdin: Data("x".utf8)))
        #expect(enc["KeyId"] as? String == id && enc["EncryptionAlgorithm"] as? String == "SYMMETRIC_DEFAULT")
        let blob = try #require(Data(base64Encoded: enc["CiphertextBlob"] as? String ?? ""))
        let dec = try json(try kmsctl(["decrypt", "--json"], stdin: blob))
        #expect(dec["Plaintext"] as? String == Data("x".utf8).base64EncodedString())
        let dk = try json(try kmsctl(["generate-data-key", "--key-id", id, "--key-spec", "AES_256"]))
        #expect(Data(base64Encoded: dk["Plaintext"] as? String ?? "")?.count == 32)
        #expect(dk["CiphertextBlob"] != nil && dk["KeyId"] as? String == id)
        let wp = try json(try kmsctl(["generate-data-key-without-plaintext", "--key-id", id, "--number-of-bytes", "24"]))
        #expect(wp["Plaintext"] == nil && wp["CiphertextBlob"] != nil)
        let other = try createKey()
        let re = try json(try kmsctl(["re-encrypt", "--destination-key-id", other, "--json"], stdin: blob))
        #expect(re["SourceKeyId"] as? String == id && re["KeyId"] as? String == other)
        let random = try kmsctl(["generate-random", "--number-of-bytes", "12"])
        #expect(random.status == 0 && random.stdout.count == 12)
        let list = try json(try kmsctl(["list-keys", "--json"]))
        #expect((list["Keys"] as? [[String: Any]])?.contains { $0["KeyId"] as? String == id } == true)
        // The table for people shows each key's alias, state and description.
        #expect(try kmsctl(["create-alias", "--alias-name", "alias/cli-table", "--target-key-id", id]).status == 0)
        #expect(try kmsctl(["disable-key", "--key-id", other]).status == 0)
        let table = try kmsctl(["list-keys"]).text.split(separator: "\n")
        #expect(table.first?.split(separator: " ", omittingEmptySubsequences: true) == ["KeyId", "Alias", "State", "Rotation", "Description"])
        let row = try #require(table.first { $0.hasPrefix(id) }), otherRow = try #require(table.first { $0.hasPrefix(other) })
        #expect(row.contains("alias/cli-table") && row.contains("Enabled") && row.contains("off"), "\(row)")
        #expect(otherRow.contains("Disabled"), "\(otherRow)")
        let who = try json(try kmsctl(["whoami", "--json"]))
        #expect(who["Uid"] as? Int == Int(getuid()))
    }

    @Test(arguments: [
        (["decrypt"], "InvalidCiphertextException", Int32(1)),
        (["describe-key", "--key-id", "00000000-0000-4000-8000-000000000000"], "NotFoundException", 1),
        (["generate-random", "--number-of-bytes", "5000"], "ValidationException", 1),
    ])
    func errorsGoToStderrWithTheirCode(_ args: [String], _ code: String, _ status: Int32) throws {
        let r = try kmsctl(args, stdin: Data([1, 2, 3]))
        #expect(r.status == status)
        #expect(r.stderr.hasPrefix("kmsctl: \(code): "), "\(r.stderr)")
        #expect(r.stdout.isEmpty)
    }

    @Test func unreachableDaemonIsAConnectionError() throws {
        let r = try run(Paths.kmsctl, ["whoami", "--socket", "/tmp/no-such-kmsd.sock"])
        #expect(r.status == 3)
        #expect(r.stderr.hasPrefix("kmsctl: ConnectionError: "))
    }

    @Test func usageErrorsAndHelp() throws {
        let missing = try kmsctl(["encrypt"])
        #expect(missing.status == 2 && missing.stderr.contains("--key-id"))
        let badContext = try kmsctl(["encrypt", "--key-id", "x", "--context", "novalue"])
        #expect(badContext.status == 2)
        let help = try kmsctl(["--help"])
        #expect(help.status == 0)
        for sub in ["create-key", "describe-key", "list-keys", "encrypt", "decrypt", "re-encrypt", "generate-data-key",
                    "generate-data-key-without-plaintext", "generate-random", "whoami"] {
            #expect(help.text.contains(sub), "help lists \(sub)")
        }
        #expect(help.text.contains("KMSD_SOCKET"))
    }

    @Test func kmsdHelpDocumentsEveryOption() throws {
        let r = try run(Paths.kmsd, ["--help"])
        #expect(r.status == 0)
        for option in ["--config", "--dev", "--state-dir", "--socket", "--socket-mode", "--socket-group", "--root-key-file",
                       "--admin-uid", "--max-frame-bytes", "--max-connections", "--max-connections-per-uid", "--max-in-flight",
                       "--idle-timeout", "--allow-unlocked-memory", "--audit-fail-closed", "--max-requests-per-second-per-uid",
                       "--request-burst-per-uid", "--admin-reserved-connections", "--frame-timeout", "--audit-timeout-ms", "--event-loops", "--dev-day-seconds", "--dev-clock-file"] {
            #expect(r.text.contains(option), "kmsd --help documents \(option)")
        }
    }

    @Test func configFileIsReadAndTyposAreRefused() throws {
        let dir = try Paths.tempDir("config")
        let good = dir + "/good.json"
        try Data("""
        {"stateDirectory": "\(dir)/state", "socketPath": "\(dir)/k.sock", "development": true, "socketMode": "0660",
         "administrators": {"uids": [0]}, "maxInFlightPerConnection": 8, "auditFailClosed": false}
        """.utf8).write(to: URL(fileURLWithPath: good))
        let started = try run("/usr/bin/timeout", ["-s", "TERM", "2", Paths.kmsd, "--config", good])
        #expect(started.stderr.contains("kmsd: ready: serving on \(dir)/k.sock"), "\(started.stderr)")
        let typo = dir + "/typo.json"
        try Data(#"{"stateDirectory": "/tmp/x", "adminstrators": {}}"#.utf8).write(to: URL(fileURLWithPath: typo))
        let refused = try run(Paths.kmsd, ["--config", typo])
        #expect(refused.status != 0 && refused.stderr.contains("unknown setting 'adminstrators'"), "\(refused.stderr)")
    }
}
