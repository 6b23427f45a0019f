import Foundation
import Glibc
import KMSClient
import Testing

/// Who the caller is comes from the kernel's record of the connecting process, never from a
/// pid that may have been handed to someone else since.
@Suite(.serialized, .enabled(if: isRoot, "needs root to act as other users and to make a private pid namespace"))
struct IdentityTests {
    static let adminGroup: UInt32 = 9999
    /// 300 supplementary groups: more than SO_PEERGROUPS' first buffer holds.
    static let manyGroups = (5000..<5300).map(UInt32.init)

    @Test func moreThan256GroupsAreReadFromTheSocket() throws {
        let daemon = try Daemon(arguments: ["--admin-uid", "0", "--admin-gid", "\(Self.adminGroup)"])
        defer { daemon.stop() }
        // The administrator group sorts last, past the 256th entry.
        let r = try runAs(uid: 64210, [Paths.kmsctl, "whoami", "--json"], env: ["KMSD_SOCKET": daemon.socket],
                          groups: Self.manyGroups + [Self.adminGroup])
        #expect(r.status == 0, "\(r.stderr)")
        let me = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
        #expect(me["Groups"] as? [Int] == (Self.manyGroups + [Self.adminGroup]).map(Int.init))
        #expect(me["IsAdministrator"] as? Bool == true)
        let outsider = try runAs(uid: 64210, [Paths.kmsctl, "whoami", "--json"], env: ["KMSD_SOCKET": daemon.socket],
                                 groups: Self.manyGroups)
        let other = try #require(try JSONSerialization.jsonObject(with: outsider.stdout) as? [String: Any])
        #expect(other["IsAdministrator"] as? Bool == false)
        #expect((other["Groups"] as? [Int])?.count == 300)
    }

    /// A caller in 300 groups connects while kmsd is stopped and exits; its pid is handed (with
    /// ns_last_pid, in a private pid namespace) to a process in the administrator group; then
    /// kmsd resumes and handles the dead caller's CreateKey. It must be judged as the caller.
    @Test func aRecycledPidLendsNoIdentity() throws {
        try Journal.ensureRunning()
        let dir = try Paths.tempDir("recycle")
        let since = Date()
        let script = """
        set -u
        KMSD="$1"; KMSCTL="$2"; DIR="$3"
        "$KMSD" --dev --state-dir "$DIR/state" --socket "$DIR/k.sock" --audit-fail-closed false \
            --admin-uid 0 --admin-gid \(Self.adminGroup) > "$DIR/kmsd.log" 2>&1 &
        K=$!
        for i in $(seq 300); do grep -q "kmsd: ready" "$DIR/kmsd.log" && break; sleep 0.05; done
        kill -STOP $K
        KMSD_SOCKET="$DIR/k.sock" setpriv --reuid=64200 --regid=64200 --groups=\(Self.manyGroups.map(String.init).joined(separator: ",")) -- \
            "$KMSCTL" create-key --description recycled > "$DIR/caller.out" 2>&1 &
        A=$!
        for i in $(seq 300); do ls -l /proc/$A/fd 2>/dev/null | grep -q 'socket:' && break; sleep 0.02; done
        sleep 0.5
        kill -KILL $A; wait $A 2>/dev/null
        echo $((A - 1)) > /proc/sys/kernel/ns_last_pid
        setpriv --reuid=64201 --regid=64201 --groups=\(Self.adminGroup) -- sleep 30 &
        B=$!
        echo "caller=$A reused=$B"
        kill -CONT $K
        sleep 1
        KMSD_SOCKET="$DIR/k.sock" "$KMSCTL" list-keys --json
        kill $B
        kill -TERM $K; wait $K
        """
        try script.write(toFile: dir + "/recycle.sh", atomically: true, encoding: .utf8)
        let r = try run("/usr/bin/unshare", ["--pid", "--fork", "--mount-proc", "/bin/bash", dir + "/recycle.sh",
                                             Paths.kmsd, Paths.kmsctl, dir])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.text.split(separator: "\n")
        let pids = try #require(lines.first { $0.hasPrefix("caller=") }).split(separator: " ").map { $0.split(separator: "=")[1] }
        try #require(pids[0] == pids[1], "the pid was not reused (\(pids)); the test proves nothing")
        let listing = try #require(try JSONSerialization.jsonObject(with: Data(lines.dropFirst().joined(separator: "\n").utf8)) as? [String: Any],
                                   "\(r.text) \(r.stderr)")
        #expect((listing["Keys"] as? [Any])?.isEmpty == true, "the dead caller's CreateKey ran with the new process's groups")
        // The audit record names the real caller and says its executable could not be known.
        let records = try Journal.query(["KMS_PEER_UID=64200", "KMS_ACTION=CreateKey"], since: since, atLeast: 1)
        let record = try #require(records.first)
        #expect(record["KMS_RESULT"] as? String == "Denied")
        #expect(record["KMS_PEER_EXE"] as? String ?? "" == "", "another process's executable was attributed to the caller")
        #expect((record["KMS_PEER_UNRESOLVED"] as? String ?? "").contains("executable and unit unknown"), "\(record)")
    }
}
