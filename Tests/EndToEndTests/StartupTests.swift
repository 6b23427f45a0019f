import Foundation
import Glibc
import KMSClient
import Testing

/// What kmsd trusts at start: its state directory, its root key, its socket path, its lock.
@Suite(.serialized)
struct StartupTests {
    func start(_ args: [String], env: [String: String] = ["CREDENTIALS_DIRECTORY": ""]) throws -> ProcessResult {
        // Runs until it fails, or for 2 s if it starts.
        try run("/usr/bin/timeout", ["-s", "TERM", "2", Paths.kmsd] + args, env: env)
    }

    @Test func aStateDirectoryOthersCanWriteIsRefused() throws {
        let dir = try Paths.tempDir("openstate")
        mkdir(dir + "/state", 0o700)
        chmod(dir + "/state", 0o777)
        let r = try start(["--dev", "--state-dir", dir + "/state"])
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("\(dir)/state is writable by group or others") && r.stderr.contains("chmod go-w"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/state/root-key"), "nothing is planted or read from it")
    }

    @Test func anAncestorOthersCanWriteIsRefusedUnlessSticky() throws {
        let dir = try Paths.tempDir("openparent")
        mkdir(dir + "/shared", 0o777)
        chmod(dir + "/shared", 0o777)
        let r = try start(["--dev", "--state-dir", dir + "/shared/state"])
        #expect(r.status == 1 && r.stderr.contains("\(dir)/shared is writable by group or others"), "\(r.stderr)")
        chmod(dir + "/shared", 0o1777)  // like /tmp: others cannot replace what kmsd made
        let ok = try start(["--dev", "--state-dir", dir + "/shared/state"])
        #expect(ok.stderr.contains("kmsd: ready"), "\(ok.stderr)")
    }

    @Test(.enabled(if: isRoot, "needs root to plant files owned by another uid"))
    func filesSomeoneElseOwnsAreRefused() throws {
        let dir = try Paths.tempDir("planted")
        // A root key planted by another user in a state directory it pre-created.
        mkdir(dir + "/state", 0o700)
        chown(dir + "/state", 64300, 64300)
        let r = try start(["--dev", "--state-dir", dir + "/state"])
        #expect(r.status == 1 && r.stderr.contains("belongs to uid 64300"), "\(r.stderr)")
        chown(dir + "/state", 0, 0)
        FileManager.default.createFile(atPath: dir + "/state/root-key", contents: Data(repeating: 7, count: 32))
        chmod(dir + "/state/root-key", 0o600)
        chown(dir + "/state/root-key", 64300, 64300)
        let planted = try start(["--dev", "--state-dir", dir + "/state"])
        #expect(planted.status == 1 && planted.stderr.contains("root-key belongs to uid 64300"), "\(planted.stderr)")
        // The same for a root key file given on the command line.
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data(repeating: 9, count: 32))
        chmod(key, 0o600)
        chown(key, 64300, 64300)
        let given = try start(["--state-dir", dir + "/s2", "--root-key-file", key, "--socket", dir + "/k.sock"])
        #expect(given.status == 1 && given.stderr.contains("belongs to uid 64300"), "\(given.stderr)")
    }

    @Test func directoriesAndFilesGetTheirModesWhateverTheUmask() throws {
        let dir = try Paths.tempDir("umask")
        let r = try run("/bin/sh", ["-c", "umask 000; exec /usr/bin/timeout -s TERM 2 '\(Paths.kmsd)' --dev --state-dir '\(dir)/a/b/state'"])
        #expect(r.stderr.contains("kmsd: ready"), "\(r.stderr)")
        func mode(_ p: String) -> mode_t {
            var st = stat()
            return stat(p, &st) == 0 ? st.st_mode & 0o7777 : 0
        }
        #expect(mode(dir + "/a") == 0o755 && mode(dir + "/a/b") == 0o755)
        #expect(mode(dir + "/a/b/state") == 0o700)
        #expect(mode(dir + "/a/b/state/root-key") == 0o600)
        #expect(mode(dir + "/a/b/state/keystore.sqlite3") == 0o600)
    }

    @Test func oneStateDirectoryServesOneDaemon() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let second = try start(["--dev", "--state-dir", daemon.stateDir, "--socket", daemon.stateDir + "/other.sock"])
        #expect(second.status == 1, "\(second.stderr)")
        #expect(second.stderr.contains("another kmsd (pid \(daemon.pid)) is using state directory"), "\(second.stderr)")
        #expect(daemon.process.isRunning)
    }

    @Test func aSymlinkAtTheSocketPathIsRefusedAndAStaleSocketReplaced() async throws {
        let dir = try Paths.tempDir("sockpath")
        let victim = dir + "/victim"
        FileManager.default.createFile(atPath: victim, contents: Data("keep".utf8))
        chmod(victim, 0o600)
        symlink(victim, dir + "/k.sock")
        let r = try start(["--dev", "--state-dir", dir + "/state", "--socket", dir + "/k.sock"])
        #expect(r.status == 1 && r.stderr.contains("is a symbolic link"), "\(r.stderr)")
        var st = stat()
        #expect(stat(victim, &st) == 0 && st.st_mode & 0o777 == 0o600, "the link's target was not touched")
        unlink(dir + "/k.sock")

        // A socket file nobody serves any more (a crashed daemon's) is replaced.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array((dir + "/k.sock").utf8)) }
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        close(fd)
        let daemon = try Daemon(stateDir: dir + "/state2", arguments: ["--socket", dir + "/k.sock"])
        defer { daemon.stop() }
        let hello = try await KMSClient(socketPath: dir + "/k.sock").hello()
        #expect(hello.serverVersion == "0.1.0")
        #expect(stat(dir + "/k.sock", &st) == 0 && st.st_mode & 0o777 == 0o666)
        // A regular file there is not clobbered.
        FileManager.default.createFile(atPath: dir + "/file.sock", contents: Data("x".utf8))
        let file = try start(["--dev", "--state-dir", dir + "/state3", "--socket", dir + "/file.sock"])
        #expect(file.status == 1 && file.stderr.contains("exists and is not a socket"), "\(file.stderr)")
    }

    @Test func aSocketDirectoryOthersCanWriteIsRefused() throws {
        let dir = try Paths.tempDir("opensock")
        mkdir(dir + "/run", 0o777)
        chmod(dir + "/run", 0o777)
        let r = try start(["--dev", "--state-dir", dir + "/state", "--socket", dir + "/run/k.sock"])
        #expect(r.status == 1 && r.stderr.contains("socket directory \(dir)/run is writable by group or others"), "\(r.stderr)")
        chmod(dir + "/run", 0o1777)
        let sticky = try start(["--dev", "--state-dir", dir + "/state2", "--socket", dir + "/run/k.sock"])
        #expect(sticky.stderr.contains("kmsd: ready"), "\(sticky.stderr)")
    }

    @Test func maxConnectionsMustFitTheFileLimit() throws {
        let dir = try Paths.tempDir("nofile")
        let r = try run("/usr/bin/prlimit", ["--nofile=256:256", Paths.kmsd, "--dev", "--state-dir", dir + "/state", "--max-connections", "1024"])
        #expect(r.status == 1 && r.stderr.contains("RLIMIT_NOFILE allows 256") && r.stderr.contains("LimitNOFILE"), "\(r.stderr)")
    }
}
