import CKMSLinux
import Glibc
import Synchronization

/// Locked, dont-dump, wipe-on-fork memory for secret bytes, carved into fixed-size slots.
///
/// Chunks are `mmap`ed, `mlock`ed and `madvise`d (MADV_DONTDUMP, MADV_WIPEONFORK) once; slots
/// are zeroed with `explicit_bzero` when released and reused. Allocations larger than the
/// largest slot get a dedicated mapping treated the same way.
public final class SecureArena: Sendable {
    /// The process-wide arena every `SecureBytes` draws from.
    public static let shared = SecureArena()

    static let slotSizes = [32, 64, 256, 1024, 4096]
    static let chunkBytes = 64 * 1024

    struct State {
        // Slot addresses as bit patterns, so the state is plainly Sendable.
        var freeSlots: [[UInt]] = Array(repeating: [], count: SecureArena.slotSizes.count)
        var lockedBytes = 0
        var allowUnlocked = false
        var unlockedBytes = 0
        /// Bytes of slots and regions handed out and not yet released.
        var inUseBytes = 0
    }

    private let state = Mutex(State())

    init() {}

    /// Permits falling back to unlocked memory when mlock fails (development mode only).
    public func allowUnlockedMemory(_ allow: Bool) {
        state.withLock { $0.allowUnlocked = allow }
    }

    /// Bytes of memory currently locked by this arena.
    public var lockedBytes: Int { state.withLock { $0.lockedBytes } }

    /// Bytes mapped without a lock (only when unlocked memory was allowed).
    public var unlockedBytes: Int { state.withLock { $0.unlockedBytes } }

    /// Bytes of the arena's slots and regions that hold live secrets now (allocated, not yet
    /// released and zeroed): what a cache of keys occupies, as opposed to `lockedBytes`, which
    /// counts whole chunks and never shrinks while their slots are reused.
    public var inUseBytes: Int { state.withLock { $0.inUseBytes } }

    /// Checks that locked memory can be had, by taking one slot of each size.
    ///
    /// Throws `CryptoError.cannotLockMemory` naming RLIMIT_MEMLOCK when it cannot.
    public func warmUp() throws {
        var held: [(UnsafeMutableRawPointer, Int)] = []
        defer { for (p, n) in held { release(p, size: n) } }
        for size in Self.slotSizes {
            held.append((try allocate(size), size))
        }
    }

    func allocate(_ size: Int) throws -> UnsafeMutableRawPointer {
        guard let cls = Self.slotSizes.firstIndex(where: { $0 >= size }) else {
            let bytes = Self.roundToPage(size)
            let p = try mapRegion(bytes: bytes)
            state.withLock { $0.inUseBytes += bytes }
            return p
        }
        let slotBytes = Self.slotSizes[cls]
        if let p = state.withLock({ st -> UInt? in
            guard let p = st.freeSlots[cls].popLast() else { return nil }
            st.inUseBytes += slotBytes
            return p
        }) {
            return UnsafeMutableRawPointer(bitPattern: p)!
        }
        let base = try mapRegion(bytes: Self.chunkBytes)
        let baseBits = UInt(bitPattern: base)
        state.withLock { st in
            for offset in stride(from: slotBytes, through: Self.chunkBytes - slotBytes, by: slotBytes) {
                st.freeSlots[cls].append(baseBits + UInt(offset))
            }
            st.inUseBytes += slotBytes
        }
        return base
    }

    func release(_ pointer: UnsafeMutableRawPointer, size: Int) {
        guard let cls = Self.slotSizes.firstIndex(where: { $0 >= size }) else {
            let bytes = Self.roundToPage(size)
            kms_explicit_bzero(pointer, bytes)
            let wasLocked = munlock(pointer, bytes) == 0
            munmap(pointer, bytes)
            state.withLock {
                if wasLocked { $0.lockedBytes -= bytes } else { $0.unlockedBytes -= bytes }
                $0.inUseBytes -= bytes
            }
            return
        }
        kms_explicit_bzero(pointer, Self.slotSizes[cls])
        let bits = UInt(bitPattern: pointer)
        state.withLock {
            $0.freeSlots[cls].append(bits)
            $0.inUseBytes -= Self.slotSizes[cls]
        }
    }

    private func mapRegion(bytes: Int) throws -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else {
            throw CryptoError.cannotLockMemory("mmap of \(bytes) bytes for secret memory failed (errno \(errno))")
        }
        guard kms_madvise_secret(p, bytes) == 0 else {
            munmap(p, bytes)
            throw CryptoError.cannotLockMemory("madvise(MADV_DONTDUMP/MADV_WIPEONFORK) failed (errno \(errno)); kmsd needs Linux 4.14 or later")
        }
        if mlock(p, bytes) == 0 {
            state.withLock { $0.lockedBytes += bytes }
            return p
        }
        let err = errno
        let (allow, already) = state.withLock { ($0.allowUnlocked, $0.lockedBytes) }
        if allow {
            state.withLock { $0.unlockedBytes += bytes }
            return p
        }
        munmap(p, bytes)
        throw CryptoError.cannotLockMemory(Self.lockFailureMessage(bytes: bytes, errno: err, alreadyLocked: already))
    }

    static func lockFailureMessage(bytes: Int, errno err: Int32, alreadyLocked: Int) -> String {
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit)
        let soft = limit.rlim_cur == rlim_t.max ? "unlimited" : "\(limit.rlim_cur) bytes"
        return "cannot lock \(bytes) bytes of memory for key material (mlock errno \(err), \(alreadyLocked) bytes already locked): RLIMIT_MEMLOCK is \(soft). Raise it (systemd: LimitMEMLOCK=64M in the unit; shell: ulimit -l 65536) or, in development mode only, pass --allow-unlocked-memory."
    }

    static func roundToPage(_ n: Int) -> Int {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        return (n + page - 1) / page * page
    }
}
