//! The data directory: its layout file, the per-shard log directories and
//! boot counters, and reading segments at start.
//!
//! ```text
//! <data-dir>/layout.toml            format_version, shard_count, slot_count
//! <data-dir>/log.key                the secret that seals chunk markers (32 bytes, 0600)
//! <data-dir>/shard-<k>/message-ids  first message sequence not yet reserved (u64, text)
//! <data-dir>/shard-<k>/seq-floor    no device seq below it, after damage (u64, text; optional)
//! <data-dir>/shard-<k>/seg-<n>.log  log segments, n ascending
//! ```
//!
//! This runs before the shards serve, with plain blocking file I/O.

use super::record::{scan_segment, LogKey, RecordError, Scan};
use std::path::{Path, PathBuf};

/// Format version of the data directory written by this build. Version 2
/// logs may hold `DeviceRemoved` (type 8) and `DeviceSeen` (type 9)
/// records; version 3 adds format-3 segments, whose chunk markers
/// (`ChunkSeal`, type 10) are sealed with the directory's `log.key`, and a
/// version-3 directory always has that key. Builds that read an older
/// version only refuse a newer directory instead of skipping what they do
/// not know. An older directory is raised at open, before anything is
/// written (its key is created first): its logs are readable as they are.
/// Whenever a record type or segment format is added, this goes up.
pub const DATA_FORMAT_VERSION: u32 = 3;

/// The oldest data directory version this build opens (and raises to
/// [`DATA_FORMAT_VERSION`]).
pub const DATA_FORMAT_VERSION_MIN: u32 = 1;

/// Errors opening a data directory. All are printed and irisd exits; none
/// modifies the directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The layout file does not parse.
    #[error("{path}: not a valid layout file: {detail}")]
    BadLayout {
        /// The file.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// Written by an incompatible version.
    #[error(
        "data directory {dir} has format version {found}; this irisd reads versions \
         {DATA_FORMAT_VERSION_MIN} to {DATA_FORMAT_VERSION}. \
         Nothing was modified: use the irisd release that wrote it, or another --data-dir"
    )]
    IncompatibleVersion {
        /// The directory.
        dir: PathBuf,
        /// Version found.
        found: u32,
    },
    /// Written with another shard count.
    #[error(
        "data directory {dir} was written by {found} shards but {configured} were requested. \
         Moving slots between shard logs is not supported yet; nothing was modified. \
         Start it with: irisd serve --data-dir {dir} --shards {found}"
    )]
    ShardCountMismatch {
        /// The directory.
        dir: PathBuf,
        /// Shard count in the layout file.
        found: u16,
        /// Shard count requested.
        configured: u16,
    },
    /// A segment holds a certified chunk this build cannot read: the
    /// directory was written by a newer irisd.
    #[error(
        "{segment}: offset {offset}: {detail}, in a chunk whose commit marker is valid: written by a newer irisd. \
         Recovery stopped instead of skipping it; use that release or a newer one"
    )]
    NewerRecords {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the record.
        offset: usize,
        /// What is not understood.
        detail: String,
    },
    /// A segment's chunks check but their seals do not: `log.key` is not
    /// the key this log was written with.
    #[error(
        "{segment}: offset {offset}: the chunk's checksum holds but its seal is not made with {key}: \
         the key file is not the one this log was written with. Recovery stopped; nothing was modified. \
         Put back the data directory's own log.key"
    )]
    WrongLogKey {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the chunk.
        offset: usize,
        /// The key file.
        key: PathBuf,
    },
    /// The layout says the logs are sealed but the key file is gone.
    #[error(
        "{0}: missing. The logs of this data directory are sealed with it and cannot be read without it; \
         nothing was modified. Restore it from a backup of the data directory"
    )]
    MissingLogKey(PathBuf),
    /// Log directories exist but no layout file: not a directory this build wrote.
    #[error("data directory {0} holds shard logs but no layout.toml; refusing to guess its layout")]
    MissingLayout(PathBuf),
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    format_version: u32,
    shard_count: u16,
    slot_count: u32,
}

/// Checks (or, for a new directory, writes) the layout file.
pub fn open_layout(data_dir: &Path, shard_count: u16) -> Result<(), LayoutError> {
    let path = data_dir.join("layout.toml");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayoutError::Io { path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let version = text
                .parse::<toml::Table>()
                .ok()
                .and_then(|table| table.get("format_version").and_then(|v| v.as_integer()));
            if let Some(version) = version {
                if !(i64::from(DATA_FORMAT_VERSION_MIN)..=i64::from(DATA_FORMAT_VERSION)).contains(&version) {
                    return Err(LayoutError::IncompatibleVersion {
                        dir: data_dir.to_path_buf(),
                        found: u32::try_from(version).unwrap_or(u32::MAX),
                    });
                }
            }
            let layout: LayoutFile = toml::from_str(&text)
                .map_err(|e| LayoutError::BadLayout { path: path.clone(), detail: e.to_string() })?;
            if layout.shard_count != shard_count {
                return Err(LayoutError::ShardCountMismatch {
                    dir: data_dir.to_path_buf(),
                    found: layout.shard_count,
                    configured: shard_count,
                });
            }
            if layout.slot_count != iris_shard_map::SLOT_COUNT {
                return Err(LayoutError::BadLayout { path, detail: format!("slot_count {}", layout.slot_count) });
            }
            if layout.format_version < DATA_FORMAT_VERSION {
                // Raised before this build writes a record an older one
                // cannot read (an older irisd then refuses the directory);
                // the key first, so a version-3 directory always has one.
                create_log_key(data_dir)?;
                tracing::info!(from = layout.format_version, to = DATA_FORMAT_VERSION, "data directory format raised");
                let layout = LayoutFile { format_version: DATA_FORMAT_VERSION, ..layout };
                write_layout(&path, &layout)?;
            }
            load_log_key(data_dir).map(drop)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if shard_dir(data_dir, 0).exists() {
                return Err(LayoutError::MissingLayout(data_dir.to_path_buf()));
            }
            create_log_key(data_dir)?;
            let layout =
                LayoutFile { format_version: DATA_FORMAT_VERSION, shard_count, slot_count: iris_shard_map::SLOT_COUNT };
            write_layout(&path, &layout)
        }
        Err(error) => Err(io(&path)(error)),
    }
}

fn write_layout(path: &Path, layout: &LayoutFile) -> Result<(), LayoutError> {
    let text = toml::to_string(layout)
        .map_err(|e| LayoutError::BadLayout { path: path.to_path_buf(), detail: e.to_string() })?;
    crate::files::write_private(path, text.as_bytes())
        .map_err(|source| LayoutError::Io { path: path.to_path_buf(), source })
}

/// Path of the data directory's log key.
pub fn log_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("log.key")
}

/// Creates the data directory's log key (random, 0600, synced) unless it exists.
fn create_log_key(data_dir: &Path) -> Result<(), LayoutError> {
    let path = log_key_path(data_dir);
    crate::files::load_or_create_secret(&path, true).map(drop).map_err(|source| LayoutError::Io { path, source })
}

/// Reads the data directory's log key (it exists once [`open_layout`] has run).
pub fn load_log_key(data_dir: &Path) -> Result<LogKey, LayoutError> {
    let path = log_key_path(data_dir);
    match crate::files::load_or_create_secret(&path, false) {
        Ok((secret, _)) => Ok(LogKey::from_secret(&secret)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(LayoutError::MissingLogKey(path)),
        Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
            Err(LayoutError::BadLayout { path, detail: error.to_string() })
        }
        Err(source) => Err(LayoutError::Io { path, source }),
    }
}

/// The log directory of shard `shard`.
pub fn shard_dir(data_dir: &Path, shard: u16) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// Path of segment `segment` in `dir`.
pub fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("seg-{segment:016}.log"))
}

/// Message sequences reserved per call of [`reserve_message_ids`]: 2^30.
/// A start takes one block, so a crash loop uses up the 2^54 sequences only
/// after 2^24 (16 million) starts; a running shard takes the next block when
/// half of its current one is used (about every 9 minutes at a million
/// messages per second), one small file write and two syncs.
pub const MESSAGE_ID_BLOCK: u64 = 1 << 30;

/// Reserves the next `count` message sequences of a shard, durably, and
/// returns them; creates the shard directory on first start. The file
/// `<shard-dir>/message-ids` holds the first sequence not yet reserved. A
/// directory written by an older build has only a `boot` counter, whose ids
/// were `boot mod 2^14` in bits 40..54: sequences then start above every one
/// those boots could have used.
/// `at_least` is where the caller's current block ends (0 at start): a
/// block reserved by an attempt whose directory sync failed is stepped over,
/// never handed out twice.
pub fn reserve_message_ids(dir: &Path, count: u64, at_least: u64) -> Result<std::ops::Range<u64>, LayoutError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayoutError::Io { path, source }
    };
    crate::files::create_private_directory(dir).map_err(io(dir))?;
    let path = dir.join("message-ids");
    let start = match read_number(&path)? {
        Some(next) => next,
        None => match read_number(&dir.join("boot"))? {
            Some(boot) => (boot.min(1 << 14) + 1) << 40,
            // Sequence 0 is never used, so no server_msg_id is 0.
            None => 1,
        },
    };
    let start = start.max(at_least);
    let end = start.checked_add(count).filter(|end| *end <= 1 << crate::shard::core::MESSAGE_SEQUENCE_BITS);
    let Some(end) = end else {
        return Err(LayoutError::BadLayout {
            path,
            detail: "this shard has used every server_msg_id of its layout (2^54); it cannot start".into(),
        });
    };
    crate::files::write_private(&path, end.to_string().as_bytes()).map_err(io(&path))?;
    Ok(start..end)
}

/// The number a small state file of a shard holds, `None` if it does not exist.
fn read_number(path: &Path) -> Result<Option<u64>, LayoutError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|e| LayoutError::BadLayout { path: path.to_path_buf(), detail: e.to_string() }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(LayoutError::Io { path: path.to_path_buf(), source: error }),
    }
}

/// Seqs a reservation ([`reserve_seqs`]) reaches beyond the highest seq
/// of the shard's devices: 2^30. Only the busiest device moves it, so a
/// shard rewrites the file once per 2^29 messages to one device at most.
pub const SEQ_BLOCK: u64 = 1 << 30;

/// The end of the seq reservation of the shard in `dir`: no device of the
/// shard has ever been given a seq at or above it. `None` for a directory
/// that no build with reservations has started yet.
pub fn seq_reserved(dir: &Path) -> Result<Option<u64>, LayoutError> {
    read_number(&dir.join("seq-reserved"))
}

/// Extends the seq reservation of the shard in `dir` to at least `end`,
/// durably (a private file written through a synced temporary); returns
/// the reservation's end, which never goes down. It writes even when the
/// file already reaches `end`: an earlier attempt may have renamed its
/// file into place and then failed to sync the directory, and a number
/// read back from the page cache is not a reservation.
pub fn reserve_seqs(dir: &Path, end: u64) -> Result<u64, LayoutError> {
    let path = dir.join("seq-reserved");
    let end = read_number(&path)?.unwrap_or(0).max(end);
    crate::files::write_private(&path, end.to_string().as_bytes())
        .map_err(|source| LayoutError::Io { path: path.clone(), source })?;
    Ok(end)
}

/// The seq below which no device of the shard in `dir` starts: the
/// number in `<shard-dir>/seq-floor` (0 if absent). When this start's
/// recovery skipped damaged chunks or cut a torn tail (`damaged`), it is
/// first raised to `damage_floor` and written durably before the shard
/// serves. A damaged chunk may have held a device's newest seq, so
/// `damage_floor` must be above every seq handed out before: the end of the
/// seq reservation ([`seq_reserved`]) as this start found it. For a
/// directory written before reservations existed the caller passes the
/// first message sequence this start reserved, which is above them unless
/// a device got more seqs than its shard ever reserved message ids
/// (docs/storage.md, "Damage"). Kept once raised: the next start may no
/// longer see the damage (its segment reclaimed) while clients have seen
/// seqs from above it.
pub fn seq_floor(dir: &Path, damaged: bool, damage_floor: u64) -> Result<u64, LayoutError> {
    let path = dir.join("seq-floor");
    let io = |source| LayoutError::Io { path: path.clone(), source };
    let floor = read_number(&path)?.unwrap_or(0);
    if !damaged || damage_floor <= floor {
        return Ok(floor);
    }
    crate::files::write_private(&path, damage_floor.to_string().as_bytes()).map_err(io)?;
    Ok(damage_floor)
}

/// Deletes leftover spare segments (`seg-N.prep`), then reads and scans
/// every segment of `dir` (a log sealed with `key`, the data directory's
/// key at `key_path`), ascending, one at a time, handing each scan to
/// `visit` before the next is read (so only one segment is in memory). A
/// torn tail is cut off its file (after a crash it holds only
/// unacknowledged writes), but only once the seq floor has been raised to
/// `damage_floor` ([`seq_floor`]): bit rot in the last chunks looks the
/// same, and once cut, the damage could not be seen again. Corrupt records
/// are reported by the scan and skipped. Returns the last segment and its
/// valid end, if there is any segment.
pub fn scan_segments(
    dir: &Path,
    key: &LogKey,
    key_path: &Path,
    damage_floor: u64,
    mut visit: impl FnMut(u64, &Scan),
) -> Result<Option<(u64, usize)>, LayoutError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayoutError::Io { path, source }
    };
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("seg-") && name.ends_with(".prep") {
            // A spare segment (zeros only) prepared before a restart; the writer prepares a new one.
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            continue;
        }
        if let Some(number) = name.strip_prefix("seg-").and_then(|rest| rest.strip_suffix(".log")) {
            if let Ok(number) = number.parse::<u64>() {
                numbers.push(number);
            }
        }
    }
    numbers.sort_unstable();
    let mut last = None;
    for (position, number) in numbers.iter().enumerate() {
        let path = segment_path(dir, *number);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let scan = scan_segment(&bytes, key);
        drop(bytes);
        if let Some(span) = &scan.unsupported {
            // Before anything of this segment is cut or replayed.
            if span.error == RecordError::WrongKey {
                return Err(LayoutError::WrongLogKey {
                    segment: path,
                    offset: span.offset,
                    key: key_path.to_path_buf(),
                });
            }
            return Err(LayoutError::NewerRecords {
                segment: path,
                offset: span.offset,
                detail: span.error.to_string(),
            });
        }
        for span in &scan.corrupt {
            tracing::error!(
                segment = %path.display(), offset = span.offset, length = span.length, error = %span.error,
                "corrupt log record skipped"
            );
        }
        if let Some(tail) = &scan.torn_tail {
            let is_last = position + 1 == numbers.len();
            tracing::warn!(
                segment = %path.display(), offset = tail.offset, length = tail.length, error = %tail.error,
                last = is_last, "torn tail truncated at the last valid record"
            );
            seq_floor(dir, true, damage_floor)?;
            let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            file.set_len(scan.valid_end as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        visit(*number, &scan);
        last = Some((*number, scan.valid_end));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format_version(dir: &Path) -> i64 {
        let text = std::fs::read_to_string(dir.join("layout.toml")).unwrap();
        text.parse::<toml::Table>().unwrap()["format_version"].as_integer().unwrap()
    }

    #[test]
    fn an_older_directory_is_raised_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        open_layout(dir.path(), 2).unwrap();
        assert_eq!(format_version(dir.path()), i64::from(DATA_FORMAT_VERSION));
        let layout = |version: u32| {
            let file = LayoutFile { format_version: version, shard_count: 2, slot_count: iris_shard_map::SLOT_COUNT };
            std::fs::write(dir.path().join("layout.toml"), toml::to_string(&file).unwrap()).unwrap();
        };
        for older in DATA_FORMAT_VERSION_MIN..DATA_FORMAT_VERSION {
            layout(older);
            open_layout(dir.path(), 2).unwrap();
            assert_eq!(
                format_version(dir.path()),
                i64::from(DATA_FORMAT_VERSION),
                "{older} raised before anything is written"
            );
        }
        layout(DATA_FORMAT_VERSION + 1);
        let error = open_layout(dir.path(), 2).unwrap_err();
        assert!(
            matches!(error, LayoutError::IncompatibleVersion { found, .. } if found == DATA_FORMAT_VERSION + 1),
            "{error}"
        );
        assert_eq!(
            format_version(dir.path()),
            i64::from(DATA_FORMAT_VERSION + 1),
            "a refused directory is not modified"
        );
    }

    #[test]
    fn recovery_refuses_a_segment_a_newer_build_wrote() {
        use crate::storage::record::{append_chunk, encode_unknown_record};
        let dir = tempfile::tempdir().unwrap();
        let mut file = Vec::new();
        let mut records = Vec::new();
        encode_unknown_record(200, &mut records);
        let key = LogKey::from_secret(&[4; 32]);
        append_chunk(&key, &mut file, 1, &records);
        let before = file.clone();
        std::fs::write(segment_path(dir.path(), 1), &file).unwrap();
        let mut visited = 0;
        let error = scan_segments(dir.path(), &key, Path::new("log.key"), 1, |_, _| visited += 1).unwrap_err();
        assert!(matches!(error, LayoutError::NewerRecords { .. }), "{error}");
        assert!(error.to_string().contains("newer irisd"), "{error}");
        assert_eq!(visited, 0, "nothing of it replayed");
        assert_eq!(std::fs::read(segment_path(dir.path(), 1)).unwrap(), before, "nor cut");
    }

    #[test]
    fn a_directory_gets_its_key_before_its_version_and_never_runs_without_it() {
        use crate::storage::record::{append_chunk, encode_record, DeviceRegistered, Record};
        let dir = tempfile::tempdir().unwrap();
        open_layout(dir.path(), 1).unwrap();
        let key = load_log_key(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(log_key_path(dir.path())).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // A log written with it reads back; with another key it is refused, untouched.
        let logs = dir.path().join("shard-0");
        std::fs::create_dir(&logs).unwrap();
        let mut records = Vec::new();
        encode_record(&Record::DeviceRegistered(DeviceRegistered { user: 1, device: 1 }), &mut records);
        let mut file = Vec::new();
        append_chunk(&key, &mut file, 1, &records);
        std::fs::write(segment_path(&logs, 1), &file).unwrap();
        let key_path = log_key_path(dir.path());
        let mut read = 0;
        scan_segments(&logs, &key, &key_path, 1, |_, scan| read += scan.records.len()).unwrap();
        assert_eq!(read, 1);
        let other = LogKey::from_secret(&[5; 32]);
        let error = scan_segments(&logs, &other, &key_path, 1, |_, _| panic!("nothing replayed")).unwrap_err();
        assert!(matches!(error, LayoutError::WrongLogKey { offset: 0, .. }), "{error}");
        assert_eq!(std::fs::read(segment_path(&logs, 1)).unwrap(), file, "nor cut");
        // The key lost: refused at open, not replaced by a new one.
        std::fs::remove_file(log_key_path(dir.path())).unwrap();
        let error = open_layout(dir.path(), 1).unwrap_err();
        assert!(matches!(error, LayoutError::MissingLogKey(_)), "{error}");
        assert!(!log_key_path(dir.path()).exists());
        // An older directory (version 2 had no key) gets one as it is raised.
        for older in DATA_FORMAT_VERSION_MIN..DATA_FORMAT_VERSION {
            let _ = std::fs::remove_file(log_key_path(dir.path()));
            let file = LayoutFile { format_version: older, shard_count: 1, slot_count: iris_shard_map::SLOT_COUNT };
            std::fs::write(dir.path().join("layout.toml"), toml::to_string(&file).unwrap()).unwrap();
            open_layout(dir.path(), 1).unwrap();
            assert!(load_log_key(dir.path()).is_ok(), "version {older}");
        }
    }

    #[test]
    fn the_seq_floor_rises_on_damage_only_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(seq_floor(dir.path(), false, 100).unwrap(), 0, "no damage, no floor");
        assert_eq!(seq_floor(dir.path(), true, 100).unwrap(), 100);
        assert_eq!(seq_floor(dir.path(), false, 500).unwrap(), 100, "kept when the damage is gone");
        assert_eq!(seq_floor(dir.path(), true, 50).unwrap(), 100, "never lowered");
        assert_eq!(seq_floor(dir.path(), true, 900).unwrap(), 900);
        std::fs::write(dir.path().join("seq-floor"), "x").unwrap();
        assert!(matches!(seq_floor(dir.path(), false, 0), Err(LayoutError::BadLayout { .. })));
    }

    #[test]
    fn the_seq_reservation_only_grows_and_is_rewritten_every_time() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(seq_reserved(dir.path()).unwrap(), None, "a directory from before reservations");
        assert_eq!(reserve_seqs(dir.path(), 500).unwrap(), 500);
        assert_eq!(seq_reserved(dir.path()).unwrap(), Some(500));
        assert_eq!(reserve_seqs(dir.path(), 200).unwrap(), 500, "never lowered");
        assert_eq!(reserve_seqs(dir.path(), 9_000).unwrap(), 9_000);
        // A reservation that is already in the file is written again: the
        // write fails here (a directory stands in the temporary's place),
        // so the caller learns that it holds nothing durable.
        std::fs::create_dir(dir.path().join(".seq-reserved.tmp")).unwrap();
        assert!(reserve_seqs(dir.path(), 100).is_err());
        std::fs::remove_dir(dir.path().join(".seq-reserved.tmp")).unwrap();
        std::fs::write(dir.path().join("seq-reserved"), "x").unwrap();
        assert!(matches!(seq_reserved(dir.path()), Err(LayoutError::BadLayout { .. })));
        assert!(reserve_seqs(dir.path(), 100).is_err());
    }

    #[test]
    fn a_torn_tail_is_cut_only_after_the_floor_is_raised() {
        use crate::storage::record::{append_chunk, encode_record, DeviceRegistered, Record};
        let dir = tempfile::tempdir().unwrap();
        let key = LogKey::from_secret(&[7; 32]);
        let mut records = Vec::new();
        encode_record(&Record::DeviceRegistered(DeviceRegistered { user: 1, device: 1 }), &mut records);
        let mut file = Vec::new();
        append_chunk(&key, &mut file, 1, &records);
        file.extend_from_slice(&[0xA5; 40]);
        std::fs::write(segment_path(dir.path(), 1), &file).unwrap();
        // The floor cannot be written (a directory stands in its place):
        // the start fails and the tail stays, to be seen again.
        std::fs::create_dir(dir.path().join("seq-floor")).unwrap();
        let key_path = Path::new("log.key");
        assert!(scan_segments(dir.path(), &key, key_path, 1000, |_, _| {}).is_err());
        assert_eq!(std::fs::read(segment_path(dir.path(), 1)).unwrap(), file, "cut before the floor was raised");
        std::fs::remove_dir(dir.path().join("seq-floor")).unwrap();
        scan_segments(dir.path(), &key, key_path, 1000, |_, _| {}).unwrap();
        assert_eq!(std::fs::read(segment_path(dir.path(), 1)).unwrap().len(), file.len() - 40);
        assert_eq!(seq_floor(dir.path(), false, 0).unwrap(), 1000);
    }

    #[test]
    fn message_id_reservations_never_overlap_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let first = reserve_message_ids(dir.path(), 100, 0).unwrap();
        let second = reserve_message_ids(dir.path(), 100, 0).unwrap();
        assert_eq!(first, 1..101);
        assert_eq!(second.start, first.end, "a restart continues after the last reservation");
        // A caller whose block ends further on (its last write half failed).
        let third = reserve_message_ids(dir.path(), 100, 500).unwrap();
        assert_eq!(third, 500..600);
    }

    #[test]
    fn an_older_boot_counter_is_stepped_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("boot"), "7").unwrap();
        let ids = reserve_message_ids(dir.path(), 10, 0).unwrap();
        // Boot 7 of the old layout used sequences below 8 << 40.
        assert_eq!(ids.start, 8 << 40);
    }

    #[test]
    fn an_exhausted_id_space_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("message-ids"), ((1u64 << 54) - 5).to_string()).unwrap();
        assert!(reserve_message_ids(dir.path(), 10, 0).unwrap_err().to_string().contains("every server_msg_id"));
    }
}
