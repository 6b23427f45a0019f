import CKMSSystemd
import CKMSLinux
import Foundation
import Glibc
import KMSCore
import KMSCrypto
import KMSProtocol
import NIOCore
import NIOPosix
import Synchronization

/// The running daemon: keystore open, root key loaded, socket listening.
///
/// `init` does everything that can fail before READY=1 (locked memory, root key, keystore);
/// `run` serves until SIGTERM/SIGINT, then stops accepting and reading, answers the requests
/// in flight (bounded by drainTimeoutSeconds) and returns.
public final class Server: @unchecked Sendable {
    /// The configuration in force: the one kmsd started with, with what SIGHUP applied since.
    public var configuration: ServerConfiguration { live.withLock { $0 } }
    private let live: Mutex<ServerConfiguration>
    /// Reads the configuration again (the file, then the command line's flags over it); nil
    /// when kmsd was started without a configuration file.
    private let readConfiguration: (() throws -> ServerConfiguration)?
    let group: MultiThreadedEventLoopGroup
    let pool: FairWorkerPool
    let dispatcher: Dispatcher
    let limits: ConnectionLimits
    let tracker = RequestTracker()
    public let rootKeySource: RootKey.Source
    /// One TurnScheduler per event loop, keyed by the loop's identity.
    let turns: [ObjectIdentifier: TurnScheduler]
    /// Holds the state directory's lock (flock) for the life of the process.
    let lockFD: Int32

    /// Opens the keystore and loads the root key. Throws a message fit for an administrator.
    public init(configuration c: ServerConfiguration, reread: (() throws -> ServerConfiguration)? = nil) throws {
        try c.validate()
        live = Mutex(c)
        readConfiguration = reread
        try ProcessHardening.apply()
        SecureArena.shared.allowUnlockedMemory(c.development && c.allowUnlockedMemory)
        try SecureArena.shared.warmUp()
        if SecureArena.shared.unlockedBytes > 0 {
            StandardError.write("kmsd: WARNING: key material is in UNLOCKED memory (--allow-unlocked-memory); it may be swapped to disk. Development only.\n")
        }
        // OpenSSL's own locked heap, for the private parts of import wrapping keys.
        if !SecureHeap.initialize(bytes: 1 << 20) {
            guard c.development && c.allowUnlockedMemory else {
                throw ConfigurationError("cannot lock 1 MiB for OpenSSL's secure heap (the private keys that unwrap imported key material): raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=64M; shell: ulimit -l 65536)")
            }
            StandardError.write("kmsd: WARNING: OpenSSL's secure heap could not be locked; import wrapping keys live in ordinary memory. Development only.\n")
        }
        try StateDirectory.make(c.stateDirectory)
        try StateDirectory.checkContents(c.stateDirectory)
        if let file = c.rootKeyFile { try StateDirectory.checkTrusted(file, what: "root key file") }
        lockFD = try StateDirectory.lock(c.stateDirectory)
        try Self.raiseFileLimit(for: c.maxConnections)
        let credentials = ProcessInfo.processInfo.environment["CREDENTIALS_DIRECTORY"]
        let (root, source) = try RootKey.load(credentialsDirectory: credentials, file: c.rootKeyFile,
                                              devPath: c.development ? c.devRootKeyPath : nil)
        rootKeySource = source
        if case .generated(let path) = source {
            StandardError.write("""
            kmsd: ************************************************************************
            kmsd: WARNING: DEVELOPMENT MODE generated a NEW root key at \(path)
            kmsd: Every key in this state directory is wrapped under it. It is a plain file:
            kmsd: fine for development, NEVER for production (use LoadCredentialEncrypted=root-key).
            kmsd: ************************************************************************

            """)
        }
        let storage = try SQLiteKeyStorage(path: c.keystorePath)
        let repository = try KeyRepository(storage: storage, root: root, cacheCapacity: c.keyCacheCapacity)
        var clock: @Sendable () -> Date = { Date() }
        if c.development, let file = c.developmentClockFile { clock = Self.offsetClock(file) }
        let service = KeyService(repository: repository, administrators: c.administrators, clock: clock,
                                 daySeconds: c.development ? (c.developmentDaySeconds ?? 86_400) : 86_400, region: c.region)
        let audit = AuditLog(failClosed: c.auditFailClosed, timeoutMilliseconds: c.auditTimeoutMilliseconds,
                             socketPath: c.developmentAuditSocket ?? AuditLog.journalSocket, chainKey: try repository.auditChainKey(),
                             disabled: c.development && c.developmentAuditOff)
        if c.developmentAuditOff {
            StandardError.write("kmsd: WARNING: NO AUDIT RECORDS are written (developmentAuditOff; benchmarks only)\n")
        }
        if let sink = c.developmentAuditSocket {
            StandardError.write("kmsd: WARNING: audit records go to \(sink), not journald (developmentAuditSocket; development only)\n")
        }
        if !c.auditFailClosed {
            StandardError.write("""
            kmsd: ************************************************************************
            kmsd: WARNING: audit FAILS OPEN (auditFailClosed false): when journald does not take a
            kmsd: record, the request is still served and nothing records it. Production: true.
            kmsd: ************************************************************************

            """)
        }
        let chain = Self.startAuditChain(audit, repository)
        checkpointed = Atomic(chain.sequence)
        if let dir = c.identityPolicyDirectory {
            service.setIdentityPolicies(try Self.loadIdentityPolicies(dir))
            StandardError.write("kmsd: \(service.identityPolicies.policies.count) identity policies from \(dir)\n")
        }
        let report = repository.integrityReport
        // Integrity failures kmsd finds by itself at start, each an IntegrityFailure alarm.
        var integrityProblems: [String] = []
        if let problem = report.problem {
            let message = "keystore rollback detected: \(problem); every row in \(report.suspectBuckets) of \(RowIndex.bucketCount) row-index buckets is refused (KeyUnavailableException). Restore the keystore from its latest backup"
            StandardError.write("kmsd: ERROR: \(message)\n")
            _ = audit.writeEvent(action: "KeystoreRollbackDetected", keyID: "", failure: .keyUnavailable, message: message)
            integrityProblems.append(message)
        } else if report.built {
            StandardError.write("kmsd: built the keystore's row index (\(report.entries) rows) for rollback detection\n")
        }
        if chain.checkpointFailed {
            integrityProblems.append("the audit chain's checkpoint in the keystore failed its integrity check (KMS_PREVIOUS_STOP=unknown): this run's chain does not link to the previous run")
        }
        if !c.alarms.integrityFailure { integrityProblems = [] }
        for problem in integrityProblems {
            audit.writeEvent(action: "Alarm", keyID: "", failure: .keyUnavailable, message: "ALARM IntegrityFailure: \(problem)", alarm: "IntegrityFailure")
        }
        dispatcher = Dispatcher(service: service, audit: audit,
                                settings: ServerSettings(maxFrameBytes: c.maxFrameBytes, maxInFlight: c.maxInFlightPerConnection),
                                rateLimiter: RequestRateLimiter(rate: c.maxRequestsPerSecondPerUID, burst: c.requestBurstPerUID),
                                alarms: c.alarms,
                                backups: try BackupStore(directory: c.stateDirectory + "/backups", storage: storage, root: root),
                                identity: try repository.replicationIdentity(region: c.region),
                                decryptCallersFile: c.stateDirectory + "/decrypt-callers")
        // Alarms raised at start count in kmsd_alarms_total and Status too.
        for _ in integrityProblems { dispatcher.alarms.noteFired("IntegrityFailure") }
        limits = ConnectionLimits(maxTotal: c.maxConnections, maxPerUID: c.maxConnectionsPerUID,
                                  reservedForAdministrators: c.effectiveAdminReservedConnections)
        group = MultiThreadedEventLoopGroup(numberOfThreads: c.effectiveEventLoops)
        var turns: [ObjectIdentifier: TurnScheduler] = [:]
        for loop in group.makeIterator() { turns[ObjectIdentifier(loop)] = TurnScheduler(loop: loop) }
        self.turns = turns
        pool = FairWorkerPool(threads: c.workerThreads)
    }

    /// Connections the kernel queues for the main socket before kmsd accepts them (NIO listens
    /// again on the socket it is given, with its own default of 128 unless told this).
    static let listenBacklog: Int32 = 512

    /// Binds (or adopts the socket-activated fd), reports READY=1, and serves until a
    /// termination signal. Returns after the drain.
    public func run() throws {
        let c = configuration
        // Deletions that came due while kmsd was down happen before it serves anyone.
        housekeeping()
        let passed = Self.activatedSockets()
        let activated = passed.main != nil
        // kmsd binds its socket itself (or adopts systemd's), so the listening descriptor is
        // known to the handler that refuses connections when descriptors run out.
        let listenFD = try passed.main ?? bindSafely(path: c.effectiveSocketPath, mode: c.socketMode, group: c.socketGroup,
                                                     { try Self.listenRaw($0, backlog: Self.listenBacklog) }, close: { _ = Glibc.close($0) })
        let (pool, dispatcher, auditLoop) = (self.pool, self.dispatcher, group.next())
        let refuse: @Sendable (kms_ucred) -> Void = { cred in
            // Audited from the kernel's credentials alone: resolving a user name or reading
            // /proc would take a descriptor, the one the reserve needs back.
            var known = Principal(uid: cred.uid, gid: cred.gid, pid: cred.pid, userName: "uid:\(cred.uid)")
            known.groupsKnown = false
            known.executableKnown = false
            known.unitKnown = false
            known.unresolved = "groups, executable and unit not resolved: the connection was refused for want of a file descriptor, which resolving them needs"
            let principal = known
            _ = pool.run(uid: cred.uid, eventLoop: auditLoop) {
                dispatcher.auditRejected(action: "Connect", principal: principal,
                                         error: KMSError(.limitExceeded, DescriptorExhaustionHandler.message))
            }
        }
        let bootstrap = ServerBootstrap(group: group)
            // NIO listens again on the socket it is given: with this backlog, not its default 128.
            .serverChannelOption(.backlog, value: Self.listenBacklog)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Out of descriptors: refuse what waits (the reserve), else pause accepting
                    // for a second rather than spin (this bind path adds no backoff of its own).
                    try channel.pipeline.syncOperations.addHandler(DescriptorExhaustionHandler(listenFD: listenFD, onRefused: refuse))
                    try channel.pipeline.syncOperations.addHandler(AcceptBackoffHandler(shouldForwardIOErrorCaught: false))
                }
            }
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [self] channel in self.initialize(channel) }
        let listening = try bootstrap.withBoundSocket(listenFD).wait()
        // The credential provider: the passed socket named "credentials", else its own.
        var provider: CredentialProvider? = nil
        var credentialSocket = passed.credentials.map { _ in "socket-activated fd" }
        var credentialFD = passed.credentials
        if credentialFD == nil, let path = c.effectiveCredentialSocketPath {
            credentialFD = try bindSafely(path: path, mode: 0o666, group: nil, { try Self.listenRaw($0) }, close: { _ = Glibc.close($0) })
            credentialSocket = path
        }
        if let fd = credentialFD {
            let p = CredentialProvider(fd: fd, dispatcher: dispatcher, directory: { [self] in configuration.effectiveCredentialDirectory })
            p.start()
            provider = p
        }
        // Signals are taken before READY=1: a SIGTERM or SIGHUP that systemd sends the moment
        // kmsd is ready is handled (drain, reload), never the default action (death, unaudited).
        let terminate = DispatchSemaphore(value: 0)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { terminate.signal() }
            s.resume()
            sources.append(s)
        }
        signal(SIGHUP, SIG_IGN)
        signal(SIGPIPE, SIG_IGN)
        // One reload at a time, in the order the signals came.
        let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "kmsd.reload"))
        hup.setEventHandler { [self] in self.reload() }
        hup.resume()
        sources.append(hup)
        let status = "serving on \(activated ? "socket-activated fd" : c.effectiveSocketPath)\(credentialSocket.map { ", credentials on \($0)" } ?? ""); root key from \(rootKeySource) (fingerprint \(dispatcher.service.repository.rootKeyFingerprint))"
        _ = sd_notify(0, "READY=1\nSTATUS=\(status)")
        StandardError.write("kmsd: ready: \(status)\n")
        startWatchdog()
        let loop = group.next()
        loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [self] _ in
            dispatcher.flushThrottleSummaries()
            // Scheduled work, off the event loop (it writes storage).
            _ = pool.run(uid: geteuid(), eventLoop: loop) { self.housekeeping() }
        }

        terminate.wait()
        _ = sd_notify(0, "STOPPING=1\nSTATUS=draining in-flight requests")
        StandardError.write("kmsd: stopping: no new connections or requests; answering those in flight\n")
        tracker.draining.store(true, ordering: .relaxed)
        try? listening.close().wait()
        provider?.stop()  // no new credential loads either
        let drain = configuration.drainTimeoutSeconds
        let deadline = Date().addingTimeInterval(Double(drain))
        while tracker.pending.load(ordering: .relaxed) > 0, Date() < deadline { usleep(10_000) }
        let unanswered = tracker.pending.load(ordering: .relaxed)
        if unanswered > 0 {
            StandardError.write("kmsd: drain deadline (\(drain) s) passed with \(unanswered) requests unanswered\n")
        }
        if !activated { unlink(c.effectiveSocketPath) }
        if passed.credentials == nil, let path = c.effectiveCredentialSocketPath { unlink(path) }
        pool.shutdown()
        try? group.syncShutdownGracefully()
        // The run's last record, then the checkpoint the next start links to, marked clean.
        let audit = dispatcher.audit, repository = dispatcher.service.repository
        audit.writeEvent(action: "KmsdStopped", keyID: "", message: "kmsd stopped (run \(audit.runID), \(audit.lastSequence + 1) audit records)")
        do { try repository.setAuditCheckpoint(audit.checkpoint(clean: true)) } catch {
            StandardError.write("kmsd: WARNING: the audit chain's final checkpoint could not be saved (\(error)); the next start will report an unclean stop\n")
        }
        StandardError.write("kmsd: stopped\n")
    }

    private func initialize(_ channel: Channel) -> EventLoopFuture<Void> {
        let c = configuration
        let pool = self.pool
        // The kernel's answer is read on the event loop; resolving it (/proc, passwd) may block,
        // so it runs on the worker pool.
        return PeerCredentials.read(channel).flatMap { raw in
            pool.run(uid: raw.cred.uid, eventLoop: channel.eventLoop) { PeerCredentials.resolve(raw) }
        }.flatMap { principal in
            if let refusal = self.limits.acquire(uid: principal.uid, isAdministrator: self.dispatcher.service.isAdministrator(principal)) {
                let failure = KMSError(.limitExceeded, refusal)
                let response = KMSResponse.failure(id: KMSProtocolConstants.connectionErrorRequestID, failure)
                let dispatcher = self.dispatcher
                return pool.run(uid: principal.uid, eventLoop: channel.eventLoop) {
                    dispatcher.auditRejected(action: "Connect", principal: principal, error: failure)
                }.flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(RefusingHandler(response: response))
                }
            }
            self.dispatcher.metrics.connections.add(1, ordering: .relaxed)
            let release: @Sendable () -> Void = {
                self.limits.release(uid: principal.uid)
                self.dispatcher.metrics.connections.subtract(1, ordering: .relaxed)
            }
            do {
                let dispatcher = self.dispatcher
                try channel.pipeline.syncOperations.addHandlers([
                    IdleStateHandler(readTimeout: .seconds(Int64(c.idleTimeoutSeconds))),
                    FrameReader(maxFrameBytes: c.maxFrameBytes, frameTimeout: .seconds(Int64(c.frameTimeoutSeconds))) { context in
                        // A frame started and not finished in time: audit, then close.
                        let failure = KMSError(.validation, "a frame was not completed within \(c.frameTimeoutSeconds) s (frameTimeoutSeconds); the connection is closed")
                        let channel = context.channel
                        pool.run(uid: principal.uid, eventLoop: context.eventLoop) {
                            dispatcher.auditRejected(action: "Unknown", principal: principal, error: failure)
                        }.whenComplete { _ in channel.close(promise: nil) }
                    },
                    ConnectionHandler(principal: principal, dispatcher: self.dispatcher, pool: self.pool,
                                      maxInFlight: c.maxInFlightPerConnection, tracker: self.tracker,
                                      turns: self.turns[ObjectIdentifier(channel.eventLoop)] ?? TurnScheduler(loop: channel.eventLoop), onClose: release),
                ])
            } catch {
                release()
                return channel.close()
            }
            return channel.eventLoop.makeSucceededVoidFuture()
        }.flatMapError { _ in channel.close() }
    }

    /// The sockets systemd passed (sd_listen_fds_with_names): the one named "credentials" (or
    /// from kmsd-credentials.socket) serves the credential provider, the first other one kmsd.
    static func activatedSockets() -> (main: Int32?, credentials: Int32?) {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = nil
        let n = sd_listen_fds_with_names(1, &names)
        defer { free(names) }
        guard n > 0 else { return (nil, nil) }
        var main: Int32? = nil, credentials: Int32? = nil
        for i in 0..<Int(n) {
            let name = names?[i].map { String(cString: $0) } ?? ""
            free(names?[i])
            let fd = SD_LISTEN_FDS_START + Int32(i)
            if name == "credentials" || name == "kmsd-credentials.socket" { credentials = fd } else if main == nil { main = fd }
        }
        return (main, credentials)
    }

    /// A listening stream socket bound at `path` (for the credential provider's accept loop).
    static func listenRaw(_ path: String, backlog: Int32 = 64) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ConfigurationError("cannot create a socket: \(String(cString: strerror(errno)))") }
        guard let bound = withUnixAddress(path, { Glibc.bind(fd, $0, $1) }) else {
            Glibc.close(fd)
            throw ConfigurationError("socket path too long: \(path)")
        }
        guard bound == 0, listen(fd, backlog) == 0 else {
            let e = String(cString: strerror(errno))
            Glibc.close(fd)
            throw ConfigurationError("cannot listen on \(path): \(e)")
        }
        return fd
    }

    /// Binds a socket at `path` without ever following a link there: an existing socket no
    /// one serves is replaced, anything else (a symlink, a file) is refused. The socket is bound
    /// in a fresh private directory (by `bindAt`), given its mode and group there, and renamed
    /// into place, so a writable socket directory cannot redirect a chmod or chown to another file.
    private func bindSafely<T>(path: String, mode: UInt32, group: String?, _ bindAt: (String) throws -> T, close: (T) -> Void) throws -> T {
        var st = stat()
        if lstat(path, &st) == 0 {
            switch st.st_mode & S_IFMT {
            case S_IFLNK:
                throw ConfigurationError("\(path) is a symbolic link; kmsd does not follow links at its socket path. Remove it or choose another --socket")
            case S_IFSOCK:
                if Self.someoneListens(at: path) {
                    throw ConfigurationError("another process is already serving \(path); stop it or choose another --socket")
                }
            default:
                throw ConfigurationError("\(path) exists and is not a socket; kmsd will not replace it. Remove it or choose another --socket")
            }
        }
        let dir = (path as NSString).deletingLastPathComponent
        if lstat(dir, &st) != 0 { try StateDirectory.make(dir, finalMode: 0o755) }
        // Nobody else may write the socket's directory (unless it is sticky, like /tmp): whoever
        // could would be able to swap the private directory below for one of their own.
        try StateDirectory.checkTrusted(dir, what: "socket directory", stickyWritableOK: true)
        var template = Array((dir + "/.kmsd-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw ConfigurationError("cannot create a private directory in \(dir) to bind the socket: \(String(cString: strerror(errno)))")
        }
        let privateDir = String(cString: made)
        let staging = privateDir + "/s"
        defer { unlink(staging); rmdir(privateDir) }
        let old = umask(0o177)
        defer { umask(old) }
        let ch = try bindAt(staging)
        do {
            if let group {
                guard let gr = getgrnam(group) else { throw ConfigurationError("socket group '\(group)' does not exist") }
                guard chown(staging, uid_t.max, gr.pointee.gr_gid) == 0 else { throw ConfigurationError("cannot chown \(path) to group \(group)") }
            }
            guard chmod(staging, mode_t(mode)) == 0 else { throw ConfigurationError("cannot chmod \(path)") }
            guard rename(staging, path) == 0 else {
                throw ConfigurationError("cannot move the socket to \(path): \(String(cString: strerror(errno)))")
            }
        } catch {
            close(ch)
            throw error
        }
        return ch
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit, and refuses a maxConnections the
    /// process could not serve (each connection is a descriptor; kmsd needs some of its own).
    static func raiseFileLimit(for maxConnections: Int) throws {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        let needed = rlim_t(maxConnections + 64)
        guard limit.rlim_cur == rlim_t.max || limit.rlim_cur >= needed else {
            throw ConfigurationError("maxConnections \(maxConnections) needs about \(needed) file descriptors, but RLIMIT_NOFILE allows \(limit.rlim_cur); raise LimitNOFILE= in kmsd.service (or ulimit -n) or lower maxConnections")
        }
    }

    static func someoneListens(at path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return withUnixAddress(path) { connect(fd, $0, $1) == 0 } ?? false
    }

    /// Development only: the time plus the number of seconds in `file` (0 when unreadable).
    static func offsetClock(_ file: String) -> @Sendable () -> Date {
        {
            let text = (try? String(contentsOfFile: file, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            return Date().addingTimeInterval(text.flatMap(Double.init) ?? 0)
        }
    }

    /// True while a sweep runs: a slow one is not joined by the next second's.
    let sweeping = Atomic<Bool>(false)
    /// The audit sequence number of the last checkpoint saved.
    let checkpointed: Atomic<UInt64>

    /// Once a second: the audit chain's checkpoint (only when records were written since), then
    /// the keys whose automatic rotation is due are rotated, those whose deletion time has come
    /// deleted and expired imported material removed, each with an audit record.
    func housekeeping() {
        let service = dispatcher.service, audit = dispatcher.audit
        guard !sweeping.exchange(true, ordering: .acquiring) else { return }
        defer { sweeping.store(false, ordering: .releasing) }
        dispatcher.backups?.discardExpired()
        let sequence = audit.lastSequence
        if sequence != checkpointed.load(ordering: .relaxed), Self.saveAuditCheckpoint(audit, service.repository) {
            checkpointed.store(sequence, ordering: .relaxed)
        }
        func run<T>(_ what: String, _ sweep: () throws -> KeyService.Sweep<T>, _ done: (T) -> Void) {
            do {
                let result = try sweep()
                result.done.forEach(done)
                for f in result.failures { StandardError.write("kmsd: ERROR: \(what) of key \(f.key) failed: \(f.error); retrying in a second\n") }
            } catch {
                StandardError.write("kmsd: ERROR: \(what) failed: \(error); retrying in a second\n")
            }
        }
        run("scheduled rotation", service.rotateDueKeys) { k in
            audit.writeEvent(action: "KeyRotated", keyID: k.keyID.description, version: k.currentVersion,
                             message: "key \(k.keyID) was rotated automatically to version \(k.currentVersion)")
            StandardError.write("kmsd: key \(k.keyID) rotated to version \(k.currentVersion)\n")
        }
        run("scheduled deletion", service.deleteDueKeys) { id in
            audit.writeEvent(action: "KeyDeleted", keyID: id.description, message: "key \(id) was deleted: its pending-deletion window ended")
            StandardError.write("kmsd: key \(id) deleted (its pending-deletion window ended)\n")
        }
        run("expiry of imported material", service.expireDueMaterial) { id in
            audit.writeEvent(action: "KeyMaterialExpired", keyID: id.description,
                             message: "the imported material of key \(id) expired (its ValidTo passed) and was deleted; the key awaits the same material again")
            StandardError.write("kmsd: imported material of key \(id) expired and was deleted\n")
        }
    }

    /// The run's first record links it to the previous run: the chain continues from the last
    /// checkpoint, and KmsdStarted says where that was and whether the previous run stopped
    /// cleanly (an unclean stop: its records after the checkpoint cannot be proven complete).
    /// Returns the sequence number the start's checkpoint covers (0: not saved), and whether
    /// the stored checkpoint failed its check (KMS_PREVIOUS_STOP=unknown).
    static func startAuditChain(_ audit: AuditLog, _ repository: KeyRepository) -> (sequence: UInt64, checkpointFailed: Bool) {
        let stored = repository.auditCheckpoint()
        let previous = stored.flatMap(audit.parseCheckpoint)
        audit.startChain(after: previous?.chain ?? [UInt8](repeating: 0, count: 32))
        let stop = previous.map { $0.clean ? "clean" : "unclean" } ?? (stored == nil ? "none" : "unknown")
        var fields = ["KMS_PREVIOUS_STOP=\(stop)", "KMS_ROOT_KEY=\(repository.rootKeyFingerprint)"]
        if let p = previous {
            fields += ["KMS_PREVIOUS_RUN_ID=\(p.runID)", "KMS_PREVIOUS_SEQ=\(p.sequence)", "KMS_PREVIOUS_CHAIN=\(Hex.encode(p.chain))"]
        }
        let note = switch stop {
        case "clean": "the previous run stopped cleanly"
        case "unclean": "the previous run stopped uncleanly (killed or crashed): its audit records after seq \(previous!.sequence) cannot be proven complete"
        case "none": "first start of this keystore"
        default: "the previous run's checkpoint failed its integrity check"
        }
        audit.writeEvent(action: "KmsdStarted", keyID: "", failure: stop == "unknown" ? .keyUnavailable : nil,
                         message: "kmsd started (run \(audit.runID), root key \(repository.rootKeyFingerprint)); \(note)", extraFields: fields)
        let sequence = audit.lastSequence
        return (saveAuditCheckpoint(audit, repository) ? sequence : 0, stop == "unknown")
    }

    @discardableResult
    static func saveAuditCheckpoint(_ audit: AuditLog, _ repository: KeyRepository) -> Bool {
        do { try repository.setAuditCheckpoint(audit.checkpoint(clean: false)) } catch {
            StandardError.write("kmsd: WARNING: the audit chain's checkpoint could not be saved: \(error)\n")
            return false
        }
        return true
    }

    /// The identity policies in `dir` (a trusted directory); the message names what is wrong.
    static func loadIdentityPolicies(_ dir: String) throws -> IdentityPolicySet {
        try StateDirectory.checkTrusted(dir, what: "identity-policy directory")
        do throws(KMSError) { return try IdentityPolicySet.load(directory: dir) } catch {
            throw ConfigurationError("identity policies: \(error.message)")
        }
    }

    /// SIGHUP: the configuration file is read again (flags still override it) and what can
    /// change in place is applied: administrators, rate limits, alarms, timeouts for new
    /// connections, and the identity policies (read again from their directory). A file or a
    /// policy set that does not load changes nothing: the error is logged and audited and the
    /// running configuration stays. Settings that need a restart are named.
    func reload() {
        let old = configuration
        var next = old, changed: [String] = [], restart: [String] = []
        if let readConfiguration {
            do {
                let fresh = try readConfiguration()
                try fresh.validate()
                (next, changed, restart) = old.reloaded(from: fresh)
            } catch {
                StandardError.write("kmsd: ERROR: SIGHUP: configuration not reloaded, the running one stays: \(error)\n")
                dispatcher.audit.writeEvent(action: "ConfigurationReloadFailed", keyID: "", failure: .validation,
                                            message: "configuration not reloaded (the running one stays): \(error)")
                return
            }
        }
        let service = dispatcher.service, audit = dispatcher.audit
        var policies: IdentityPolicySet? = nil
        if let dir = next.identityPolicyDirectory {
            do {
                policies = try Self.loadIdentityPolicies(dir)
            } catch {
                let message = "\(error)"
                StandardError.write("kmsd: ERROR: SIGHUP: identity policies not reloaded, the previous ones stay: \(message)\n")
                audit.writeEvent(action: "IdentityPoliciesReloadFailed", keyID: "", failure: (error as? KMSError)?.code ?? .validation,
                                 message: "identity policies not reloaded (the previous ones stay): \(message)")
                if readConfiguration != nil {
                    audit.writeEvent(action: "ConfigurationReloadFailed", keyID: "", failure: .validation,
                                     message: "configuration not reloaded (the running one stays): identity policies: \(message)")
                }
                return
            }
        }
        service.setAdministrators(next.administrators)
        service.setIdentityPolicies(policies ?? IdentityPolicySet())
        // Only a changed rate or burst resets the buckets: a reload must not hand every uid
        // (a throttled flooder too) a full bucket again.
        let previous = live.withLock { $0 }
        if previous.maxRequestsPerSecondPerUID != next.maxRequestsPerSecondPerUID || previous.requestBurstPerUID != next.requestBurstPerUID {
            dispatcher.rateLimiter.set(rate: next.maxRequestsPerSecondPerUID, burst: next.requestBurstPerUID)
        }
        dispatcher.alarms.setRules(next.alarms)
        live.withLock { $0 = next }
        if let dir = next.identityPolicyDirectory, let policies {
            StandardError.write("kmsd: SIGHUP: \(policies.policies.count) identity policies from \(dir)\n")
            audit.writeEvent(action: "IdentityPoliciesReloaded", keyID: "", message: "identity policies reloaded from \(dir): \(policies.policies.map(\.name).joined(separator: ", "))")
        }
        guard readConfiguration != nil else {
            StandardError.write("kmsd: SIGHUP: no configuration file (--config); only the identity policies were read again\n")
            return
        }
        let what = changed.isEmpty ? "nothing changed" : "applied: " + changed.joined(separator: ", ")
        let later = restart.isEmpty ? "" : "; need a restart (running values kept): " + restart.joined(separator: ", ")
        StandardError.write("kmsd: SIGHUP: configuration reloaded: \(what)\(later)\n")
        audit.writeEvent(action: "ConfigurationReloaded", keyID: "", message: "configuration reloaded: \(what)\(later)",
                         extraFields: ["KMS_SETTINGS_CHANGED=\(changed.joined(separator: ","))", "KMS_SETTINGS_NEED_RESTART=\(restart.joined(separator: ","))"])
    }

    private func startWatchdog() {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return }
        let interval = TimeAmount.microseconds(Int64(usec / 2))
        group.next().scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            _ = sd_notify(0, "WATCHDOG=1")
        }
    }
}
