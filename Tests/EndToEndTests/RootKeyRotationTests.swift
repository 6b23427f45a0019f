import Foundation
import Glibc
import KMSClient
import Testing

/// The root key as a systemd credential (sealed with `systemd-creds`, host key), and root-key
/// rotation with `kmsd rewrap`: every key survives, the old root key stops opening the
/// keystore, and a rewrap killed at any moment loses nothing (README: "Rotating the root key").
@Suite(.serialized)
struct RootKeyRotationTests {
    /// A state directory, a private credentials directory (as systemd makes for the unit) and
    /// sealed credentials in `dir`.
    struct Host {
        let dir: String
        var state: String { dir + "/state" }
        var socket: String { dir + "/kmsd.sock" }
        var log: String { dir + "/kmsd.log" }

        init() throws { dir = try Paths.tempDir("creds") }

        /// What systemd does for LoadCredentialEncrypted=NAME:FILE: a private directory holding
        /// the decrypted credential.
        func credentials(_ pairs: [(name: String, file: String)]) throws -> String {
            let creds = dir + "/creds-\(UUID().uuidString.prefix(6))"
            #expect(mkdir(creds, 0o700) == 0)
            for (name, file) in pairs {
                let r = try run("/usr/bin/systemd-creds", ["decrypt", "--name=\(name)", file, creds + "/" + name])
                #expect(r.status == 0, "\(r.stderr)")
                chmod(creds + "/" + name, 0o400)
            }
            return creds
        }

        func start(credentials: String) throws -> ChildProcess {
            try launchKMSD(Paths.kmsd, ["--state-dir", state, "--socket", socket, "--audit-fail-closed", "false",
                                        "--admin-uid", "0", "--admin-uid", "\(getuid())"],
                           log: log, env: ["CREDENTIALS_DIRECTORY": credentials])
        }

        func rewrap(credentials: String) throws -> ProcessResult {
            try run(Paths.kmsd, ["rewrap", "--state-dir", state], env: ["CREDENTIALS_DIRECTORY": credentials])
        }

        func startFails(credentials: String) throws -> String {
            let r = try run("/usr/bin/timeout", ["-s", "KILL", "20", Paths.kmsd, "--state-dir", state, "--socket", socket,
                                                 "--audit-fail-closed", "false"], env: ["CREDENTIALS_DIRECTORY": credentials])
            #expect(r.status != 0)
            return r.stderr
        }
    }

    static func stop(_ p: ChildProcess) {
        kill(p.processIdentifier, SIGTERM)
        #expect(p.waitUntilExit() == 0)
    }

    /// Keys with several versions, an alias, and a ciphertext under each version.
    static func populate(_ socket: String) async throws -> [(blob: [UInt8], plaintext: [UInt8])] {
        let client = KMSClient(socketPath: socket)
        var blobs: [(blob: [UInt8], plaintext: [UInt8])] = []
        for i in 0..<4 {
            let key = try await client.createKey(description: "rotation \(i)")
            for v in 0..<2 {
                if v > 0 { _ = try await client.rotateKeyOnDemand(keyID: key.keyID) }
                let plaintext = Array("secret \(i).\(v)".utf8)
                blobs.append((Array(try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: ["k": "\(i)"]).ciphertextBlob), plaintext))
            }
        }
        return blobs
    }

    static func expectAllDecrypt(_ socket: String, _ blobs: [(blob: [UInt8], plaintext: [UInt8])]) async throws {
        let client = KMSClient(socketPath: socket)
        for (i, b) in blobs.enumerated() {
            let out = try await client.decrypt(ciphertextBlob: b.blob, context: ["k": "\(i / 2)"])
            #expect(Array(out.plaintext) == b.plaintext)
        }
    }

    @Test(.enabled(if: isRoot, "needs root: systemd-creds encrypts and decrypts with the host key (/var/lib/systemd/credential.secret)"))
    func aSealedRootKeyAndItsRotation() async throws {
        let host = try Host()
        let oldCred = host.dir + "/root-key.cred", newCred = host.dir + "/root-key.cred.new"
        try sealRandomKey(name: "root-key", to: oldCred)
        // The sealed file shows nothing of the key: it decrypts only through systemd-creds.
        let creds = try host.credentials([("root-key", oldCred)])
        let raw = try Data(contentsOf: URL(fileURLWithPath: creds + "/root-key"))
        #expect(raw.count == 32)
        let sealedBytes = try Data(contentsOf: URL(fileURLWithPath: oldCred))
        #expect(sealedBytes.range(of: raw) == nil && sealedBytes.range(of: Data(raw.base64EncodedString().utf8)) == nil)
        // A credential under another name does not pass for root-key.
        let misnamed = try run("/usr/bin/systemd-creds", ["decrypt", "--name=other", oldCred, host.dir + "/other"])
        #expect(misnamed.status != 0)

        var kmsd = try host.start(credentials: creds)
        let first = (try? String(contentsOfFile: host.log, encoding: .utf8)) ?? ""
        #expect(first.contains("root key from systemd credential \(creds)/root-key"), "\(first)")
        let blobs = try await Self.populate(host.socket)
        Self.stop(kmsd)

        // Rotation, as README says: seal a new key, stop kmsd, rewrap with both credentials.
        try sealRandomKey(name: "new-root-key", to: newCred)
        let both = try host.credentials([("root-key", oldCred), ("new-root-key", newCred)])
        let rewrap = try host.rewrap(credentials: both)
        #expect(rewrap.status == 0 && rewrap.text.contains("moved from root key"), "\(rewrap.text)\(rewrap.stderr)")
        // Run again, it says the move is done.
        let again = try host.rewrap(credentials: both)
        #expect(again.status == 0 && again.text.contains("already under the new root key"), "\(again.text)\(again.stderr)")

        // The old root key no longer opens the keystore, and kmsd says which key it needs.
        let refused = try host.startFails(credentials: creds)
        #expect(refused.contains("root key does not match") && refused.contains("kmsd rewrap"), "\(refused)")
        // The new credential under its usual name opens it, every version of every key decrypts.
        let newName = host.dir + "/root-key.cred.rotated"
        let r = try run("/bin/sh", ["-c", "systemd-creds decrypt --name=new-root-key \(newCred) - | systemd-creds encrypt --with-key=host --name=root-key - \(newName)"])
        #expect(r.status == 0, "\(r.stderr)")
        kmsd = try host.start(credentials: try host.credentials([("root-key", newName)]))
        try await Self.expectAllDecrypt(host.socket, blobs)
        Self.stop(kmsd)
    }

    /// SIGKILL at random moments of a rewrap, 20 times in a row, each time to a new root key;
    /// after each kill the documented recovery (run rewrap again) completes the move, and at
    /// the end every ciphertext still decrypts under the last key.
    @Test func aRewrapKilledAtAnyMomentLosesNothing() async throws {
        let dir = try Paths.tempDir("rewrap-kill")
        let state = dir + "/state", socket = dir + "/kmsd.sock", log = dir + "/kmsd.log"
        func key(_ i: Int) throws -> String {
            let path = "\(dir)/root-\(i)"
            try writeRandomKey(path)
            return path
        }
        func start(_ keyFile: String) throws -> ChildProcess {
            try launchKMSD(Paths.kmsd, ["--state-dir", state, "--socket", socket, "--root-key-file", keyFile, "--audit-fail-closed", "false",
                                        "--admin-uid", "0", "--admin-uid", "\(getuid())"], log: log, env: ["CREDENTIALS_DIRECTORY": ""])
        }
        var current = try key(0)
        var kmsd = try start(current)
        let blobs = try await Self.populate(socket)
        Self.stop(kmsd)

        // How long one rewrap takes here, to spread the kills over it.
        let probe = try key(100)
        let began = Date()
        let timed = try run(Paths.kmsd, ["rewrap", "--state-dir", state, "--root-key-file", current, "--new-root-key-file", probe], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(timed.status == 0, "\(timed.stderr)")
        let micros = max(1000, Int(Date().timeIntervalSince(began) * 1_000_000))
        current = probe
        var finishedBeforeKill = 0, finishedByRetry = 0
        for i in 1...20 {
            let next = try key(i)
            let args = ["rewrap", "--state-dir", state, "--root-key-file", current, "--new-root-key-file", next]
            let p = try ChildProcess(Paths.kmsd, args, env: ["CREDENTIALS_DIRECTORY": ""])
            usleep(useconds_t(Int.random(in: 0...micros)))
            kill(p.processIdentifier, SIGKILL)
            _ = p.waitUntilExit()
            if i % 5 == 0 {
                // Right after the kill, before any recovery: kmsd starts under the old key or the
                // new one (whichever the rewrap's one transaction left), never neither, and every
                // ciphertext decrypts.
                var served = false
                for candidate in [current, next] where !served {
                    if let daemon = try? start(candidate) {
                        try await Self.expectAllDecrypt(socket, blobs)
                        Self.stop(daemon)
                        served = true
                    }
                }
                #expect(served, "kill \(i): kmsd started under neither the old nor the new root key")
            }
            let retry = try run(Paths.kmsd, args, env: ["CREDENTIALS_DIRECTORY": ""])
            #expect(retry.status == 0, "kill \(i): \(retry.stderr)")
            if retry.text.contains("already under the new root key") { finishedBeforeKill += 1 } else if retry.text.contains("moved from root key") { finishedByRetry += 1 }
            current = next
        }
        #expect(finishedBeforeKill + finishedByRetry == 20)
        print("rewrap kills: \(finishedByRetry) before the write committed, \(finishedBeforeKill) after (one rewrap: \(micros) µs)")
        kmsd = try start(current)
        try await Self.expectAllDecrypt(socket, blobs)
        Self.stop(kmsd)
        // Any earlier key is refused, naming the key the keystore is under.
        let r = try run("/usr/bin/timeout", ["-s", "KILL", "20", Paths.kmsd, "--state-dir", state, "--socket", socket, "--root-key-file", dir + "/root-0",
                                             "--audit-fail-closed", "false"], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(r.status != 0 && r.stderr.contains("the keystore is under root key"), "\(r.stderr)")
    }

    @Test func rewrapRefusesWhileKmsdRunsAndWithoutANewKey() throws {
        let daemon = try Daemon()
        let keyFile = daemon.stateDir + "-new"
        try writeRandomKey(keyFile)
        let running = try run(Paths.kmsd, ["rewrap", "--dev", "--state-dir", daemon.stateDir, "--new-root-key-file", keyFile], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(running.status != 0 && running.stderr.contains("another kmsd (pid \(daemon.pid))"), "\(running.stderr)")
        daemon.stop()
        let none = try run(Paths.kmsd, ["rewrap", "--dev", "--state-dir", daemon.stateDir], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(none.status != 0 && none.stderr.contains("no new root key"), "\(none.stderr)")
        let same = try run(Paths.kmsd, ["rewrap", "--dev", "--state-dir", daemon.stateDir, "--new-root-key-file", daemon.stateDir + "/root-key"],
                           env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(same.status != 0 && same.stderr.contains("the new root key is the old one"), "\(same.stderr)")
    }
}
