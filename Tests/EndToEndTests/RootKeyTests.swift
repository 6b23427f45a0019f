import Foundation
import KMSClient
import Testing

/// Where the root key comes from: the systemd credential, a configured file, or (development
/// mode only) a generated one; without one, kmsd refuses to start and says how to provide it.
@Suite(.serialized)
struct RootKeyTests {
    @Test func withoutARootKeyProductionModeRefusesToStart() throws {
        let dir = try Paths.tempDir("noroot")
        let r = try run(Paths.kmsd, ["--state-dir", dir + "/state", "--socket", dir + "/k.sock", "--audit-fail-closed", "false"],
                        env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(r.status != 0)
        #expect(r.stderr.contains("no root key") && r.stderr.contains("LoadCredentialEncrypted=root-key"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/state/root-key"), "production mode never generates a root key")
    }

    @Test func theSystemdCredentialIsUsedFirst() throws {
        let dir = try Paths.tempDir("cred")
        try FileManager.default.createDirectory(atPath: dir + "/creds", withIntermediateDirectories: true)
        try writeRandomKey(dir + "/creds/root-key")
        try writeRandomKey(dir + "/file-key")
        let r = try run("/usr/bin/timeout", ["-s", "TERM", "2", Paths.kmsd, "--state-dir", dir + "/state", "--socket", dir + "/k.sock",
                                             "--root-key-file", dir + "/file-key", "--audit-fail-closed", "false"],
                        env: ["CREDENTIALS_DIRECTORY": dir + "/creds"])
        #expect(r.stderr.contains("root key from systemd credential \(dir)/creds/root-key"), "\(r.stderr)")
        #expect(!r.stderr.contains("WARNING: DEVELOPMENT MODE"))
    }

    @Test func aConfiguredFileIsUsedWithoutACredential() throws {
        let dir = try Paths.tempDir("keyfile")
        try writeRandomKey(dir + "/file-key")
        let r = try run("/usr/bin/timeout", ["-s", "TERM", "2", Paths.kmsd, "--state-dir", dir + "/state", "--socket", dir + "/k.sock",
                                             "--root-key-file", dir + "/file-key", "--audit-fail-closed", "false"],
                        env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(r.stderr.contains("root key from file \(dir)/file-key"), "\(r.stderr)")
    }

    @Test func aRootKeyOfTheWrongSizeIsRefused() throws {
        let dir = try Paths.tempDir("shortkey")
        try writeRandomKey(dir + "/short", bytes: 31)
        let r = try run(Paths.kmsd, ["--state-dir", dir + "/state", "--root-key-file", dir + "/short"], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(r.status != 0 && r.stderr.contains("exactly 32 raw bytes"), "\(r.stderr)")
    }

    @Test func developmentModeGeneratesAPrivateRootKeyAndSaysSoLoudly() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        #expect(daemon.log.contains("WARNING: DEVELOPMENT MODE generated a NEW root key"))
        var st = stat()
        #expect(stat(daemon.stateDir + "/root-key", &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600 && st.st_size == 32)
        // A restart reuses it and warns no more about a new one.
        try daemon.restart()
        #expect(daemon.log.components(separatedBy: "generated a NEW root key").count == 2)
    }
}

/// kmsd serves a socket passed by systemd (sd_listen_fds) instead of binding its own.
@Suite struct SocketActivationTests {
    @Test func servesThePassedSocket() async throws {
        let dir = try Paths.tempDir("activate")
        let socket = dir + "/activated.sock"
        let log = dir + "/log"
        let pid = try spawnDetached("/usr/bin/systemd-socket-activate", ["-l", socket, Paths.kmsd, "--dev", "--state-dir", dir + "/state",
                                                                        "--admin-uid", "\(getuid())"], log: log)
        defer { kill(pid, SIGTERM) }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket), Date() < deadline { usleep(20_000) }
        let client = KMSClient(socketPath: socket)
        let hello = try await client.hello()
        #expect(hello.protocolVersion == 1)
        let key = try await client.createKey()
        #expect(try await client.decrypt(ciphertextBlob: Array(client.encrypt(keyID: key.keyID, plaintext: [5]).ciphertextBlob)).plaintext == Data([5]))
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(text.contains("serving on socket-activated fd"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/state/kmsd.sock"), "kmsd bound no socket of its own")
    }
}

extension RootKeyTests {
    @Test func aRootKeyFileOthersCanReadIsRefused() throws {
        let dir = try Paths.tempDir("openkey")
        try writeRandomKey(dir + "/key")
        chmod(dir + "/key", 0o644)
        let r = try run(Paths.kmsd, ["--state-dir", dir + "/state", "--root-key-file", dir + "/key"], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(r.status != 0 && r.stderr.contains("readable by others") && r.stderr.contains("chmod 600"), "\(r.stderr)")
    }
}
