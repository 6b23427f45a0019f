import ArgumentParser
import CKMSSystemd
import Foundation

/// What to read from the journal: field matches (`FIELD=value`, all of them must hold; the
/// journal's own field indexes select the entries, so a large journal costs what the answer
/// costs) and a time window.
struct JournalQuery {
    var matches: [String] = ["SYSLOG_IDENTIFIER=kmsd"]
    /// µs since the epoch (journald's receive time); nil: from the start (or, following, from now).
    var since: UInt64? = nil
    var until: UInt64? = nil
    var follow = false
    /// Only these fields of each entry (KMS_ACTION always), looked up one by one; nil: every
    /// field. A review or report over millions of records then reads and keeps a few fields
    /// of each, not thirty.
    var fields: [String]? = nil
}

/// Reads the local journal through libsystemd's sd_journal, handing each kmsd record to `body`
/// in the journal's order; with `follow`, waits for new ones until killed.
func readJournal(_ query: JournalQuery, _ body: (JournalRecord) throws -> Void) throws {
    try checkJournalAccess()
    var opened: OpaquePointer?
    var r = sd_journal_open(&opened, Int32(SD_JOURNAL_LOCAL_ONLY))
    guard r >= 0, let j = opened else { throw ValidationError("cannot open the journal: \(String(cString: strerror(-r)))") }
    defer { sd_journal_close(j) }
    _ = sd_journal_set_data_threshold(j, 0)  // whole fields, however long
    for m in query.matches {
        r = m.withCString { sd_journal_add_match(j, $0, 0) }
        guard r >= 0 else { throw ValidationError("cannot match the journal on \(m): \(String(cString: strerror(-r)))") }
    }
    if let since = query.since {
        r = sd_journal_seek_realtime_usec(j, since)
    } else if query.follow {
        r = sd_journal_seek_tail(j)
        // Onto the newest entry, so that the next one read is the first new one.
        if r >= 0 { r = min(0, sd_journal_previous(j)) }
    } else {
        r = sd_journal_seek_head(j)
    }
    guard r >= 0 else { throw ValidationError("cannot seek in the journal: \(String(cString: strerror(-r)))") }
    var data: UnsafeRawPointer?
    var length = 0
    while true {
        r = sd_journal_next(j)
        guard r >= 0 else { throw ValidationError("cannot read the journal: \(String(cString: strerror(-r)))") }
        if r == 0 {
            guard query.follow else { return }
            r = sd_journal_wait(j, UInt64.max)
            guard r >= 0 else { throw ValidationError("cannot wait for the journal: \(String(cString: strerror(-r)))") }
            continue
        }
        var time: UInt64 = 0
        guard sd_journal_get_realtime_usec(j, &time) >= 0 else { continue }
        if let since = query.since, time < since { continue }
        if let until = query.until, time > until {
            if query.follow { continue } else { return }
        }
        var fields = ["__REALTIME_TIMESTAMP": String(time)]
        func take(_ data: UnsafeRawPointer, _ length: Int) {
            let bytes = UnsafeRawBufferPointer(start: data, count: length)
            guard let eq = bytes.firstIndex(of: UInt8(ascii: "=")) else { return }
            fields[String(decoding: bytes[..<eq], as: UTF8.self)] = String(decoding: bytes[(eq + 1)...], as: UTF8.self)
        }
        if let wanted = query.fields {
            for name in ["KMS_ACTION"] + wanted where name.withCString({ sd_journal_get_data(j, $0, &data, &length) }) >= 0 {
                if let data { take(data, length) }
            }
        } else {
            sd_journal_restart_data(j)
            while sd_journal_enumerate_data(j, &data, &length) > 0, let data { take(data, length) }
        }
        if let record = JournalRecord(fields: fields, requireChain: false) { try body(record) }
    }
}

/// sd_journal opens what it may and silently leaves out the rest: without read access to the
/// system journal the answer would be empty, not an error. Say so instead, as journalctl does.
func checkJournalAccess() throws {
    guard geteuid() != 0 else { return }
    var systemFiles = 0, readable = 0
    for base in ["/run/log/journal", "/var/log/journal"] {
        guard let machines = try? FileManager.default.contentsOfDirectory(atPath: base) else { continue }
        for machine in machines {
            let dir = base + "/" + machine
            guard let files = try? FileManager.default.contentsOfDirectory(atPath: dir) else {
                if access(dir, F_OK) == 0 { systemFiles += 1 }
                continue
            }
            for f in files where f.hasPrefix("system") && (f.hasSuffix(".journal") || f.hasSuffix(".journal~")) {
                systemFiles += 1
                if access(dir + "/" + f, R_OK) == 0 { readable += 1 }
            }
        }
    }
    if systemFiles > 0 && readable == 0 {
        throw ValidationError("cannot read the system journal (permission denied): run as root or a member of systemd-journal")
    }
}

/// Times as journalctl's --since and --until take them (systemd.time(7)): `now`, `today`,
/// `yesterday`, `tomorrow`; `@UNIX` seconds (fractions allowed); `YYYY-MM-DD [HH:MM[:SS[.frac]]]`
/// or `HH:MM[:SS]` (today), in local time unless followed by ` UTC`; and relative spans such as
/// `-1h`, `+30min`, `2 days ago`, `1h 30min left`.
enum JournalTime {
    static func parse(_ text: String, now: Date = Date()) -> UInt64? {
        let t = text.trimmingCharacters(in: .whitespaces)
        let nowMicros = now.timeIntervalSince1970 * 1_000_000
        func micros(_ d: Double) -> UInt64? { d >= 0 && d < 1.8e19 ? UInt64(d) : nil }
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = .current
        switch t {
        case "now": return micros(nowMicros)
        case "today", "yesterday", "tomorrow":
            let midnight = calendar.startOfDay(for: now).timeIntervalSince1970
            return micros((midnight + (t == "today" ? 0 : t == "yesterday" ? -86_400 : 86_400)) * 1_000_000)
        default: break
        }
        if t.hasPrefix("@") {
            guard let seconds = Double(t.dropFirst()), seconds.isFinite else { return nil }
            return micros(seconds * 1_000_000)
        }
        if t.hasPrefix("-"), let span = span(String(t.dropFirst())) { return micros(nowMicros - span) }
        if t.hasPrefix("+"), let span = span(String(t.dropFirst())) { return micros(nowMicros + span) }
        if t.hasSuffix(" ago"), let span = span(String(t.dropLast(4))) { return micros(nowMicros - span) }
        if t.hasSuffix(" left"), let span = span(String(t.dropLast(5))) { return micros(nowMicros + span) }
        return absolute(t, now: now, calendar: calendar).flatMap { micros($0 * 1_000_000) }
    }

    /// `YYYY-MM-DD[ HH:MM[:SS[.frac]]][ UTC]` or `HH:MM[:SS[.frac]][ UTC]`: seconds since the epoch.
    static func absolute(_ text: String, now: Date, calendar: Calendar) -> Double? {
        var t = text, calendar = calendar
        if t.hasSuffix(" UTC") {
            t = String(t.dropLast(4))
            calendar.timeZone = TimeZone(identifier: "UTC")!
        }
        let parts = t.split(whereSeparator: { $0 == " " || $0 == "T" }).map(String.init)
        guard (1...2).contains(parts.count) else { return nil }
        var components = DateComponents()
        var clock: String? = nil
        if parts[0].contains("-") {
            let ymd = parts[0].split(separator: "-", omittingEmptySubsequences: false)
            guard ymd.count == 3, ymd[0].count == 4, let y = Int(ymd[0]), let m = Int(ymd[1]), let d = Int(ymd[2]),
                  (1...12).contains(m), (1...31).contains(d) else { return nil }
            (components.year, components.month, components.day) = (y, m, d)
            clock = parts.count == 2 ? parts[1] : nil
        } else {
            guard parts.count == 1 else { return nil }
            let today = calendar.dateComponents([.year, .month, .day], from: now)
            (components.year, components.month, components.day) = (today.year, today.month, today.day)
            clock = parts[0]
        }
        var fraction = 0.0
        if let clock {
            var hms = clock
            if let dot = clock.firstIndex(of: ".") {
                guard let f = Double("0" + clock[dot...]) else { return nil }
                fraction = f
                hms = String(clock[..<dot])
            }
            let fields = hms.split(separator: ":", omittingEmptySubsequences: false).map { Int($0) }
            guard (2...3).contains(fields.count), fields.allSatisfy({ $0 != nil }),
                  (0...23).contains(fields[0]!), (0...59).contains(fields[1]!), fields.count == 2 || (0...60).contains(fields[2]!),
                  fields.count == 3 || fraction == 0 else { return nil }
            (components.hour, components.minute, components.second) = (fields[0], fields[1], fields.count == 3 ? fields[2] : 0)
        } else {
            (components.hour, components.minute, components.second) = (0, 0, 0)
        }
        guard let date = calendar.date(from: components),
              calendar.component(.day, from: date) == components.day else { return nil }  // no 2026-02-31
        return date.timeIntervalSince1970 + fraction
    }

    /// A span such as `1h 30min`, `5 minutes`, `1.5d`, `90` (seconds): µs.
    static func span(_ text: String) -> Double? {
        let units: [String: Double] = [
            "us": 1, "usec": 1, "µs": 1, "ms": 1e3, "msec": 1e3,
            "": 1e6, "s": 1e6, "sec": 1e6, "second": 1e6, "seconds": 1e6,
            "m": 60e6, "min": 60e6, "minute": 60e6, "minutes": 60e6,
            "h": 3600e6, "hr": 3600e6, "hour": 3600e6, "hours": 3600e6,
            "d": 86_400e6, "day": 86_400e6, "days": 86_400e6,
            "w": 604_800e6, "week": 604_800e6, "weeks": 604_800e6,
            "M": 2_629_800e6, "month": 2_629_800e6, "months": 2_629_800e6,
            "y": 31_557_600e6, "year": 31_557_600e6, "years": 31_557_600e6,
        ]
        var total = 0.0, terms = 0
        var rest = Substring(text)
        while true {
            rest = rest.drop(while: { $0 == " " })
            if rest.isEmpty { break }
            let number = rest.prefix(while: { $0.isASCII && ($0.isNumber || $0 == ".") })
            guard !number.isEmpty, let n = Double(number) else { return nil }
            rest = rest.dropFirst(number.count).drop(while: { $0 == " " })
            let unit = rest.prefix(while: { $0.isLetter })
            guard let scale = units[String(unit)] else { return nil }
            rest = rest.dropFirst(unit.count)
            total += n * scale
            terms += 1
        }
        return terms > 0 ? total : nil
    }
}
