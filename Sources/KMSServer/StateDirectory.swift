import Glibc

/// The state directory and the files kmsd trusts: created with explicit modes (whatever the
/// umask), refused when someone else could have planted or changed them, and locked so that
/// one daemon at a time uses them.
enum StateDirectory {
    /// Creates `path` (mode 0700) and any missing parent (mode 0755), independent of the umask.
    /// The mode is set through a descriptor opened without following links, so a directory
    /// swapped for a symlink between mkdir and chmod cannot redirect the chmod.
    static func make(_ path: String, finalMode: mode_t = 0o700) throws {
        var components: [String] = []
        var prefix = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            prefix += "/" + part
            components.append(prefix)
        }
        for (i, dir) in components.enumerated() {
            let mode: mode_t = i == components.count - 1 ? finalMode : 0o755
            var st = stat()
            if lstat(dir, &st) == 0 { continue }
            guard mkdir(dir, mode) == 0 else {
                throw ConfigurationError("cannot create directory \(dir): \(String(cString: strerror(errno)))")
            }
            // mkdir applies the umask; set the mode we mean, on what we just made.
            let fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { throw ConfigurationError("\(dir) changed while kmsd created it: \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            guard fchmod(fd, mode) == 0 else { throw ConfigurationError("cannot set the mode of \(dir)") }
        }
        var st = stat()
        guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw ConfigurationError("state directory \(path) is not a directory (a symbolic link is not accepted either); point --state-dir at a directory")
        }
    }

    /// Refuses to go on unless `path` belongs to kmsd's uid or root and nobody else can write
    /// it, nor any directory above it (others may write one only with the sticky bit, as /tmp
    /// has).
    static func checkTrusted(_ path: String, what: String, stickyWritableOK: Bool = false) throws {
        let me = geteuid()
        func check(_ p: String, isTarget: Bool) throws {
            var st = stat()
            guard stat(p, &st) == 0 else { throw ConfigurationError("cannot stat \(what) \(p): \(String(cString: strerror(errno)))") }
            let mode = st.st_mode & 0o7777
            guard st.st_uid == me || st.st_uid == 0 else {
                throw ConfigurationError("\(what) \(p) belongs to uid \(st.st_uid), not to kmsd's uid \(me) or root: someone else could have planted it. Fix: chown \(me) \(p) (after checking its contents), or use another path")
            }
            let writableByOthers = mode & 0o022 != 0
            let sticky = mode & 0o1000 != 0 && st.st_mode & S_IFMT == S_IFDIR
            if writableByOthers && ((isTarget && !stickyWritableOK) || !sticky) {
                throw ConfigurationError("\(what) \(p) is writable by group or others (mode \(String(mode, radix: 8))): anyone who can write it could plant or replace kmsd's files. Fix: chmod go-w \(p)")
            }
        }
        try check(path, isTarget: true)
        // Every directory above it too: whoever can write one of them can swap what is below.
        var ancestor = path
        while let slash = ancestor.lastIndex(of: "/"), ancestor != "/" {
            ancestor = slash == ancestor.startIndex ? "/" : String(ancestor[..<slash])
            if ancestor.isEmpty { break }
            try check(ancestor, isTarget: false)
        }
    }

    /// The state directory and every file in it (sockets aside: kmsd makes its own and checks
    /// them when it binds) must be trusted.
    static func checkContents(_ dir: String) throws {
        try checkTrusted(dir, what: "state directory")
        guard let d = opendir(dir) else { throw ConfigurationError("cannot read state directory \(dir)") }
        defer { closedir(d) }
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "." || name == ".." { continue }
            let path = dir + "/" + name
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFSOCK: continue
            case S_IFLNK:
                throw ConfigurationError("\(path) is a symbolic link; kmsd does not follow links in its state directory. Remove it")
            default:
                let mode = st.st_mode & 0o7777
                guard st.st_uid == geteuid() || st.st_uid == 0 else {
                    throw ConfigurationError("\(path) belongs to uid \(st.st_uid), not to kmsd's uid \(geteuid()) or root: someone else could have planted it. Fix: check it, then chown \(geteuid()) \(path)")
                }
                guard mode & 0o022 == 0 else {
                    throw ConfigurationError("\(path) is writable by group or others (mode \(String(mode, radix: 8))). Fix: chmod go-w \(path)")
                }
            }
        }
    }

    /// Takes an exclusive lock on `dir/kmsd.lock` and writes this pid into it; the lock lasts
    /// as long as the returned descriptor stays open (the life of the process).
    ///
    /// Throws, naming the pid that holds it, when another kmsd uses the directory.
    static func lock(_ dir: String) throws -> Int32 {
        let path = dir + "/kmsd.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw ConfigurationError("cannot open lock file \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            var buf = [UInt8](repeating: 0, count: 32)
            let n = pread(fd, &buf, buf.count, 0)
            close(fd)
            let digits = n > 0 ? buf[..<n].filter { (48...57).contains($0) } : []
            let holder = digits.isEmpty ? "unknown" : String(decoding: digits, as: UTF8.self)
            throw ConfigurationError("another kmsd (pid \(holder)) is using state directory \(dir); stop it first, or give this one its own --state-dir")
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pwrite(fd, pid, pid.count, 0)
        return fd
    }
}
