import CKMSLinux
import Foundation
import Glibc
import KMSCore
import NIOCore

/// Reads who is on the other end of a Unix socket, as the kernel vouches for it.
enum PeerCredentials {
    /// SO_PEERCRED for uid/gid/pid; SO_PEERPIDFD to make sure the executable and unit read from
    /// /proc belong to that very process (not a later one that reused the pid).
    static func read(_ channel: Channel) -> EventLoopFuture<Principal> {
        guard let provider = channel as? SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(ConfigurationError("channel has no socket options"))
        }
        let cred: EventLoopFuture<kms_ucred> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_PEERCRED))
        let pidfd: EventLoopFuture<Int32> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: 77))
            .recover { _ in -1 }
        return cred.and(pidfd).map { cred, pidfd in
            defer { if pidfd >= 0 { close(pidfd) } }
            var p = Principal(uid: cred.uid, gid: cred.gid, pid: cred.pid, userName: userName(cred.uid))
            guard cred.pid > 0 else { return p }
            let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(cred.pid)/exe")
            let status = readProcFile("/proc/\(cred.pid)/status")
            let cgroup = readProcFile("/proc/\(cred.pid)/cgroup")
            // Only trust what /proc said if the process we asked about is still the same one.
            guard pidfd >= 0, kms_pidfd_alive(pidfd) == 0 else { return p }
            p.executable = exe
            p.groups = status.map(groups(fromStatus:)) ?? []
            p.systemdUnit = cgroup.flatMap(unit(fromCgroup:))
            return p
        }
    }

    /// /proc files report size 0, so read them to EOF (String(contentsOfFile:) stops early).
    static func readProcFile(_ path: String) -> String? {
        guard let handle = Foundation.FileHandle(forReadingAtPath: path) else { return nil }
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
