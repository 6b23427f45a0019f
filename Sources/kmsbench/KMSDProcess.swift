import Foundation
import Glibc
import KMSProtocol

/// The kmsd child process under measurement: a development-mode daemon whose state and
/// socket live in the work directory.
final class KMSDProcess {
    let executable: String
    let socketPath: String
    let stateDirectory: String
    /// kmsd's stdout and stderr.
    let logPath: String
    let extraArguments: [String]
    private let process = Process()
    private var started = false

    init(executable: String, workDirectory: String, extraArguments: [String] = []) {
        self.executable = executable
        self.socketPath = workDirectory + "/kmsd.sock"
        self.stateDirectory = workDirectory + "/state"
        self.logPath = workDirectory + "/kmsd.log"
        self.extraArguments = extraArguments
    }

    var arguments: [String] {
        // The per-uid request rate limit would measure the limit, not kmsd: it is off here.
        // Audit fails open unless the caller says otherwise (the audit-on daemon says true, so
        // that every request it answers had its record taken by journald).
        let failClosed = extraArguments.contains("--audit-fail-closed") ? [] : ["--audit-fail-closed", "false"]
        return ["--dev", "--state-dir", stateDirectory, "--socket", socketPath] + failClosed
            + ["--max-in-flight", "64", "--max-requests-per-second-per-uid", "0"] + extraArguments
    }

    /// The daemon's pid, once started.
    var pid: Int32 { process.processIdentifier }

    func start() throws {
        guard access(executable, X_OK) == 0 else {
            throw BenchError("no executable kmsd at \(executable); build it first (swift build -c release) or pass --kmsd PATH")
        }
        guard FileManager.default.createFile(atPath: logPath, contents: nil),
              let log = FileHandle(forWritingAtPath: logPath) else {
            throw BenchError("cannot create \(logPath)")
        }
        defer { try? log.close() }  // the child has its own copy
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = log
        process.standardError = log
        do {
            try process.run()
        } catch {
            throw BenchError("cannot start \(executable): \(error)")
        }
        started = true
    }

    /// Returns once the socket accepts connections; fails if kmsd exits or `timeoutSeconds` pass.
    func waitUntilListening(timeoutSeconds: Double = 30) throws {
        let deadline = monotonicNanos() + UInt64(timeoutSeconds * 1e9)
        var lastError = "no attempt"
        while monotonicNanos() < deadline {
            if !process.isRunning {
                throw BenchError("kmsd exited with status \(process.terminationStatus) before accepting connections on \(socketPath)\n\(logExcerpt())")
            }
            do {
                let fd = try UnixSocket.connect(to: socketPath)
                close(fd)
                return
            } catch {
                lastError = "\(error)"
            }
            usleep(50_000)
        }
        throw BenchError("kmsd did not accept connections on \(socketPath) within \(Int(timeoutSeconds)) s (\(lastError))\n\(logExcerpt())")
    }

    /// Seconds from `since` (monotonic ns) until kmsd logged that it is ready (READY=1).
    func waitUntilReady(timeoutSeconds: Double, since: UInt64) throws -> Double {
        let deadline = monotonicNanos() + UInt64(timeoutSeconds * 1e9)
        while monotonicNanos() < deadline {
            if let text = try? String(contentsOfFile: logPath, encoding: .utf8), text.contains("kmsd: ready") {
                return Double(monotonicNanos() - since) / 1e9
            }
            guard process.isRunning else { throw BenchError("kmsd exited before it was ready\n\(logExcerpt())") }
            usleep(5_000)
        }
        throw BenchError("kmsd was not ready within \(Int(timeoutSeconds)) s\n\(logExcerpt())")
    }

    /// Creates a symmetric key (the caller must be a kmsd administrator; root is by default)
    /// and returns its id.
    func createKey() throws -> String {
        let result: Kmsd_V1_Response.OneOf_Result
        do {
            result = try call(.createKey(.with { $0.description_p = "kmsbench" }))
        } catch {
            throw BenchError("\(error) (kmsbench must run as a kmsd administrator; by default root)")
        }
        guard case .createKey(let r) = result, !r.keyMetadata.keyID.isEmpty else { throw BenchError("CreateKey: unexpected answer") }
        return r.keyMetadata.keyID
    }

    /// Sends one request on a connection of its own and returns its result (an error result
    /// throws).
    func call(_ operation: Kmsd_V1_Request.OneOf_Operation) throws -> Kmsd_V1_Response.OneOf_Result {
        let fd = try UnixSocket.connect(to: socketPath)
        defer { close(fd) }
        UnixSocket.setTimeouts(fd, seconds: 10)
        var request = Kmsd_V1_Request()
        request.id = 3
        request.operation = operation
        try UnixSocket.writeAll(fd, lengthPrefixed(try request.serializedBytes()))
        var reader = FrameReader(fd: fd)
        let range = try reader.nextFrame()
        let response = try Kmsd_V1_Response(serializedBytes: Array(reader.buffer[range]))
        switch response.result {
        case .error(let e)?: throw BenchError("\(operation.name) failed with \(e.code): \(e.message)")
        case let r?: return r
        case nil: throw BenchError("\(operation.name): an answer without a result")
        }
    }

    /// A ciphertext blob of `plaintext` under `keyID` with the benchmark's context.
    func encrypt(keyID: String, plaintext: [UInt8]) throws -> [UInt8] {
        guard case .encrypt(let r) = try call(.encrypt(.with {
            $0.keyID = keyID; $0.plaintext = Data(plaintext); $0.encryptionContext = BenchOperation.context
        })) else { throw BenchError("Encrypt: unexpected answer") }
        return Array(r.ciphertextBlob)
    }

    /// Replaces a key's policy (PutKeyPolicy), for the policy-evaluation scenario.
    func putKeyPolicy(keyID: String, policy: String) throws {
        _ = try call(.putKeyPolicy(.with { $0.keyID = keyID; $0.policy = policy }))
    }

    /// Sends SIGTERM and waits for kmsd to exit (SIGKILL after `timeoutSeconds`).
    /// Returns the exit status, or nil if kmsd was never started.
    @discardableResult
    func stop(timeoutSeconds: Double = 15) -> Int32? {
        guard started else { return nil }
        if process.isRunning {
            process.terminate()  // SIGTERM
            let deadline = monotonicNanos() + UInt64(timeoutSeconds * 1e9)
            while process.isRunning && monotonicNanos() < deadline {
                usleep(20_000)
            }
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
            }
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// The end of kmsd's output, for error messages.
    func logExcerpt(maxBytes: Int = 4096) -> String {
        guard let data = FileManager.default.contents(atPath: logPath), !data.isEmpty else {
            return "(kmsd wrote nothing to \(logPath))"
        }
        let text = String(decoding: data.suffix(maxBytes), as: UTF8.self)
        return "--- kmsd output (\(logPath)) ---\n" + text + (text.hasSuffix("\n") ? "" : "\n") + "---"
    }
}

/// A kmsd started by the benchmark, with the key and Decrypt blob its requests use.
struct BenchDaemon {
    /// Starts kmsd in `workDirectory` with `arguments` after the benchmark's own, waits until it
    /// listens, and creates a key (no Decrypt blob: `blob` is filled where Decrypt is measured).
    static func launch(executable: String, workDirectory: String, arguments: [String], audit: Bool = false) throws -> BenchDaemon {
        mkdir(workDirectory, 0o700)
        let process = KMSDProcess(executable: executable, workDirectory: workDirectory, extraArguments: arguments)
        try process.start()
        do {
            try process.waitUntilListening(timeoutSeconds: 120)
            return BenchDaemon(audit: audit, process: process, key: try process.createKey())
        } catch {
            process.stop()
            throw error
        }
    }

    let audit: Bool
    let process: KMSDProcess
    var key = ""
    var blob: [UInt8] = []

    /// The load target for `operation` against this daemon (frames checked against the encoder).
    func target(_ operation: BenchOperation, plaintext: [UInt8]) throws -> KMSDTarget {
        let key = self.key, blob = self.blob
        let request = { (id: UInt64) in operation.request(id: id, keyID: key, plaintext: plaintext, blob: blob) }
        let bytes = try RequestFrames.operationBytes(request)
        try RequestFrames.check(request, operationBytes: bytes)
        return KMSDTarget(socketPath: process.socketPath, operation: operation, operationBytes: bytes)
    }
}
