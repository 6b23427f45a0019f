import Dispatch
import Foundation
import Glibc
import KMSClient
import KMSCrypto

/// Issue 12's figures: file envelope throughput against OpenSSL in the same run, and messages/s
/// of KMSClient.encryptMessage / decryptMessage with and without the data-key cache.
enum EnvelopeBench {
    struct Result: Codable, Sendable {
        /// `openssl speed -evp aes-256-gcm -bytes 65536`, one core (MB/s, 10^6 bytes).
        var opensslSpeedGCM: Double
        /// FileEnvelope.encrypt / decrypt in this process, 64 KiB chunks, memory to memory (MB/s).
        var inProcessEncrypt: Double
        var inProcessDecrypt: Double
        /// The same file from /dev/shm to /dev/null: `kmsctl encrypt-file`, `kmsctl
        /// decrypt-file`, and `openssl enc -aes-256-ctr` (no GCM in `openssl enc`: CTR is the
        /// stream cipher under GCM, without the authentication).
        var fileBytes: Int
        var kmsctlEncryptFile: Double
        var kmsctlDecryptFile: Double
        var opensslEncCTR: Double
        /// Messages/s of 1 KiB messages, one client, one after another.
        var messageBytes: Int
        var encryptMessagesUncached: Double
        var encryptMessagesCached: Double
        var decryptMessagesUncached: Double
        var decryptMessagesCached: Double
        var cacheMaxMessages: UInt64

        func markdown() -> String {
            func mb(_ v: Double) -> String { String(format: "%.0f MB/s", v) }
            func pct(_ a: Double, _ b: Double) -> String { b > 0 ? String(format: "%.0f%%", 100 * a / b) : "n/a" }
            let goal = 0.70
            let inProcessMet = inProcessEncrypt >= goal * opensslSpeedGCM && inProcessDecrypt >= goal * opensslSpeedGCM
            let fileMet = kmsctlEncryptFile >= goal * opensslEncCTR && kmsctlDecryptFile >= goal * opensslEncCTR
            return """

            ## File envelopes and the data-key cache (issue 12)

            | measure | throughput | vs OpenSSL in this run |
            |---|---:|---:|
            | `openssl speed -evp aes-256-gcm -bytes 65536` (one core) | \(mb(opensslSpeedGCM)) | 100% |
            | FileEnvelope.encrypt in process (64 KiB chunks) | \(mb(inProcessEncrypt)) | \(pct(inProcessEncrypt, opensslSpeedGCM)) |
            | FileEnvelope.decrypt in process | \(mb(inProcessDecrypt)) | \(pct(inProcessDecrypt, opensslSpeedGCM)) |
            | `openssl enc -aes-256-ctr` \(fileBytes >> 20) MiB /dev/shm → /dev/null | \(mb(opensslEncCTR)) | 100% |
            | `kmsctl encrypt-file` same file | \(mb(kmsctlEncryptFile)) | \(pct(kmsctlEncryptFile, opensslEncCTR)) |
            | `kmsctl decrypt-file` of its output | \(mb(kmsctlDecryptFile)) | \(pct(kmsctlDecryptFile, opensslEncCTR)) |

            Goal ≥ 70%: in process against `openssl speed` \(inProcessMet ? "met" : "NOT met"); kmsctl against `openssl enc` \(fileMet ? "met" : "NOT met").

            | \(messageBytes)-byte messages, one client | without cache | with cache (≤ \(cacheMaxMessages) messages per data key) | ratio |
            |---|---:|---:|---:|
            | KMSClient.encryptMessage | \(String(format: "%.0f/s", encryptMessagesUncached)) | \(String(format: "%.0f/s", encryptMessagesCached)) | \(String(format: "%.1f×", encryptMessagesCached / max(encryptMessagesUncached, 1))) |
            | KMSClient.decryptMessage | \(String(format: "%.0f/s", decryptMessagesUncached)) | \(String(format: "%.0f/s", decryptMessagesCached)) | \(String(format: "%.1f×", decryptMessagesCached / max(decryptMessagesUncached, 1))) |
            """
        }
    }

    /// Runs everything against the kmsd at `socket` (audit off), with `kmsctl` for the
    /// end-to-end file figures.
    static func run(socket: String, keyID: String, kmsctl: String, work: String, seconds: Double) throws -> Result {
        progress("file envelopes: openssl speed -evp aes-256-gcm")
        let speed = try opensslSpeed(seconds: max(1, Int(seconds.rounded())))

        progress("file envelopes: FileEnvelope.encrypt / decrypt in process")
        let key = try SecureBytes.random(count: 32)
        let inBytes = 1 << 30
        var zeros = ZeroInput(remaining: inBytes)
        var sink = DiscardOutput()
        var start = monotonicNanos()
        _ = try FileEnvelope.encrypt(dataKey: key, encryptedDataKey: [1], context: ["bench": "1"], from: &zeros, to: &sink)
        let encryptMBs = Double(inBytes) / Double(monotonicNanos() - start) * 1e3
        let sealedBytes = 256 << 20
        var small = ZeroInput(remaining: sealedBytes)
        var sealed = BytesOutput()
        sealed.bytes.reserveCapacity(sealedBytes + (sealedBytes >> 12) + 4096)
        _ = try FileEnvelope.encrypt(dataKey: key, encryptedDataKey: [1], context: ["bench": "1"], from: &small, to: &sealed)
        var sealedInput = BytesInput(sealed.bytes)
        start = monotonicNanos()
        let header = try FileEnvelope.readHeader(from: &sealedInput)
        _ = try FileEnvelope.decrypt(header: header, dataKey: key, from: &sealedInput, to: &sink)
        let decryptMBs = Double(sealedBytes) / Double(monotonicNanos() - start) * 1e3
        sealed = BytesOutput()
        sealedInput = BytesInput([])

        progress("file envelopes: kmsctl encrypt-file / decrypt-file and openssl enc, 1 GiB in /dev/shm")
        let fileBytes = 1 << 30
        let dir = "/dev/shm/kmsbench-\(getpid())"
        mkdir(dir, 0o700)
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let plain = dir + "/plain", sealedPath = dir + "/sealed"
        try shell("head -c \(fileBytes) /dev/urandom > \(plain)")
        let ctr = try timed("openssl enc -aes-256-ctr -nosalt -K \(String(repeating: "11", count: 32)) -iv \(String(repeating: "00", count: 16)) -in \(plain) -out /dev/null")
        let env = "KMSD_SOCKET=\(socket)"
        let enc = try timed("\(env) \(kmsctl) encrypt-file --key-id \(keyID) --context bench=file < \(plain) > /dev/null")
        try shell("\(env) \(kmsctl) encrypt-file --key-id \(keyID) --context bench=file < \(plain) > \(sealedPath)")
        let dec = try timed("\(env) \(kmsctl) decrypt-file --context bench=file < \(sealedPath) > /dev/null")
        // The output must be right, or the figure means nothing.
        try shell("\(env) \(kmsctl) decrypt-file < \(sealedPath) | cmp -s - \(plain)")

        progress("data-key cache: encryptMessage / decryptMessage, with and without")
        let messageBytes = 1024
        let maxMessages: UInt64 = 1000
        let figures = try blocking {
            let client = KMSClient(socketPath: socket)
            defer { Task { await client.close() } }
            let plaintext = [UInt8](repeating: 0x42, count: messageBytes)
            let context = ["tenant": "bench"]
            func rate(_ body: () async throws -> Void) async throws -> Double {
                let end = monotonicNanos() + UInt64(seconds * 1e9)
                let begin = monotonicNanos()
                var n = 0
                while monotonicNanos() < end {
                    try await body()
                    n += 1
                }
                return Double(n) / (Double(monotonicNanos() - begin) / 1e9)
            }
            let cache = try DataKeyCache(limits: .init(maxMessages: maxMessages, maxBytes: 1 << 30, maxAge: .seconds(300), capacity: 10))
            let uncached = try await rate { _ = try await client.encryptMessage(keyID: keyID, plaintext: plaintext, context: context) }
            let cached = try await rate { _ = try await client.encryptMessage(keyID: keyID, plaintext: plaintext, context: context, cache: cache) }
            let message = try await client.encryptMessage(keyID: keyID, plaintext: plaintext, context: context)
            let decryptCache = try DataKeyCache(limits: .init(maxMessages: maxMessages, maxBytes: 1 << 30, maxAge: .seconds(300), capacity: 10))
            let decUncached = try await rate { _ = try await client.decryptMessage(message) }
            let decCached = try await rate { _ = try await client.decryptMessage(message, cache: decryptCache) }
            return (uncached, cached, decUncached, decCached)
        }
        return Result(opensslSpeedGCM: speed, inProcessEncrypt: encryptMBs, inProcessDecrypt: decryptMBs,
                      fileBytes: fileBytes, kmsctlEncryptFile: Double(fileBytes) / enc / 1e6,
                      kmsctlDecryptFile: Double(fileBytes) / dec / 1e6, opensslEncCTR: Double(fileBytes) / ctr / 1e6,
                      messageBytes: messageBytes, encryptMessagesUncached: figures.0, encryptMessagesCached: figures.1,
                      decryptMessagesUncached: figures.2, decryptMessagesCached: figures.3, cacheMaxMessages: maxMessages)
    }

    /// MB/s (10^6 bytes) from the last line of `openssl speed`, which gives 1000s of bytes/s.
    static func opensslSpeed(seconds: Int) throws -> Double {
        let out = try shell("openssl speed -evp aes-256-gcm -bytes 65536 -seconds \(seconds) 2>/dev/null | tail -1")
        guard let field = out.split(whereSeparator: \.isWhitespace).last,
              let kbytes = Double(field.hasSuffix("k") ? String(field.dropLast()) : String(field)) else {
            throw BenchError("cannot read openssl speed's output: \(out)")
        }
        return kbytes * 1000 / 1e6
    }

    /// Seconds `command` took (bash, wall clock); fails when it fails.
    static func timed(_ command: String) throws -> Double {
        let start = monotonicNanos()
        try shell(command)
        return Double(monotonicNanos() - start) / 1e9
    }

    @discardableResult
    static func shell(_ command: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = ["-o", "pipefail", "-c", command]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw BenchError("`\(command)` failed with status \(p.terminationStatus)") }
        return String(decoding: data, as: UTF8.self)
    }

    /// Runs async work from this synchronous command and waits for it.
    static func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { box.set(.success(try await body())) } catch { box.set(.failure(error)) }
            done.signal()
        }
        done.wait()
        return try box.get()
    }

    final class ResultBox<T: Sendable>: @unchecked Sendable {
        private var result: Swift.Result<T, Error>?
        private let lock = NSLock()
        func set(_ r: Swift.Result<T, Error>) { lock.lock(); result = r; lock.unlock() }
        func get() throws -> T { lock.lock(); defer { lock.unlock() }; return try result!.get() }
    }

    /// `remaining` bytes of whatever the caller's buffer already holds: input at no cost, so
    /// the figure is the envelope's alone.
    struct ZeroInput: EnvelopeInput {
        var remaining: Int
        mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
            let n = min(buffer.count, remaining)
            remaining -= n
            return n
        }
    }

    struct DiscardOutput: EnvelopeOutput {
        var bytes: UInt64 = 0
        mutating func write(_ b: UnsafeRawBufferPointer) throws { bytes += UInt64(b.count) }
    }
}
