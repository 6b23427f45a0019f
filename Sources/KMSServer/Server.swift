import CKMSSystemd
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
    public let configuration: ServerConfiguration
    let group: MultiThreadedEventLoopGroup
    let pool: NIOThreadPool
    let dispatcher: Dispatcher
    let limits: ConnectionLimits
    let tracker = RequestTracker()
    public let rootKeySource: RootKey.Source

    /// Opens the keystore and loads the root key. Throws a message fit for an administrator.
    public init(configuration c: ServerConfiguration) throws {
        try c.validate()
        configuration = c
        try ProcessHardening.apply()
        SecureArena.shared.allowUnlockedMemory(c.development && c.allowUnlockedMemory)
        try SecureArena.shared.warmUp()
        if SecureArena.shared.unlockedBytes > 0 {
            StandardError.write("kmsd: WARNING: key material is in UNLOCKED memory (--allow-unlocked-memory); it may be swapped to disk. Development only.\n")
        }
        try Self.makeStateDirectory(c.stateDirectory)
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
        let service = KeyService(repository: repository, administrators: c.administrators)
        let audit = AuditLog(failClosed: c.auditFailClosed)
        dispatcher = Dispatcher(service: service, audit: audit,
                                settings: ServerSettings(maxFrameBytes: c.maxFrameBytes, maxInFlight: c.maxInFlightPerConnection))
        limits = ConnectionLimits(maxTotal: c.maxConnections, maxPerUID: c.maxConnectionsPerUID)
        group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        pool = NIOThreadPool(numberOfThreads: c.workerThreads)
        pool.start()
    }

    /// Binds (or adopts the socket-activated fd), reports READY=1, and serves until a
    /// termination signal. Returns after the drain.
    public func run() throws {
        let c = configuration
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 512)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [self] channel in self.initialize(channel) }
        let activated = sd_listen_fds(1) >= 1
        let listening: Channel
        if activated {
            listening = try bootstrap.withBoundSocket(SD_LISTEN_FDS_START).wait()
        } else {
            listening = try bind(bootstrap, path: c.effectiveSocketPath)
        }
        let status = "serving on \(activated ? "socket-activated fd" : c.effectiveSocketPath); root key from \(rootKeySource)"
        _ = sd_notify(0, "READY=1\nSTATUS=\(status)")
        StandardError.write("kmsd: ready: \(status)\n")
        startWatchdog()

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
        let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hup.setEventHandler { StandardError.write("kmsd: SIGHUP: configuration reload is not implemented yet; restart to apply changes\n") }
        hup.resume()
        sources.append(hup)

        terminate.wait()
        _ = sd_notify(0, "STOPPING=1\nSTATUS=draining in-flight requests")
        StandardError.write("kmsd: stopping: no new connections or requests; answering those in flight\n")
        tracker.draining.store(true, ordering: .relaxed)
        try? listening.close().wait()
        let deadline = Date().addingTimeInterval(Double(c.drainTimeoutSeconds))
        while tracker.pending.load(ordering: .relaxed) > 0, Date() < deadline { usleep(10_000) }
        let unanswered = tracker.pending.load(ordering: .relaxed)
        if unanswered > 0 {
            StandardError.write("kmsd: drain deadline (\(c.drainTimeoutSeconds) s) passed with \(unanswered) requests unanswered\n")
        }
        if !activated { unlink(c.effectiveSocketPath) }
        try? pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
        StandardError.write("kmsd: stopped\n")
    }

    private func initialize(_ channel: Channel) -> EventLoopFuture<Void> {
        let c = configuration
        let pool = self.pool
        // The kernel's answer is read on the event loop; resolving it (/proc, passwd) may block,
        // so it runs on the worker pool.
        return PeerCredentials.read(channel).flatMap { raw in
            pool.runIfActive(eventLoop: channel.eventLoop) { PeerCredentials.resolve(raw) }
        }.flatMap { principal in
            if let refusal = self.limits.acquire(uid: principal.uid) {
                let failure = KMSError(.limitExceeded, refusal)
                let response = KMSResponse.failure(id: KMSProtocolConstants.connectionErrorRequestID, failure)
                let dispatcher = self.dispatcher
                return pool.runIfActive(eventLoop: channel.eventLoop) {
                    dispatcher.auditRejected(action: "Connect", principal: principal, error: failure)
                }.flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(RefusingHandler(response: response))
                }
            }
            let release: @Sendable () -> Void = { self.limits.release(uid: principal.uid) }
            do {
                try channel.pipeline.syncOperations.addHandlers([
                    IdleStateHandler(readTimeout: .seconds(Int64(c.idleTimeoutSeconds))),
                    ByteToMessageHandler(FrameDecoder(maxFrameBytes: c.maxFrameBytes)),
                    MessageToByteHandler(FrameEncoder()),
                    ConnectionHandler(principal: principal, dispatcher: self.dispatcher, pool: self.pool,
                                      maxInFlight: c.maxInFlightPerConnection, tracker: self.tracker, onClose: release),
                ])
            } catch {
                release()
                return channel.close()
            }
            return channel.eventLoop.makeSucceededVoidFuture()
        }.flatMapError { _ in channel.close() }
    }

    private func bind(_ bootstrap: ServerBootstrap, path: String) throws -> Channel {
        if Self.someoneListens(at: path) {
            throw ConfigurationError("another process is already serving \(path); stop it or choose another --socket")
        }
        let dir = (path as NSString).deletingLastPathComponent
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // Create the socket file private, then open it up to the configured mode and group.
        let old = umask(0o177)
        defer { umask(old) }
        let ch = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
        if let group = configuration.socketGroup {
            guard let gr = getgrnam(group) else { throw ConfigurationError("socket group '\(group)' does not exist") }
            guard chown(path, uid_t.max, gr.pointee.gr_gid) == 0 else { throw ConfigurationError("cannot chown \(path) to group \(group)") }
        }
        guard chmod(path, mode_t(configuration.socketMode)) == 0 else { throw ConfigurationError("cannot chmod \(path)") }
        return ch
    }

    static func someoneListens(at path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }

    static func makeStateDirectory(_ path: String) throws {
        var isDir: ObjCBool = false
        if !FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } else if !isDir.boolValue {
            throw ConfigurationError("state directory \(path) is not a directory")
        }
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
