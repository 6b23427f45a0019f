import Glibc

/// The caller of a request, as the kernel vouches for it (SO_PEERCRED and friends).
public struct Principal: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var userName: String
    public var groups: [UInt32]
    /// Executable path, when it could be resolved without a pid-reuse race.
    public var executable: String?
    /// The systemd unit the process runs in, when it runs in one.
    public var systemdUnit: String?
    /// False when the supplementary groups could not be read from the kernel: the caller then
    /// has no rights through supplementary groups (fail safe).
    public var groupsKnown = true
    /// False when kmsd could not establish the executable or the unit safely (nil then means
    /// unknown, not "none"): such an attribute matches no Allow and every Deny naming its kind.
    public var executableKnown = true
    public var unitKnown = true
    /// What kmsd could not establish safely about the caller, and why (audited); nil when
    /// everything was resolved.
    public var unresolved: String? = nil

    public init(uid: UInt32, gid: UInt32, pid: Int32, userName: String, groups: [UInt32] = [],
                executable: String? = nil, systemdUnit: String? = nil) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.userName = userName
        self.groups = groups
        self.executable = executable
        self.systemdUnit = systemdUnit
    }
}

extension Principal {
    /// The user name of `uid` from the passwd database, or `uid:N` when it has none.
    public static func userName(of uid: UInt32) -> String {
        var pwd = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buf = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &pwd, &buf, buf.count, &result) == 0, result != nil else { return "uid:\(uid)" }
        return String(cString: pwd.pw_name)
    }
}

/// Who administers kmsd (may create keys and use every key). Default: root only.
public struct Administrators: Sendable, Equatable {
    public var uids: Set<UInt32>
    public var gids: Set<UInt32>

    public init(uids: Set<UInt32> = [0], gids: Set<UInt32> = []) {
        self.uids = uids
        self.gids = gids
    }

    public func contains(_ p: Principal) -> Bool {
        uids.contains(p.uid) || gids.contains(p.gid) || !gids.isDisjoint(with: p.groups)
    }
}
