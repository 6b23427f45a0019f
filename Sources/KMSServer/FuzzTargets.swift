import Foundation
import KMSCore
import KMSCrypto
import KMSEnvelope
import KMSProtocol
import NIOCore
import NIOEmbedded
import Synchronization

/// What the fuzzers drive (`kmsfuzz`, `make fuzz`): the server's own code for untrusted bytes,
/// exactly as a connection runs it, without sockets. Each function takes any bytes and must
/// neither crash, hang, nor leak; a finding becomes a file in Tests/FuzzRegressions.
public enum FuzzTargets {
    public static let names = ["frames", "request", "ciphertext", "policy", "envelope"]

    /// Runs the target called `name` (one of `names`) on one input.
    public static func run(_ name: String, _ data: UnsafeRawBufferPointer) {
        switch name {
        case "frames": frames(data)
        case "request": request(data)
        case "ciphertext": ciphertext(data)
        case "policy": policy(data)
        case "envelope": envelope(data)
        default: preconditionFailure("no fuzz target \(name); targets: \(names.joined(separator: ", "))")
        }
    }

    /// The frame splitter (`FrameReader`) over the input delivered in chunks whose sizes the
    /// input's first bytes choose, as a socket may deliver them.
    public static func frames(_ data: UnsafeRawBufferPointer) {
        let channel = EmbeddedChannel()
        let collected = FrameCollector()
        do {
            try channel.pipeline.syncOperations.addHandlers([FrameReader(maxFrameBytes: 4096), collected])
        } catch { fatalError("kmsfuzz: cannot build the pipeline: \(error)") }
        var rest = data.count > 0 ? UnsafeRawBufferPointer(rebasing: data[1...]) : data
        let step = data.first.map { Int($0 % 64) + 1 } ?? 1
        while !rest.isEmpty, !collected.failed {
            let n = min(step, rest.count)
            var buffer = channel.allocator.buffer(capacity: n)
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: rest[..<n]))
            do { try channel.writeInbound(buffer) } catch { collected.failed = true }
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        }
        // Every frame that came out is one the length prefix announced, within the limit.
        for frame in collected.frames { precondition((1...4096).contains(frame), "FrameReader passed on a frame of \(frame) bytes") }
        _ = try? channel.finish()
    }

    /// One request frame body: decoded, authorized, handled and answered (the response frame
    /// built) by a real dispatcher over an in-memory keystore, as an administrator or as
    /// another local user (the input's first byte chooses). Also checks that the request
    /// path's shortcut (`HotRequestDecoder`) reads it as SwiftProtobuf does, or not at all.
    public static func request(_ data: UnsafeRawBufferPointer) {
        _ = requestAnswer(data)
    }

    /// `request`, returning the kind of answer: "error", "hello", "result" (any other), "none".
    @discardableResult
    public static func requestAnswer(_ data: UnsafeRawBufferPointer) -> String {
        guard let first = data.first else { return "none" }
        let body = UnsafeRawBufferPointer(rebasing: data[1...])
        let (dispatcher, memos) = FuzzState.shared.dispatcher()
        let principal = first & 1 == 0 ? FuzzState.administrator : FuzzState.user
        // Each principal's requests share a decision memo, as one connection's do in kmsd.
        let memo = first & 1 == 0 ? memos.administrator : memos.user
        precondition(HotRequestDecoder.agreesWithSwiftProtobuf(body), "the request shortcut and SwiftProtobuf read a frame differently")
        var buffer = ByteBufferAllocator().buffer(capacity: body.count)
        buffer.writeBytes(body)
        let decoded = Result { () throws(KMSError) in try IncomingRequest(frameBody: buffer) }
        let outgoing = dispatcher.handle(decoded, principal: principal, memo: memo)
        _ = try? ConnectionHandler.frame(outgoing, allocator: ByteBufferAllocator())
        switch outgoing.response.result {
        case .error?: return "error"
        case .hello?: return "hello"
        case _?: return "result"
        case nil: return "none"
        }
    }
}

extension FuzzTargets {
    static let versionKey = try! SecureBytes.random(count: 32)

    /// The ciphertext parser; then opening under a random key, which must fail, with and
    /// without a context.
    public static func ciphertext(_ data: UnsafeRawBufferPointer) {
        guard let parsed = try? SymmetricCiphertext(parsing: Array(data)) else { return }
        precondition(parsed.serialized == Array(data), "a parsed blob does not serialize back to its bytes")
        for context in [[:], ["k": "v"]] {
            guard let ctx = try? EncryptionContext(context) else { continue }
            precondition((try? parsed.open(versionKey: versionKey, context: ctx)) == nil, "a fuzzed blob opened under a random key")
        }
    }

    /// The data key of the envelope target's seeds (Seeds: files made with it), so mutations
    /// get past the commitment and header tag into the chunk reader.
    public static let envelopeDataKey: SecureBytes = {
        var k = (0..<32).map { UInt8($0) &* 7 &+ 1 }
        return try! SecureBytes(consuming: &k)
    }()

    /// The file envelope reader (PROTOCOL.md §16.4) on any bytes, with the seeds' data key: it
    /// may refuse (EnvelopeError) but never crash; and what it accepts must be exactly what
    /// the writer makes from the plaintext it returned (same message id, context, data key and
    /// encrypted data key), so no accepted file has a second form.
    public static func envelope(_ data: UnsafeRawBufferPointer) {
        var input = BytesInput(Array(data), maxRead: 1 + Int(data.first ?? 0) % 97)
        guard let header = try? FileEnvelope.readHeader(from: &input) else { return }
        _ = try? FileEnvelope.checkExpectedContext(["k": "v"], in: header)
        var output = BytesOutput()
        do {
            _ = try FileEnvelope.decrypt(header: header, dataKey: envelopeDataKey, from: &input, to: &output)
        } catch is EnvelopeError {
            return
        } catch {
            preconditionFailure("the envelope reader failed with something other than EnvelopeError: \(error)")
        }
        var again = BytesInput(output.bytes)
        var rewritten = BytesOutput()
        _ = try! FileEnvelope.encrypt(dataKey: envelopeDataKey, encryptedDataKey: header.encryptedDataKey, context: header.encryptionContext,
                                      chunkSize: header.chunkSize, messageID: header.messageID, from: &again, to: &rewritten)
        precondition(rewritten.bytes == Array(data), "an accepted envelope is not what the writer makes of its plaintext")
    }

    /// Key-policy (strict and lenient) and identity-policy parsing.
    public static func policy(_ data: UnsafeRawBufferPointer) {
        let text = String(decoding: data, as: UTF8.self)
        _ = try? KeyPolicy.parse(text, strict: true)
        _ = try? KeyPolicy.parse(text, strict: false)
        _ = try? IdentityPolicy.parse(text, name: "fuzz")
    }
}

/// Collects the sizes of the frames FrameReader passes on.
private final class FrameCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    var frames: [Int] = []
    var failed = false
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { frames.append(unwrapInboundIn(data).readableBytes) }
    func errorCaught(context: ChannelHandlerContext, error: Error) { failed = true }
}

/// The dispatcher the request fuzzer drives: a fresh in-memory keystore every 20,000 inputs,
/// so keys created by fuzz inputs cannot grow without bound.
private final class FuzzState: Sendable {
    static let shared = FuzzState()
    static let administrator = Principal(uid: 0, gid: 0, pid: 1, userName: "root", groups: [], executable: "/usr/bin/kmsctl")
    static let user = Principal(uid: 1000, gid: 1000, pid: 2, userName: "user", groups: [100], executable: "/usr/bin/app")

    typealias Memos = (administrator: DecisionMemo, user: DecisionMemo)
    /// The memos belong to their dispatcher's keystore (its change count): new ones with each.
    private let state = Mutex<(dispatcher: Dispatcher?, memos: Memos?, uses: Int, generation: Int)>((nil, nil, 0, 0))

    /// The keystore file of one generation: on /dev/shm when there is one (a tmpfs: fsync is
    /// free), else the temporary directory. A file, not ":memory:": every SQLite connection to
    /// ":memory:" is a database of its own, so kmsd's readers would see none of the writes.
    static func keystorePath(_ generation: Int) -> String {
        let dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : NSTemporaryDirectory()
        return "\(dir)/kmsfuzz-\(getpid())-\(generation).sqlite3"
    }

    static func remove(_ path: String) {
        for suffix in ["", "-wal", "-shm"] { unlink(path + suffix) }
    }

    func dispatcher() -> (Dispatcher, Memos) {
        state.withLock { s in
            if let d = s.dispatcher, let memos = s.memos, s.uses < 20_000 {
                s.uses += 1
                return (d, memos)
            }
            do {
                s.dispatcher = nil
                s.memos = nil
                Self.remove(Self.keystorePath(s.generation))
                s.generation += 1
                let path = Self.keystorePath(s.generation)
                Self.remove(path)
                let repository = try KeyRepository(storage: SQLiteKeyStorage(path: path, readConnections: 1),
                                                   root: RootKey(material: SecureBytes.random(count: 32)), cacheCapacity: 64)
                let service = KeyService(repository: repository, administrators: Administrators(uids: [0]))
                let d = Dispatcher(service: service, audit: AuditLog(failClosed: false, disabled: true),
                                   settings: ServerSettings(maxFrameBytes: 65_536, maxInFlight: 64))
                let memos = (administrator: DecisionMemo(), user: DecisionMemo())
                s.dispatcher = d
                s.memos = memos
                s.uses = 1
                return (d, memos)
            } catch {
                fatalError("kmsfuzz: cannot open an in-memory keystore: \(error)")
            }
        }
    }
}
