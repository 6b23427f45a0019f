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
        /// The supplementary groups the peer had when it connected; nil when the kernel would
        /// not say (the caller then gets no rights through supplementary groups).
        let groups: [UInt32]?
        /// A pidfd for the peer, -1 when none could be had.
        let pidfd: Int32
        /// True when the pidfd came from SO_PEERPIDFD (it refers to the process that
        /// connected); false when it came from pidfd_open(pid) after the fact, which may name a
        /// newer process that reused the pid.
        let pidfdFromSocket: Bool
        /// CLOCK_BOOTTIME in clock ticks when the connection was accepted: a process that
        /// started later cannot be the one that connected.
        let acceptedAtTicks: UInt64
    }

    /// Reads the socket options on the event loop (cheap getsockopt calls, nothing blocks).
    static func read(_ channel: Channel) -> EventLoopFuture<Raw> {
        guard let provider = channel as? SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(ConfigurationError("channel has no socket options"))
        }
        let acceptedAt = boottimeTicks()
        let groupsOption = NIOBSDSocket.Option(rawValue: SO_PEERGROUPS)
        let cred: EventLoopFuture<kms_ucred> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_PEERCRED))
        // ERANGE from the small buffer means more than 256 groups: ask again with room for
        // NGROUPS_MAX. Any other failure leaves the groups unknown.
        let groups: EventLoopFuture<[UInt32]?> = provider.unsafeGetSocketOption(level: .socket, name: groupsOption)
            .map { (b: kms_peer_groups) -> [UInt32]? in Self.groups(from: b) }
            .flatMapError { _ in
                provider.unsafeGetSocketOption(level: .socket, name: groupsOption)
                    .map { (b: kms_peer_groups_max) -> [UInt32]? in Self.groups(from: b) }
            }
            .recover { _ in nil }
        // -1: this kernel has no SO_PEERPIDFD (before 6.5); -2: it has, and the peer is gone.
        let pidfd: EventLoopFuture<Int32> = provider.unsafeGetSocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: kms_so_peerpidfd()))
            .recover { error in (error as? IOError)?.errnoCode == ENOPROTOOPT ? -1 : -2 }
        return pidfd.flatMap { pidfd in
            cred.and(groups).map { cred, groups in
                // Only a kernel without SO_PEERPIDFD falls back to pidfd_open(pid); resolve()
                // then checks the process is not younger than the connection before trusting
                // anything /proc says about it. A peer the kernel reports gone stays unknown:
                // its pid may already belong to someone else.
                let fromSocket = pidfd >= 0
                let fd = fromSocket ? pidfd : (pidfd == -1 && cred.pid > 0 ? kms_pidfd_open(cred.pid) : -1)
                return Raw(cred: cred, groups: groups, pidfd: fd, pidfdFromSocket: fromSocket, acceptedAtTicks: acceptedAt)
            }.flatMapErrorThrowing { error in
                // SO_PEERCRED failed: close the pidfd we got, then give up on this peer.
                if pidfd >= 0 { close(pidfd) }
                throw error
            }
        }
    }

    /// Turns the kernel's answer into a Principal: user name, executable and systemd unit.
    /// May block (passwd lookups can go to NSS), so it runs on the worker pool. Closes the pidfd.
    ///
    /// Groups come only from SO_PEERGROUPS (the credentials of the connecting process, kept by
    /// the kernel with the socket); /proc is read only for the executable and unit, and only
    /// trusted when a pidfd proves the process read is the one that connected.
    static func resolve(_ raw: Raw) -> Principal {
        defer { if raw.pidfd >= 0 { close(raw.pidfd) } }
        let cred = raw.cred
        var p = Principal(uid: cred.uid, gid: cred.gid, pid: cred.pid, userName: Principal.userName(of: cred.uid))
        var unresolved: [String] = []
        if let groups = raw.groups {
            p.groups = groups
        } else {
            p.groupsKnown = false
            unresolved.append("supplementary groups unknown (SO_PEERGROUPS failed): no rights through them")
        }
        if cred.pid > 0 {
            let identity = processIdentity(raw)
            switch identity {
            case .success(let (exe, unit, cgroupRead)):
                p.executable = exe
                p.systemdUnit = unit
                if exe == nil { p.executableKnown = false; unresolved.append("executable unknown: /proc/\(cred.pid)/exe is not readable by kmsd") }
                if !cgroupRead { p.unitKnown = false; unresolved.append("unit unknown: /proc/\(cred.pid)/cgroup is not readable by kmsd") }
            case .failure(let why):
                p.executableKnown = false
                p.unitKnown = false
                unresolved.append("executable and unit unknown: \(why.description)")
            }
        }
        p.unresolved = unresolved.isEmpty ? nil : unresolved.joined(separator: "; ")
        return p
    }

    struct Unverified: Error, CustomStringConvertible { let description: String }

    /// The executable and systemd unit of the connecting process, read from /proc only when the
    /// pidfd proves /proc/PID still is that process.
    static func processIdentity(_ raw: Raw) -> Result<(String?, String?, Bool), Unverified> {
        let pid = raw.cred.pid
        guard raw.pidfd >= 0 else { return .failure(Unverified(description: "no pidfd for pid \(pid) (the process has exited)")) }
        guard kms_pidfd_alive(raw.pidfd) == 1 else { return .failure(Unverified(description: "pid \(pid) exited before it could be identified")) }
        if !raw.pidfdFromSocket {
            // pidfd_open(pid) may have found a newer process that reused the pid: it must have
            // started no later than the connection was accepted.
            // Strictly earlier: start times have clock-tick (10 ms) resolution; a tie is not proof.
            guard let started = startTicks(pid: pid), started < raw.acceptedAtTicks else {
                return .failure(Unverified(description: "pid \(pid) now belongs to a process started after the connection (pid reused)"))
            }
            // The start time bounds the process by the accept, not by the connect: one that took
            // the pid while the connection waited to be accepted would pass. It must at least run
            // as the user the kernel reported for the connection.
            guard effectiveUID(pid: pid) == raw.cred.uid else {
                return .failure(Unverified(description: "pid \(pid) now belongs to a process of another user than the connection's (pid reused)"))
            }
        }
        let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")
        let cgroup = readProcFile("/proc/\(pid)/cgroup")
        // A pid is not reused while its process lives (a zombie still holds it): what /proc said
        // belongs to the pidfd's process if that process is still there now.
        guard kms_pidfd_alive(raw.pidfd) == 1 else { return .failure(Unverified(description: "pid \(pid) exited while it was being identified")) }
        guard exe != nil || cgroup != nil else {
            // kmsd as an unprivileged user may not read another user's /proc/PID/exe, and
            // ProtectProc=invisible hides other users' processes altogether.
            return .failure(Unverified(description: "/proc/\(pid) is not readable by kmsd (uid \(geteuid()))"))
        }
        return .success((exe, cgroup.flatMap(unit(fromCgroup:)), cgroup != nil))
    }

    /// Now on CLOCK_BOOTTIME, in clock ticks (the unit of /proc/PID/stat's start time).
    static func boottimeTicks() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        let hz = UInt64(max(1, kms_clock_ticks_per_second()))
        return UInt64(ts.tv_sec) * hz + UInt64(ts.tv_nsec) * hz / 1_000_000_000
    }

    /// The effective uid on /proc/PID/status's `Uid:` line (real, effective, saved, fs).
    static func effectiveUID(pid: Int32) -> UInt32? {
        guard let status = readProcFile("/proc/\(pid)/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") }) else { return nil }
        let ids = line.dropFirst(4).split(whereSeparator: { $0 == "\t" || $0 == " " })
        return ids.count > 1 ? UInt32(ids[1]) : nil
    }

    /// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
    static func startTicks(pid: Int32) -> UInt64? {
        guard let stat = readProcFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may hold spaces and parentheses) start at field 3.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 19 ? UInt64(fields[19]) : nil
    }

    /// NIO drops the returned length and zero-fills the buffer; the kernel sorts the groups
    /// ascending, so trailing zeros are padding. (A lone supplementary group 0 reads as none;
    /// the primary gid still counts for administrator groups.)
    static func groups<Buffer>(from buffer: Buffer) -> [UInt32] {
        // Read the struct's bytes (the large buffer is too big for Swift to import as a tuple).
        trimmed(withUnsafeBytes(of: buffer) { Array($0.bindMemory(to: gid_t.self)) })
    }

    static func trimmed(_ gids: [UInt32]) -> [UInt32] {
        var gids = gids
        while let last = gids.last, last == 0 { gids.removeLast() }
        return gids
    }

    /// /proc files report size 0, so read them to EOF (String(contentsOfFile:) stops early).
    static func readProcFile(_ path: String) -> String? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
    }

    /// The deepest `.service` or `.scope` in the process's cgroup v2 path.
    static func unit(fromCgroup cgroup: String) -> String? {
        for line in cgroup.split(separator: "\n") where line.hasPrefix("0::") {
            return line.dropFirst(3).split(separator: "/").last(where: { $0.hasSuffix(".service") || $0.hasSuffix(".scope") }).map(String.init)
        }
        return nil
    }
}
