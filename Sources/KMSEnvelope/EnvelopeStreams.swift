import Glibc
import KMSCrypto

/// Where a file envelope reads from: `read` fills some of `buffer` and returns how many bytes
/// it wrote, 0 only at the end of the input.
public protocol EnvelopeInput {
    mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
}

/// Where a file envelope writes to: `write` takes all of `bytes` or throws.
public protocol EnvelopeOutput {
    mutating func write(_ bytes: UnsafeRawBufferPointer) throws
}

/// A read or write on a file descriptor failed (not a defect of the file itself).
public struct EnvelopeIOError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension EnvelopeInput {
    /// Reads until `buffer` is full or the input ends; returns the bytes read.
    mutating func readFully(_ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Fills `buffer` exactly, or throws EnvelopeError(step) naming `what` was cut short.
    mutating func readExactly(_ buffer: UnsafeMutableRawBufferPointer, step: EnvelopeError.Step, what: String) throws {
        let got = try readFully(buffer)
        guard got == buffer.count else {
            throw EnvelopeError(step, "the file ends inside \(what): it was cut short")
        }
    }

    mutating func readExactly(_ bytes: inout [UInt8], step: EnvelopeError.Step, what: String) throws {
        try bytes.withUnsafeMutableBytes { try readExactly($0, step: step, what: what) }
    }

    /// One byte, or nil at the end of the input.
    mutating func readByte() throws -> UInt8? {
        var b: UInt8 = 0
        let n = try withUnsafeMutableBytes(of: &b) { try readFully($0) }
        return n == 1 ? b : nil
    }
}

/// Reads a file descriptor (standard input, a file, a pipe) through a buffer, so the small
/// reads of the chunk headers cost no system call each; large reads go straight to the
/// caller's buffer. Does not close the descriptor.
public final class FileDescriptorInput: EnvelopeInput {
    public let fd: Int32
    private let storage: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0

    public init(fd: Int32, bufferSize: Int = 256 * 1024) {
        self.fd = fd
        storage = .allocate(byteCount: bufferSize, alignment: 16)
    }

    deinit {
        // It held chunks of plaintext on their way through (decrypted files are not read
        // through it, but encrypted inputs are).
        kmsExplicitBzero(storage)
        storage.deallocate()
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        if start == end {
            // Empty: a large request bypasses the buffer.
            if buffer.count >= storage.count / 2 { return try rawRead(buffer) }
            start = 0
            end = try rawRead(storage)
            if end == 0 { return 0 }
        }
        let n = min(buffer.count, end - start)
        buffer.baseAddress!.copyMemory(from: storage.baseAddress! + start, byteCount: n)
        start += n
        return n
    }

    private func rawRead(_ buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw EnvelopeIOError("cannot read the input: \(String(cString: strerror(errno)))")
        }
    }
}

/// Writes everything to a file descriptor, retrying short writes. Does not close it.
public struct FileDescriptorOutput: EnvelopeOutput {
    public let fd: Int32

    public init(fd: Int32) { self.fd = fd }

    public mutating func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw EnvelopeIOError("cannot write the output: \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }
}

/// Bytes in memory as an input (tests, small messages).
public struct BytesInput: EnvelopeInput {
    public let bytes: [UInt8]
    public private(set) var offset = 0
    /// At most this many bytes per read (tests use small values to exercise short reads).
    public var maxRead: Int

    public init(_ bytes: [UInt8], maxRead: Int = .max) {
        self.bytes = bytes
        self.maxRead = maxRead
    }

    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, bytes.count - offset, maxRead)
        guard n > 0 else { return 0 }
        bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + offset, byteCount: n) }
        offset += n
        return n
    }
}

/// Collects output in memory.
public struct BytesOutput: EnvelopeOutput {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func write(_ b: UnsafeRawBufferPointer) throws { bytes.append(contentsOf: b) }
}
