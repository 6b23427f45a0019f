import CKMSLinux
import Foundation
import Glibc
import KMSCore
import NIOCore

/// Reads who is on the other end of a Unix socket, as the kernel vouches for it.
enum PeerCredentials {
    /// What the kernel says about the peer at accept: SO_PEERCRED, SO_PEERGROUPS, a pidfd.
    struct Raw: Sendable {
        let cred: kms_ucred
        /// nil when SO_PEERGROUPS failed (more than 256 groups, or an old kernel).
        let groups: [UInt32]?
        /// SO_PEERPIDFD (Linux 6.5+), else pidfd_open(pid) right away; -1 when neither works.
        let pidfd: Int32
    }

    /// Reads the socket options on the event loop (cheap getsockopt calls, nothing blocks).
    static func read(_ channel: Channel) -> EventLoopFuture<Raw> {
        guard let provider = channel as? SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(ConfigurationError("channel has no socket options"))
        }
        let cred: EventLoopFuture<kms_ucred> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_PEERCRED))
        let groups: EventLoopFuture<kms_peer_groups?> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_PEERGROUPS))
            .map { Optional($0) }.recover { _ in nil }
        let pidfd: EventLoopFuture<Int32> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: kms_so_peerpidfd()))
            .recover { _ in -1 }
        return pidfd.flatMap { pidfd in
            cred.and(groups).map { cred, groups in
                let fd = pidfd >= 0 ? pidfd : (cred.pid > 0 ? kms_pidfd_open(cred.pid) : -1)
                return Raw(cred: cred, groups: groups.map(Self.groups(from:)), pidfd: fd)
            }.flatMapErrorThrowing { error in
                // SO_PEERCRED failed: close the pidfd we got, then give up on this peer.
                if pidfd >= 0 { close(pidfd) }
                throw error
            }
        }
    }

    /// Turns the kernel's answer into a Principal: user name, executable and systemd unit.
    /// May block (passwd lookups can go to NSS), so it runs on the worker pool. Closes the pidfd.
    static func resolve(_ raw: Raw) -> Principal {
        defer { if raw.pidfd >= 0 { close(raw.pidfd) } }
        let cred = raw.cred
        var p = Principal(uid: cred.uid, gid: cred.gid, pid: cred.pid, userName: userName(cred.uid))
        let status = cred.pid > 0 ? readProcFile("/proc/\(cred.pid)/status") : nil
        p.groups = raw.groups ?? status.map(groups(fromStatus:)) ?? []
        guard cred.pid > 0 else { return p }
        let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(cred.pid)/exe")
        let cgroup = readProcFile("/proc/\(cred.pid)/cgroup")
        // Only trust what /proc said if the process we asked about is still the same one.
        guard raw.pidfd >= 0, kms_pidfd_alive(raw.pidfd) == 1 else { return p }
        p.executable = exe
        p.systemdUnit = cgroup.flatMap(unit(fromCgroup:))
        return p
    }

    /// NIO drops the returned length and zero-fills the buffer; the kernel sorts the groups
    /// ascending, so trailing zeros are padding. (A lone supplementary group 0 reads as none;
    /// the primary gid still counts for administrator groups.)
    static func groups(from buffer: kms_peer_groups) -> [UInt32] {
        var gids = withUnsafeBytes(of: buffer.gids) { Array($0.bindMemory(to: gid_t.self)) }
        while let last = gids.last, last == 0 { gids.removeLast() }
        return gids
    }

    /// /proc files report size 0, so read them to EOF (String(contentsOfFile:) stops early).
    static func readProcFile(_ path: String) -> String? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
    }

    static func userName(_ uid: uid_t) -> String {
        var pwd = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buf = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &pwd, &buf, buf.count, &result) == 0, result != nil else { return "uid:\(uid)" }
        return String(cString: pwd.pw_name)
    }

    static func groups(fromStatus status: String) -> [UInt32] {
        for line in status.split(separator: "\n") where line.hasPrefix("Groups:") {
            return line.dropFirst(7).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { UInt32($0) }
        }
        return []
    }

    /// The deepest `.service` or `.scope` in the process's cgroup v2 path.
    static func unit(fromCgroup cgroup: String) -> String? {
        for line in cgroup.split(separator: "\n") where line.hasPrefix("0::") {
            return line.dropFirst(3).split(separator: "/").last(where: { $0.hasSuffix(".service") || $0.hasSuffix(".scope") }).map(String.init)
        }
        return nil
    }
}
