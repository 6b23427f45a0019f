import Foundation
import Glibc
import Testing

/// `make install` and README's "Install on a systemd host", followed into a DESTDIR and checked
/// file by file; the installed units verified and rated by systemd-analyze.
@Suite(.serialized)
struct InstallTests {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func make(_ args: [String]) throws -> ProcessResult {
        try run("/usr/bin/make", ["-s", "-C", Self.repo, "install", "BIN=\(Paths.binDir.path)"] + args)
    }

    func mode(_ path: String) -> mode_t? {
        var st = stat()
        return lstat(path, &st) == 0 ? st.st_mode & 0o7777 : nil
    }

    func text(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    @Test(.enabled(if: isRoot, "needs root: systemd-sysusers/systemd-tmpfiles create a user and chown in the tree, systemd-creds uses the host key"))
    func theWalkthroughIntoADestdir() throws {
        let dest = try Paths.tempDir("destdir") + "/root"
        let r = try make(["DESTDIR=\(dest)", "PREFIX=/usr"])
        #expect(r.status == 0, "\(r.stderr)")
        // Every file where PREFIX=/usr puts it, with its mode, and nothing else.
        let expected: [(String, mode_t)] = [
            ("/usr/bin/kmsd", 0o755), ("/usr/bin/kmsctl", 0o755),
            ("/usr/lib/systemd/system/kmsd.service", 0o644), ("/usr/lib/systemd/system/kmsd.socket", 0o644),
            ("/usr/lib/systemd/system/kmsd-credentials.socket", 0o644), ("/usr/lib/systemd/system/kmsd-luks@.service", 0o644),
            ("/usr/lib/sysusers.d/kmsd.conf", 0o644), ("/usr/lib/tmpfiles.d/kmsd.conf", 0o644),
            ("/usr/share/doc/kmsd/README.md", 0o644), ("/usr/share/doc/kmsd/kmsd.json.example", 0o644),
            ("/etc/kmsd/kmsd.json", 0o644), ("/etc/kmsd/identity-policies", 0o755), ("/etc/kmsd/credentials", 0o755),
        ]
        for (path, m) in expected {
            #expect(mode(dest + path) == m, "\(path): mode \(mode(dest + path).map { String($0, radix: 8) } ?? "missing")")
        }
        let files = (FileManager.default.enumerator(atPath: dest)?.allObjects as? [String] ?? []).filter { p in
            var st = stat()
            return lstat(dest + "/" + p, &st) == 0 && st.st_mode & S_IFMT != S_IFDIR
        }
        #expect(Set(files.map { "/" + $0 }) == Set(expected.map(\.0).filter { !$0.hasSuffix("identity-policies") && !$0.hasSuffix("/credentials") }))
        for name in ["kmsd", "kmsctl"] {
            #expect(FileManager.default.contentsEqual(atPath: dest + "/usr/bin/" + name, andPath: Paths.binDir.path + "/" + name))
        }
        let unit = text(dest + "/usr/lib/systemd/system/kmsd.service")
        #expect(unit.contains("\nExecStart=/usr/bin/kmsd --config /etc/kmsd/kmsd.json\n"))
        #expect(unit.contains("\nDocumentation=file:///usr/share/doc/kmsd/README.md\n"))
        #expect(unit.contains("\nLoadCredentialEncrypted=root-key:/etc/kmsd/root-key.cred\n"))
        #expect(text(dest + "/usr/lib/systemd/system/kmsd.socket") == text(Self.repo + "/systemd/kmsd.socket"))
        #expect(text(dest + "/etc/kmsd/kmsd.json") == text(Self.repo + "/systemd/kmsd.json"))
        // kmsd itself accepts the example configuration (it checks every setting, and refuses
        // unknown ones) and says what it lacks when started without a root key.
        let check = try run(dest + "/usr/bin/kmsd", ["--config", dest + "/etc/kmsd/kmsd.json", "--state-dir", dest + "/var/lib/kmsd-check",
                                                    "--socket", dest + "/k.sock"], env: ["CREDENTIALS_DIRECTORY": ""])
        #expect(check.status != 0 && check.stderr.contains("no root key"), "\(check.stderr)")

        // README's next steps, offline into the same tree.
        #expect(try run("/usr/bin/systemd-sysusers", ["--root=\(dest)"]).status == 0)
        let passwd = text(dest + "/etc/passwd")
        let kmsdLine = try #require(passwd.split(separator: "\n").first { $0.hasPrefix("kmsd:") }, "\(passwd)")
        #expect(kmsdLine.hasSuffix(":/var/lib/kmsd:/usr/sbin/nologin"), "\(kmsdLine)")
        let uid = UInt32(kmsdLine.split(separator: ":")[2]) ?? 0
        #expect(uid > 0 && uid < 1000, "a system user")
        #expect(try run("/usr/bin/systemd-tmpfiles", ["--root=\(dest)", "--create", "kmsd.conf"]).status == 0)
        var st = stat()
        #expect(stat(dest + "/var/lib/kmsd", &st) == 0 && st.st_uid == uid && st.st_mode & 0o777 == 0o700)
        try sealRandomKey(name: "root-key", to: dest + "/etc/kmsd/root-key.cred")
        #expect(mode(dest + "/etc/kmsd/root-key.cred") == 0o600)
        #expect(try run("/usr/bin/systemctl", ["--root=\(dest)", "enable", "kmsd.socket", "kmsd-credentials.socket"]).status == 0)
        for socket in ["kmsd.socket", "kmsd-credentials.socket"] {
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: dest + "/etc/systemd/system/sockets.target.wants/" + socket))
                == "/usr/lib/systemd/system/" + socket)
        }
        // An existing configuration is never overwritten by a second install.
        try Data("{}".utf8).write(to: URL(fileURLWithPath: dest + "/etc/kmsd/kmsd.json"))
        let again = try make(["DESTDIR=\(dest)", "PREFIX=/usr"])
        #expect(again.status == 0 && again.text.contains("kept the existing"))
        #expect(text(dest + "/etc/kmsd/kmsd.json") == "{}")
    }

    /// Installed under a PREFIX (no DESTDIR), the units name executables that exist, so
    /// systemd-analyze can verify them as installed, and rate the service's exposure.
    @Test func theInstalledUnitsVerifyAndAreHardened() throws {
        let prefix = try Paths.tempDir("prefix")
        let r = try make(["PREFIX=\(prefix)", "SYSCONFDIR=\(prefix)/etc"])
        #expect(r.status == 0, "\(r.stderr)")
        let units = prefix + "/lib/systemd/system"
        #expect(text(units + "/kmsd.service").contains("\nExecStart=\(prefix)/bin/kmsd --config \(prefix)/etc/kmsd/kmsd.json\n"))
        #expect(text(units + "/kmsd-luks@.service").contains("\(prefix)/bin/kmsctl decrypt --context volume=%i < \(prefix)/etc/kmsd/luks/%i.key.enc"))
        let verify = try run("/usr/bin/systemd-analyze", ["verify", "--man=no", units + "/kmsd.service", units + "/kmsd.socket", units + "/kmsd-credentials.socket",
                                                                   units + "/kmsd-luks@data.service"])
        #expect(verify.status == 0, "\(verify.text)\(verify.stderr)")
        let exposure = try UnitExposure.rate(units + "/kmsd.service")
        #expect(exposure <= 1.0, "systemd-analyze security rates the installed kmsd.service \(exposure)")
        let shipped = try UnitExposure.rate(Self.repo + "/systemd/kmsd.service")
        #expect(shipped <= 1.0, "systemd-analyze security rates systemd/kmsd.service \(shipped)")
    }
}

/// `systemd-analyze security --offline=true`'s overall exposure of a unit file (0.0 … 10.0).
enum UnitExposure {
    static func rate(_ path: String) throws -> Double {
        let r = try run("/usr/bin/systemd-analyze", ["security", "--offline=true", "--no-pager", path])
        let line = r.text.split(separator: "\n").first { $0.contains("Overall exposure level") } ?? ""
        guard let value = line.split(separator: ":").last?.split(separator: " ").first.flatMap({ Double($0) }) else {
            throw DaemonError("systemd-analyze security printed no exposure level: \(r.text) \(r.stderr)")
        }
        return value
    }
}
