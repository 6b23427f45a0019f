import Foundation
import Glibc

/// Where kmsd's state, both sockets and kmsd.log live.
struct WorkDirectory {
    let path: String
    /// True when kmsbench made the directory, which it then removes at the end.
    let owned: Bool

    init(requested: String?) throws {
        if let requested {
            let absolute = URL(fileURLWithPath: requested).standardizedFileURL.path
            do {
                try FileManager.default.createDirectory(atPath: absolute, withIntermediateDirectories: true)
            } catch {
                throw BenchError("cannot create work directory \(absolute): \(error)")
            }
            path = absolute
            owned = false
        } else {
            var template = Array("/tmp/kmsbench.XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else {
                throw BenchError("cannot create a directory under /tmp: \(errnoDescription(errno))")
            }
            path = String(cString: made)
            owned = true
        }
    }

    func remove() {
        if owned { try? FileManager.default.removeItem(atPath: path) }
    }
}

/// Progress goes to stderr; stdout carries only the results.
func progress(_ message: String) {
    // What the report printed so far goes first, so the two keep their order in one file.
    fflush(nil)
    FileHandle.standardError.write(Data((message + "\n").utf8))
}
