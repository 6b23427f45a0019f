import Foundation
import Glibc
import KMSClient
import Testing

/// Key material lives in locked, dont-dump, wipe-on-fork memory; the process cannot dump core;
/// without lockable memory the daemon refuses to start.
@Suite(.serialized)
struct MemoryTests {
    static func procFile(_ pid: Int32, _ name: String) throws -> String {
        let handle = try #require(FileHandle(forReadingAtPath: "/proc/\(pid)/\(name)"))
        defer { try? handle.close() }
        return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
    }

    static func statusValue(_ pid: Int32, _ field: String) throws -> Int {
        let line = try #require(try procFile(pid, "status").split(separator: "\n").first { $0.hasPrefix(field + ":") })
        return try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
    }

    @Test(.enabled(if: isRoot, "reading a non-dumpable process's smaps needs root"))
    func usedKeysAreInLockedDontDumpWipeOnForkMemory() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey()
        _ = try await client.encrypt(keyID: key.keyID, plaintext: [1, 2, 3])
        #expect(try Self.statusValue(daemon.pid, "VmLck") > 0)
        // Every locked mapping of the daemon is also excluded from dumps and wiped on fork.
        var lockedRegions = 0
        let smaps = try Self.procFile(daemon.pid, "smaps")
        for flagsLine in smaps.split(separator: "\n") where flagsLine.hasPrefix("VmFlags:") {
            let flags = Set(flagsLine.split(separator: " ").dropFirst().map(String.init))
            if flags.contains("lo") {
                lockedRegions += 1
                #expect(flags.contains("dd"), "locked region without MADV_DONTDUMP: \(flagsLine)")
                #expect(flags.contains("wf"), "locked region without MADV_WIPEONFORK: \(flagsLine)")
            }
        }
        #expect(lockedRegions > 0)
    }

    @Test func coreDumpsAreDisabled() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let limits = try Self.procFile(daemon.pid, "limits")
        let core = try #require(limits.split(separator: "\n").first { $0.hasPrefix("Max core file size") })
        let fields = core.split(separator: " ", omittingEmptySubsequences: true)
        #expect(fields[4] == "0" && fields[5] == "0", "\(core)")
    }

    @Test(.enabled(if: isRoot, "needs root to run kmsd as another user"))
    func theDaemonIsNotDumpable() async throws {
        // A non-dumpable process's /proc entries belong to root even when it runs as another uid.
        let dir = try Paths.tempDir("nobody")
        chown(dir, 65534, 65534)
        let p = try launchKMSD("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--",
                                                    Paths.kmsd, "--dev", "--state-dir", dir + "/state"], log: dir + "/log")
        defer { kill(p.processIdentifier, SIGTERM); p.waitUntilExit() }
        var st = stat()
        #expect(stat("/proc/\(p.processIdentifier)/cmdline", &st) == 0)
        #expect(try Self.procFile(p.processIdentifier, "status").contains("Uid:\t65534"))
        #expect(st.st_uid == 0, "a dumpable process would own its /proc entry")
    }

    @Test(.enabled(if: isRoot, "needs root to drop to an unprivileged uid"))
    func refusesToStartWithoutLockableMemory() throws {
        let dir = try Paths.tempDir("memlock")
        chown(dir, 65534, 65534)
        let refused = try runAs(uid: 65534, ["/usr/bin/prlimit", "--memlock=0:0", Paths.kmsd, "--dev", "--state-dir", dir + "/state"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("RLIMIT_MEMLOCK"), "\(refused.stderr)")
        #expect(refused.stderr.contains("LimitMEMLOCK"))
        #expect(!FileManager.default.fileExists(atPath: dir + "/state/root-key"), "nothing is created before the check")
    }

    @Test(.enabled(if: isRoot, "needs root to drop to an unprivileged uid"))
    func unlockedMemoryOnlyWhenExplicitlyAllowedInDevMode() throws {
        let dir = try Paths.tempDir("unlocked")
        chown(dir, 65534, 65534)
        // Outside dev mode the flag is refused.
        let notDev = try runAs(uid: 65534, ["/usr/bin/prlimit", "--memlock=0:0", Paths.kmsd, "--state-dir", dir + "/s1", "--allow-unlocked-memory"])
        #expect(notDev.status != 0 && notDev.stderr.contains("development mode"), "\(notDev.stderr)")
        // In dev mode it starts (and says loudly that memory is unlocked); timeout stops it.
        let dev = try runAs(uid: 65534, ["/usr/bin/timeout", "-s", "TERM", "2", "/usr/bin/prlimit", "--memlock=0:0", Paths.kmsd, "--dev",
                                         "--state-dir", dir + "/s2", "--allow-unlocked-memory"])
        #expect(dev.stderr.contains("kmsd: ready"), "\(dev.stderr)")
        #expect(dev.stderr.contains("UNLOCKED memory"))
    }

    /// Every readable mapping of a process, as root reads it through /proc/PID/mem.
    static func countCopies(of needles: [[UInt8]], inProcess pid: Int32) throws -> [Int] {
        let maps = try procFile(pid, "maps")
        let mem = open("/proc/\(pid)/mem", O_RDONLY)
        guard mem >= 0 else { throw DaemonError("cannot open /proc/\(pid)/mem: errno \(errno)") }
        defer { close(mem) }
        var counts = [Int](repeating: 0, count: needles.count)
        for line in maps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, fields[1].hasPrefix("r") else { continue }
            if fields.count >= 6, ["[vvar]", "[vsyscall]", "[vvar_vclock]"].contains(String(fields[5])) { continue }
            let range = fields[0].split(separator: "-").compactMap { UInt64($0, radix: 16) }
            guard range.count == 2 else { continue }
            var region = [UInt8](repeating: 0, count: Int(range[1] - range[0]))
            let n = region.withUnsafeMutableBytes { pread(mem, $0.baseAddress, $0.count, off_t(Int64(bitPattern: range[0]))) }
            guard n > 0 else { continue }
            region.withUnsafeBytes { all in
                let base = all.baseAddress!
                for (i, needle) in needles.enumerated() where !needle.isEmpty {
                    // memchr for the first byte, memcmp for the rest: fast even in a debug build.
                    var offset = 0
                    while offset + needle.count <= n, let hit = memchr(base + offset, Int32(needle[0]), n - offset - needle.count + 1) {
                        let at = base.distance(to: UnsafeRawPointer(hit))
                        if needle.withUnsafeBytes({ memcmp(base + at, $0.baseAddress!, needle.count) }) == 0 { counts[i] += 1 }
                        offset = at + 1
                    }
                }
            }
        }
        return counts
    }

    @Test(.enabled(if: isRoot, "reading another process's memory needs root"))
    func noCopyOfAPlaintextOrDataKeyStaysInTheDaemonsMemory() async throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let client = daemon.client()
        let probe = "memory-probe-\(UUID().uuidString)"
        let key = try await client.createKey(description: probe)
        let plaintext = try [UInt8](SecureRandomBytes(48))
        let blob = try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: ["app": "memory"])
        let opened = try await client.decrypt(ciphertextBlob: Array(blob.ciphertextBlob), context: ["app": "memory"])
        #expect(Array(opened.plaintext) == plaintext)
        let dataKey = try await client.generateDataKey(keyID: key.keyID, keySpec: "AES_256")
        // 100 further requests of every kind, on the same connection and on new ones.
        for i in 0..<100 {
            let other = try [UInt8](SecureRandomBytes(48))
            let c = i % 10 == 0 ? daemon.client() : client
            let b = try await c.encrypt(keyID: key.keyID, plaintext: other)
            _ = try await c.decrypt(ciphertextBlob: Array(b.ciphertextBlob))
            _ = try await c.generateRandom(numberOfBytes: 32)
        }
        // Pipelined Encrypts whose frames are split across reads (the receive buffer then holds
        // several frames, and parts of frames, at once).
        let raw = try RawConnection(path: daemon.socket)
        var pipelined: [[UInt8]] = []
        var stream: [UInt8] = []
        for id in 1...20 {
            let p = try [UInt8](SecureRandomBytes(48))
            pipelined.append(p)
            stream += RawConnection.frame(try KMSRequest.with(id: UInt64(id), .encrypt(.with {
                $0.keyID = key.keyID; $0.plaintext = Data(p)
            })).serializedBytes())
        }
        for chunk in stride(from: 0, to: stream.count, by: 333) {
            raw.send(Array(stream[chunk..<min(chunk + 333, stream.count)]))
            usleep(2_000)
        }
        for _ in 1...20 {
            let answer = try #require(try raw.receive(), "kmsd answered every pipelined request")
            #expect(answer.kmsError == nil)
        }
        for i in 0..<100 { _ = try await (i % 2 == 0 ? client : daemon.client()).generateRandom(numberOfBytes: 32) }
        let counts = try Self.countCopies(of: [plaintext, Array(dataKey.plaintext)] + pipelined, inProcess: daemon.pid)
        #expect(counts[0] == 0, "\(counts[0]) copies of a decrypted plaintext remain in kmsd's memory")
        #expect(counts[1] == 0, "\(counts[1]) copies of a returned data key remain in kmsd's memory")
        #expect(counts[2...].allSatisfy { $0 == 0 }, "copies of pipelined plaintexts remain: \(Array(counts[2...]))")
        // The search works: the key's description, which kmsd keeps in its cache, is found.
        #expect(try Self.countCopies(of: [Array(probe.utf8)], inProcess: daemon.pid)[0] > 0)
    }
}

/// Random bytes from the kernel, for test data that appears nowhere else.
func SecureRandomBytes(_ n: Int) throws -> [UInt8] {
    guard let h = FileHandle(forReadingAtPath: "/dev/urandom") else { throw DaemonError("no /dev/urandom") }
    defer { try? h.close() }
    return [UInt8](h.readData(ofLength: n))
}
