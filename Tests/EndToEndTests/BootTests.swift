import Foundation
import Glibc
import Testing

/// The real units under the real systemd: `make install` into an overlay of this machine's root
/// (so nothing is written to the host), README's walkthrough (sysusers, tmpfiles, the root key
/// sealed with `systemd-creds`, `systemctl enable` of both sockets), then /lib/systemd/systemd
/// booted as PID 1 of private pid, mount and cgroup namespaces on that overlay (pivot_root, as a
/// container manager does; its boot-time cleanups touch only the overlay). Inside: kmsd.socket
/// starts the hardened kmsd.service on the first connection, which gets its root key through
/// LoadCredentialEncrypted=, runs as user kmsd without capabilities, under seccomp, audits to
/// that system's journald, serves a unit its secret through LoadCredential= and refuses another
/// unit, reloads on `systemctl reload`, stops with status 0, and is started again by its socket
/// with every key kept.
@Suite(.serialized)
struct BootTests {
    /// Whether this machine can do it: root, overlayfs, unshare, nsenter and systemd.
    static let possible: Bool = {
        guard isRoot else { return false }
        let filesystems = (try? String(contentsOfFile: "/proc/filesystems", encoding: .utf8)) ?? ""
        return filesystems.contains("\toverlay\n")
            && ["/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/make", "/usr/bin/systemd-creds"].allSatisfy { (path: String) in
                access(path, X_OK) == 0
            }
    }()

    /// Mounts the overlay, installs and prepares kmsd in it, and execs systemd as PID 1 there.
    static let script = """
    set -e
    R=$1; BIN=$2; REPO=$3
    systemd-creds setup >/dev/null 2>&1 || true   # the host key, before the overlay shows it
    mkdir -p "$R/upper" "$R/work" "$R/merged"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$R/upper,workdir=$R/work" "$R/merged"
    M="$R/merged"
    mount -t proc proc "$M/proc"
    # Read-only kernel settings, as container managers mount them: the guest's boot (sysctl,
    # udev, modules) changes nothing on the host.
    mount --bind "$M/proc/sys" "$M/proc/sys"
    mount -o remount,bind,ro "$M/proc/sys"
    mount -t sysfs -o ro sysfs "$M/sys"
    mount -t tmpfs -o mode=0755 tmpfs "$M/sys/fs/cgroup"   # systemd mounts its hierarchies here
    # A /dev of its own, as a container manager gives one (devpts: PrivateDevices= needs it).
    mount -t tmpfs -o mode=0755 tmpfs "$M/dev"
    for n in null zero full random urandom tty; do touch "$M/dev/$n"; mount --bind "/dev/$n" "$M/dev/$n"; done
    mkdir -p "$M/dev/shm" "$M/dev/pts"
    mount -t tmpfs tmpfs "$M/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$M/dev/pts"
    ln -s pts/ptmx "$M/dev/ptmx"
    ln -s /proc/self/fd "$M/dev/fd"
    # README, "Install on a systemd host".
    make -s -C "$REPO" install "BIN=$BIN" "DESTDIR=$M" PREFIX=/usr
    systemd-sysusers --root="$M"
    systemd-tmpfiles --root="$M" --create kmsd.conf
    head -c 32 /dev/urandom | systemd-creds encrypt --name=root-key - "$M/etc/kmsd/root-key.cred"
    chmod 0600 "$M/etc/kmsd/root-key.cred"
    systemctl --root="$M" enable kmsd.socket kmsd-credentials.socket
    cd "$M"
    mkdir -p .oldroot
    pivot_root . .oldroot
    umount -l /.oldroot
    rmdir /.oldroot
    # systemd leaves propagation to the container manager; credentials need it shared.
    mount --make-rshared /
    export container=kmsd-test
    exec /lib/systemd/systemd --system --unit=multi-user.target
    """

    @Test(.enabled(if: BootTests.possible, "needs root, overlayfs, unshare, nsenter and /lib/systemd/systemd to boot systemd as PID 1 in private namespaces"))
    func theRealUnitsBootUnderSystemd() throws {
        let dir = try Paths.tempDir("boot")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.script.write(toFile: dir + "/boot.sh", atomically: true, encoding: .utf8)
        // The cgroups the guest's systemd makes where this process sits at a hierarchy's root
        // (cgroup v1 controllers here) are removed again afterwards; the host keeps its own.
        let cgroupRoot = "/sys/fs/cgroup"
        func cgroups() -> Set<String> {
            var all = Set<String>()
            for h in (try? FileManager.default.contentsOfDirectory(atPath: cgroupRoot)) ?? [] {
                for c in (try? FileManager.default.contentsOfDirectory(atPath: cgroupRoot + "/" + h)) ?? [] {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: "\(cgroupRoot)/\(h)/\(c)", isDirectory: &isDir), isDir.boolValue { all.insert("\(cgroupRoot)/\(h)/\(c)") }
                }
            }
            return all
        }
        let hostCgroups = cgroups()
        defer {
            for d in cgroups().subtracting(hostCgroups) { _ = try? run("/usr/bin/find", [d, "-depth", "-type", "d", "-exec", "rmdir", "{}", "+"]) }
        }
        let began = Date()
        let outer = try ChildProcess("/usr/bin/unshare", ["-m", "-p", "-f", "--cgroup", "--propagation", "private", "/bin/bash", dir + "/boot.sh",
                                                          dir, Paths.binDir.path, InstallTests.repo], stdout: dir + "/boot.log", stderr: dir + "/boot.log")
        var pid: Int32 = 0
        defer {
            if pid > 0 { kill(pid, SIGKILL) }
            if outer.isRunning { kill(outer.processIdentifier, SIGKILL) }
            _ = outer.waitUntilExit()
        }
        // systemd: the child unshare forked, once it has exec'd.
        let deadline = Date().addingTimeInterval(120)
        while pid == 0, Date() < deadline, outer.isRunning {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(outer.processIdentifier)/task")) ?? []
            for t in tasks {
                let children = (try? String(contentsOfFile: "/proc/\(outer.processIdentifier)/task/\(t)/children", encoding: .utf8)) ?? ""
                // (Its comm is "systemd" once bash has exec'd it; "bash" before.)
                if let child = children.split(separator: " ").first.flatMap({ Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }),
                   (try? String(contentsOfFile: "/proc/\(child)/comm", encoding: .utf8)) == "systemd\n" {
                    pid = child
                }
            }
            if pid == 0 { usleep(100_000) }
        }
        let log = { (try? String(contentsOfFile: dir + "/boot.log", encoding: .utf8)) ?? "" }
        try #require(pid > 0, "systemd did not start: \(log().suffix(2000))")
        func inside(_ args: [String], stdin: Data = Data()) throws -> ProcessResult {
            try run("/usr/bin/timeout", ["-s", "KILL", "90", "/usr/bin/nsenter", "-t", "\(pid)", "-m", "-p", "-C", "-r", "-w"] + args, stdin: stdin)
        }
        // Until systemd listens on its private bus, systemctl cannot ask (and says nothing).
        var running = try inside(["systemctl", "is-system-running", "--wait"])
        let settled = Date().addingTimeInterval(90)
        while running.text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, Date() < settled {
            usleep(200_000)
            running = try inside(["systemctl", "is-system-running", "--wait"])
        }
        let state = running.text.trimmingCharacters(in: .whitespacesAndNewlines)
        let failed = (try? inside(["systemctl", "list-units", "--failed", "--no-pager"]).text) ?? ""
        // When systemctl never got an answer (state ""), systemd's console output says why.
        #expect(state == "running", "\(state) \(running.stderr): \(failed)\nsystemd's console: \(log().suffix(3000))")
        print("boot test: systemd as PID 1 (host pid \(pid)) \(state) after \(String(format: "%.1f", Date().timeIntervalSince(began))) s")
        #expect(try inside(["systemctl", "is-active", "kmsd.socket", "kmsd-credentials.socket"]).text == "active\nactive\n")
        #expect(try inside(["systemctl", "is-active", "kmsd.service"]).text == "inactive\n", "started by its socket, not at boot")

        // The first connection starts kmsd.service, with its root key from the sealed credential.
        let created = try inside(["/usr/bin/kmsctl", "create-key", "--description", "booted", "--json"])
        let unitLog = (try? inside(["journalctl", "-u", "kmsd.service", "--no-pager", "-n", "20"]).text) ?? ""
        let key = try #require(((try? JSONSerialization.jsonObject(with: created.stdout)) as? [String: Any])
            .flatMap { $0["KeyMetadata"] as? [String: Any] }?["KeyId"] as? String, "\(created.stderr) \(unitLog)")
        #expect(try inside(["systemctl", "is-active", "kmsd.service"]).text == "active\n")
        let mainPID = try inside(["systemctl", "show", "-p", "MainPID", "--value", "kmsd.service"]).text.trimmingCharacters(in: .whitespacesAndNewlines)
        let kmsdUID = try inside(["id", "-u", "kmsd"]).text.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!kmsdUID.isEmpty && kmsdUID != "0", "the kmsd user of sysusers.d")
        let status = try inside(["cat", "/proc/\(mainPID)/status"]).text
        for line in ["Uid:\t\(kmsdUID)\t\(kmsdUID)\t\(kmsdUID)\t\(kmsdUID)", "NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000"] {
            #expect(status.contains(line), "kmsd.service's process: \(line)")
        }
        let sealed = try inside(["/usr/bin/kmsctl", "encrypt", "--key-id", key, "--context", "boot=test"], stdin: Data("booted secret".utf8))
        #expect(sealed.status == 0, "\(sealed.stderr)")
        let opened = try inside(["/usr/bin/kmsctl", "decrypt", "--context", "boot=test"], stdin: sealed.stdout)
        #expect(opened.text == "booted secret", "\(opened.stderr)")

        // The credential provider through systemd's own LoadCredential=: the unit the key's
        // policy names gets its secret; another unit gets nothing, and the denial is audited.
        let policy = #"{"Version": "2012-10-17", "Statement": [{"Sid": "Admins", "Effect": "Allow", "Principal": {"Role": "Administrators"}, "Action": "kms:*", "Resource": "*"}, {"Sid": "Consumer", "Effect": "Allow", "Principal": {"Unit": "consumer.service"}, "Action": "kms:Decrypt", "Resource": "*"}]}"#
        #expect(try inside(["/usr/bin/kmsctl", "put-key-policy", "--key-id", key, "--policy", policy]).status == 0)
        for unit in ["consumer.service", "other.service"] {
            let put = try inside(["/usr/bin/kmsctl", "put-credential", "--unit", unit, "--name", "dbpass", "--key-id", key], stdin: Data("db-password".utf8))
            #expect(put.status == 0, "\(put.stderr)")
        }
        func load(_ unit: String) throws -> ProcessResult {
            try inside(["systemd-run", "--unit=\(unit)", "--wait", "--pipe", "--quiet", "-p", "LoadCredential=dbpass:/run/kmsd/credentials.sock",
                        "/bin/sh", "-c", "cat \"$CREDENTIALS_DIRECTORY/dbpass\""])
        }
        #expect(try load("consumer").text == "db-password")
        #expect(try load("other").text.isEmpty, "a unit the policy does not name gets nothing")

        // SIGHUP through systemctl reload; then a clean stop, and a start again by the socket.
        #expect(try inside(["systemctl", "reload", "kmsd.service"]).status == 0)
        #expect(try inside(["systemctl", "stop", "kmsd.service"]).status == 0)
        let stopped = try inside(["systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", "kmsd.service"]).text
        #expect(stopped.contains("Result=success") && stopped.contains("ExecMainStatus=0"), "\(stopped)")
        let again = try inside(["/usr/bin/kmsctl", "decrypt", "--context", "boot=test"], stdin: sealed.stdout)
        #expect(again.text == "booted secret", "after a restart by the socket: \(again.stderr)")

        // Everything above is in that system's journal, from kmsd's audit.
        let records = try inside(["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=kmsd"]).text.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
        }
        func has(_ action: String, _ result: String, unit: String? = nil) -> Bool {
            records.contains { $0["KMS_ACTION"] as? String == action && $0["KMS_RESULT"] as? String == result && (unit == nil || $0["KMS_PEER_UNIT"] as? String == unit) }
        }
        #expect(has("CreateKey", "Allowed") && has("ConfigurationReloaded", "Allowed") && has("KmsdStopped", "Allowed"), "\(records.count) records")
        #expect(has("Decrypt", "Allowed", unit: "consumer.service") && has("Decrypt", "Denied", unit: "other.service"))

        #expect(try inside(["systemctl", "poweroff"]).status == 0)
        let off = Date().addingTimeInterval(30)
        while outer.isRunning, Date() < off { usleep(100_000) }
        #expect(!outer.isRunning, "systemd powered off")
        pid = 0
    }
}
