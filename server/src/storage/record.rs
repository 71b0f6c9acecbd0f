//! The on-disk record format of the shard log, and the scanner that reads it
//! back. Pure: bytes in, records out.
//!
//! ```text
//! +-----------+---------+------------+---------------+---------------+------------------+
//! | magic u16 | type u8 | version u8 | length u32 LE | crc32c u32 LE | body (length)    |
//! +-----------+---------+------------+---------------+---------------+------------------+
//! ```
//!
//! `crc32c` covers type, version, length and body. The body is the rkyv
//! archive of the struct named by `type` (same pinned format as the wire
//! protocol) and is validated with checked access on read.
//!
//! Segments of format 3 (written by this build) group records into the
//! write chunks they were synced in: a segment opens with a
//! [`SegmentHeader`] and every chunk ends with a [`ChunkSeal`] commit
//! marker holding the chunk's start offset, the CRC32C of all its bytes and
//! a tag keyed with the data directory's secret [`LogKey`]. The scanner
//! keeps a chunk's records only once its marker checks, so a chunk the
//! crash cut short, or bytes a failed write left behind, never become
//! records, and after a damaged chunk it resumes only at a later chunk whose
//! marker certifies it (never inside one). The key is what makes that hold
//! against a client: a payload crafted to look like a whole chunk (records,
//! then a marker naming the offset it lands at) has a valid checksum but
//! cannot have a valid tag, so damage around it never makes it a chunk.
//!
//! Segments of earlier builds stay readable: format 2 ended chunks with a
//! [`ChunkEnd`] marker (checksum only), format 1 had records only and is
//! read record by record.

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

/// First two bytes of every record ("IR").
pub const RECORD_MAGIC: u16 = 0x5249;
/// Record format version written by this build.
pub const RECORD_VERSION: u8 = 1;
/// Bytes of the record header.
pub const RECORD_HEADER_BYTES: usize = 12;
/// Largest body accepted on read: above any frame limit irisd allows
/// (16 MiB) plus the record's own fields, so a corrupt length cannot make
/// recovery allocate without bound.
pub const RECORD_BODY_BYTES_MAX: u32 = 17 * 1024 * 1024;

/// One recipient device of a stored message and the seq it got.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientSeq {
    /// Device of the recipient user.
    pub device: u32,
    /// Seq assigned in that device's mailbox.
    pub seq: u64,
}

/// A device registered on its first Hello.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceRegistered {
    /// User.
    pub user: u64,
    /// Device.
    pub device: u32,
}

/// A message stored in the mailboxes of `recipients` (all devices of `to_user`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MessageStored {
    /// Server-wide id.
    pub server_msg_id: u64,
    /// Sending user.
    pub from_user: u64,
    /// Sending device.
    pub from_device: u32,
    /// The sender's id, kept so a retry after a crash is recognised.
    pub client_msg_id: u64,
    /// Acceptance time, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// Recipient user.
    pub to_user: u64,
    /// Device mailboxes and seqs.
    pub recipients: Vec<RecipientSeq>,
    /// Opaque payload.
    pub payload: Vec<u8>,
}

/// A device acknowledged everything up to `up_to_seq`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Acknowledged {
    /// User.
    pub user: u64,
    /// Device.
    pub device: u32,
    /// Cumulative acknowledgement.
    pub up_to_seq: u64,
}

/// Checkpoint of one device, written at the head of every new segment so
/// older segments can be deleted once their messages are delivered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// User.
    pub user: u64,
    /// Device.
    pub device: u32,
    /// Highest seq assigned.
    pub last_seq: u64,
    /// Highest seq acknowledged.
    pub acked_seq: u64,
}

/// Checkpoint of one recipient-side dedup entry.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DedupEntry {
    /// Sending user.
    pub from_user: u64,
    /// Sending device.
    pub from_device: u32,
    /// The sender's id.
    pub client_msg_id: u64,
    /// The id it was stored under.
    pub server_msg_id: u64,
}

/// A device was removed (by itself, by another device of its user, or for
/// an overflowing mailbox); also written into checkpoints for every removed
/// device remembered, so the id can never register again.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceRemoved {
    /// User.
    pub user: u64,
    /// Device.
    pub device: u32,
    /// The user's removal count at this removal: of the removals replayed,
    /// those with the highest ordinals are the ones remembered.
    pub ordinal: u64,
}

/// When a device was last seen: written when a session of it starts
/// (`online`) and when its last session ends (not `online`), and carried
/// forward by compaction, so that the inactivity expiry (and last seen)
/// survive restarts.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceSeen {
    /// User.
    pub user: u64,
    /// Device.
    pub device: u32,
    /// Seconds since the Unix epoch.
    pub at_s: u64,
    /// Whether a session of it had just started (it was online from then).
    pub online: bool,
}

/// The first record of every format-2 segment.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`SEGMENT_FORMAT`].
    pub format: u32,
    /// The segment's number (its file name says the same).
    pub segment: u64,
}

/// The commit marker that ended every write chunk of a format-2 segment
/// (earlier builds; read, never written).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkEnd {
    /// Offset in the segment of the chunk's first byte.
    pub start: u64,
    /// CRC32C of the chunk's bytes from `start` up to this marker.
    pub crc: u32,
}

/// The commit marker that ends every write chunk of a format-3 segment.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkSeal {
    /// Offset in the segment of the chunk's first byte.
    pub start: u64,
    /// CRC32C of the chunk's bytes from `start` up to this marker.
    pub crc: u32,
    /// [`LogKey::tag`] of `start` and `crc`.
    pub tag: u64,
}

/// Segment format written by this build: records in chunks that end in
/// [`ChunkSeal`] markers, after a [`SegmentHeader`]. Format 2 ended chunks
/// in [`ChunkEnd`] markers; format 1 had no header and no markers.
pub const SEGMENT_FORMAT: u32 = 3;

/// The oldest chunked segment format: [`ChunkEnd`] markers, no key.
const SEGMENT_FORMAT_UNKEYED: u32 = 2;

/// Bytes of a [`LogKey`]'s secret.
pub const LOG_KEY_BYTES: usize = 32;

/// The data directory's secret that certifies chunk markers (HMAC-SHA256,
/// truncated to 64 bits). It never leaves the server: clients cannot
/// compute a tag, so no payload can pass for a chunk.
#[derive(Clone)]
pub struct LogKey(ring::hmac::Key);

impl LogKey {
    /// The key with this secret.
    pub fn from_secret(secret: &[u8; LOG_KEY_BYTES]) -> LogKey {
        LogKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The tag a marker for the chunk at `start` with checksum `crc` carries.
    pub fn tag(&self, start: u64, crc: u32) -> u64 {
        let mut message = [0u8; 12];
        message[..8].copy_from_slice(&start.to_le_bytes());
        message[8..].copy_from_slice(&crc.to_le_bytes());
        let tag = ring::hmac::sign(&self.0, &message);
        u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("a SHA-256 tag has 32 bytes"))
    }
}

/// A fixed key for unit tests.
#[cfg(test)]
pub(crate) fn test_key() -> LogKey {
    LogKey::from_secret(&[9; LOG_KEY_BYTES])
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey(..)")
    }
}

/// Any record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// Type 1.
    DeviceRegistered(DeviceRegistered),
    /// Type 2.
    MessageStored(MessageStored),
    /// Type 3.
    Acknowledged(Acknowledged),
    /// Type 4.
    DeviceState(DeviceState),
    /// Type 5.
    DedupEntry(DedupEntry),
    /// Type 6 (framing: never in [`Scan::records`]).
    ChunkEnd(ChunkEnd),
    /// Type 7 (framing: never in [`Scan::records`]).
    SegmentHeader(SegmentHeader),
    /// Type 8.
    DeviceRemoved(DeviceRemoved),
    /// Type 9.
    DeviceSeen(DeviceSeen),
    /// Type 10 (framing: never in [`Scan::records`]).
    ChunkSeal(ChunkSeal),
    /// Type 11: a compaction's copy of a stored message (same fields). It is
    /// not a new message: its dedup key, long out of the recipient-side
    /// window, does not enter it again.
    MessageCopied(MessageStored),
}

impl Record {
    /// The message of a `MessageStored` or a `MessageCopied`.
    pub fn message(&self) -> Option<&MessageStored> {
        match self {
            Record::MessageStored(message) | Record::MessageCopied(message) => Some(message),
            _ => None,
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Record::DeviceRegistered(_) => 1,
            Record::MessageStored(_) => 2,
            Record::Acknowledged(_) => 3,
            Record::DeviceState(_) => 4,
            Record::DedupEntry(_) => 5,
            Record::ChunkEnd(_) => 6,
            Record::SegmentHeader(_) => 7,
            Record::DeviceRemoved(_) => 8,
            Record::DeviceSeen(_) => 9,
            Record::ChunkSeal(_) => 10,
            Record::MessageCopied(_) => 11,
        }
    }
}

/// Appends the encoding of `record` to `out`.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    let body = match record {
        Record::DeviceRegistered(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::MessageStored(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::Acknowledged(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::DeviceState(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::DedupEntry(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::ChunkEnd(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::SegmentHeader(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::DeviceRemoved(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::DeviceSeen(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::ChunkSeal(r) => rkyv::to_bytes::<rancor::Error>(r),
        Record::MessageCopied(r) => rkyv::to_bytes::<rancor::Error>(r),
    }
    // Serializing plain structs into a growable buffer fails only if memory
    // allocation fails, which aborts anyway.
    .expect("rkyv serialization of a log record");
    let length = u32::try_from(body.len()).expect("record body fits in u32");
    assert!(length <= RECORD_BODY_BYTES_MAX, "record body of {length} bytes exceeds the format limit");
    let type_byte = record.type_byte();
    let crc = record_crc(type_byte, RECORD_VERSION, length, &body);
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.push(type_byte);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
}

fn record_crc(type_byte: u8, version: u8, length: u32, body: &[u8]) -> u32 {
    let mut header = [0u8; 6];
    header[0] = type_byte;
    header[1] = version;
    header[2..6].copy_from_slice(&length.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&header), body)
}

/// Appends a record as a newer build might write one: a type byte this
/// build does not know, with a valid checksum (for tests).
#[cfg(test)]
pub(crate) fn encode_unknown_record(type_byte: u8, out: &mut Vec<u8>) {
    let body = [7u8; 20];
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.push(type_byte);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&record_crc(type_byte, RECORD_VERSION, body.len() as u32, &body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Why bytes at some offset are not a record.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// No magic where a header should be.
    #[error("no record header")]
    BadMagic,
    /// The length field is above the format limit.
    #[error("record length {0} exceeds the limit")]
    TooLong(u32),
    /// The record runs past the end of the data.
    #[error("record runs past the end of the segment")]
    Truncated,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// Checksum fine, but a type or version this build does not read.
    #[error("unsupported record type {type_byte} version {version}")]
    Unsupported {
        /// Type byte.
        type_byte: u8,
        /// Version byte.
        version: u8,
    },
    /// Checksum fine, but the body does not validate.
    #[error("record body does not validate: {0}")]
    Malformed(String),
    /// Records that no valid commit marker ends: a chunk cut short, or the
    /// marker itself damaged.
    #[error("records without a valid chunk commit marker")]
    UncommittedChunk,
    /// A segment header or commit marker where none belongs, or a header
    /// of a format this build does not read.
    #[error("misplaced or unsupported segment framing record")]
    Framing,
    /// After damage, too many marker-shaped candidates to check: the rest
    /// of the segment is not read (and kept on disk).
    #[error("resynchronisation abandoned: too many candidate chunk markers")]
    ResyncAbandoned,
    /// A chunk whose checksum holds but whose marker's tag does not, where
    /// a chunk of this log must start: the log was written with another
    /// key (the data directory's `log.key` is not the one it was written with).
    #[error("chunk marker not signed with this data directory's log key")]
    WrongKey,
    /// The first chunk cannot be read and a later one certifies only as a
    /// chunk of a format-2 segment (no key): the segment's format is not
    /// known, so it is neither replayed past the damage nor cut.
    #[error("damaged segment header, and only unkeyed (format 2) chunks after it: not read further")]
    UnknownFormat,
}

/// Decodes the record at the start of `bytes`; returns it and its total size.
pub fn decode_record(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated);
    }
    let field = |range: std::ops::Range<usize>| &bytes[range];
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != RECORD_MAGIC {
        return Err(RecordError::BadMagic);
    }
    let (type_byte, version) = (bytes[2], bytes[3]);
    let length = u32::from_le_bytes(field(4..8).try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(field(8..12).try_into().expect("4 bytes"));
    if length > RECORD_BODY_BYTES_MAX {
        return Err(RecordError::TooLong(length));
    }
    let total = RECORD_HEADER_BYTES + length as usize;
    if bytes.len() < total {
        return Err(RecordError::Truncated);
    }
    let body = &bytes[RECORD_HEADER_BYTES..total];
    if record_crc(type_byte, version, length, body) != crc {
        return Err(RecordError::Checksum);
    }
    if version != RECORD_VERSION {
        return Err(RecordError::Unsupported { type_byte, version });
    }
    let malformed = |e: rancor::Error| RecordError::Malformed(e.to_string());
    let record = match type_byte {
        1 => Record::DeviceRegistered(rkyv::from_bytes::<DeviceRegistered, _>(body).map_err(malformed)?),
        2 => Record::MessageStored(rkyv::from_bytes::<MessageStored, _>(body).map_err(malformed)?),
        3 => Record::Acknowledged(rkyv::from_bytes::<Acknowledged, _>(body).map_err(malformed)?),
        4 => Record::DeviceState(rkyv::from_bytes::<DeviceState, _>(body).map_err(malformed)?),
        5 => Record::DedupEntry(rkyv::from_bytes::<DedupEntry, _>(body).map_err(malformed)?),
        6 => Record::ChunkEnd(rkyv::from_bytes::<ChunkEnd, _>(body).map_err(malformed)?),
        7 => Record::SegmentHeader(rkyv::from_bytes::<SegmentHeader, _>(body).map_err(malformed)?),
        8 => Record::DeviceRemoved(rkyv::from_bytes::<DeviceRemoved, _>(body).map_err(malformed)?),
        9 => Record::DeviceSeen(rkyv::from_bytes::<DeviceSeen, _>(body).map_err(malformed)?),
        10 => Record::ChunkSeal(rkyv::from_bytes::<ChunkSeal, _>(body).map_err(malformed)?),
        11 => Record::MessageCopied(rkyv::from_bytes::<MessageStored, _>(body).map_err(malformed)?),
        _ => return Err(RecordError::Unsupported { type_byte, version }),
    };
    Ok((record, total))
}

/// A stretch of a segment that was not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptSpan {
    /// Offset of the first bad byte.
    pub offset: usize,
    /// Bytes skipped.
    pub length: usize,
    /// What was wrong at `offset`.
    pub error: RecordError,
}

/// What a scan of one segment found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid records with their offsets, in order.
    pub records: Vec<(usize, Record)>,
    /// Offset just past the last valid record: where appending resumes.
    pub valid_end: usize,
    /// Invalid stretches followed by valid records (skipped).
    pub corrupt: Vec<CorruptSpan>,
    /// Invalid bytes after the last valid record, if any (a torn tail).
    pub torn_tail: Option<CorruptSpan>,
    /// A certified chunk holding a record (or a segment header) of a type,
    /// version or format this build does not read: written by a newer
    /// irisd. The scan stops there; recovery must refuse to start rather
    /// than skip it (skipping would silently drop acknowledged state, e.g.
    /// a device removal).
    pub unsupported: Option<CorruptSpan>,
}

/// Frames `records` (encoded records) as the write chunk that starts at
/// offset `start` of segment `segment`, appending it to `out`: a segment
/// header first if the chunk opens the segment, then the records, then the
/// commit marker over all of it, sealed with `key`.
pub fn frame_chunk(key: &LogKey, segment: u64, start: u64, records: &[u8], out: &mut Vec<u8>) {
    let chunk_start = out.len();
    if start == 0 {
        encode_record(&Record::SegmentHeader(SegmentHeader { format: SEGMENT_FORMAT, segment }), out);
    }
    out.extend_from_slice(records);
    let crc = crc32c::crc32c(&out[chunk_start..]);
    encode_record(&Record::ChunkSeal(ChunkSeal { start, crc, tag: key.tag(start, crc) }), out);
}

/// Appends the chunk `records` to `file`, a segment's bytes so far, framed
/// as the writer frames it there (tests and the simulation keep segments
/// as byte vectors).
pub fn append_chunk(key: &LogKey, file: &mut Vec<u8>, segment: u64, records: &[u8]) {
    let start = file.len() as u64;
    frame_chunk(key, segment, start, records, file);
}

/// Encoded sizes of the framing records (fixed: every field is fixed-size).
struct FramingSizes {
    /// A [`ChunkSeal`] record.
    seal: usize,
    /// A [`SegmentHeader`] record.
    header: usize,
    /// A [`ChunkEnd`] record (format 2).
    unkeyed_marker: usize,
}

fn framing_sizes() -> &'static FramingSizes {
    static SIZES: std::sync::OnceLock<FramingSizes> = std::sync::OnceLock::new();
    SIZES.get_or_init(|| {
        let size = |record: Record| {
            let mut out = Vec::new();
            encode_record(&record, &mut out);
            out.len()
        };
        FramingSizes {
            seal: size(Record::ChunkSeal(ChunkSeal { start: 0, crc: 0, tag: 0 })),
            header: size(Record::SegmentHeader(SegmentHeader { format: SEGMENT_FORMAT, segment: 0 })),
            unkeyed_marker: size(Record::ChunkEnd(ChunkEnd { start: 0, crc: 0 })),
        }
    })
}

/// Bytes [`frame_chunk`] adds to a chunk: its commit marker, plus the
/// segment header when the chunk opens its segment.
pub fn chunk_framing_bytes(opens_segment: bool) -> usize {
    let sizes = framing_sizes();
    if opens_segment {
        sizes.seal + sizes.header
    } else {
        sizes.seal
    }
}

/// How the chunks of a segment are certified.
#[derive(Clone, Copy)]
enum Framing<'k> {
    /// Format 3: [`ChunkSeal`] markers tagged with this key.
    Keyed(&'k LogKey),
    /// Format 2: [`ChunkEnd`] markers, checksum only.
    Unkeyed,
}

impl Framing<'_> {
    /// The segment format this framing reads.
    fn format(self) -> u32 {
        match self {
            Framing::Keyed(_) => SEGMENT_FORMAT,
            Framing::Unkeyed => SEGMENT_FORMAT_UNKEYED,
        }
    }

    /// The type byte and encoded size of its marker record.
    fn marker(self) -> (u8, usize) {
        match self {
            Framing::Keyed(_) => {
                (Record::ChunkSeal(ChunkSeal { start: 0, crc: 0, tag: 0 }).type_byte(), framing_sizes().seal)
            }
            Framing::Unkeyed => {
                (Record::ChunkEnd(ChunkEnd { start: 0, crc: 0 }).type_byte(), framing_sizes().unkeyed_marker)
            }
        }
    }
}

/// Scans a whole segment of a log keyed with `key`. Never panics on any input.
pub fn scan_segment(bytes: &[u8], key: &LogKey) -> Scan {
    match decode_record(bytes) {
        Ok((Record::SegmentHeader(header), _)) if header.format == SEGMENT_FORMAT_UNKEYED => {
            scan_chunks(bytes, Framing::Unkeyed, false)
        }
        // Format 3; any other format is refused (a newer one) or damage,
        // when the first chunk is read.
        Ok((Record::SegmentHeader(_), _)) => scan_chunks(bytes, Framing::Keyed(key), false),
        // Format 1: a segment of an earlier build starts with a plain record.
        Ok(_) => scan_records(bytes),
        // A first chunk cut short or damaged: this build's rules, so nothing
        // that no keyed marker certifies is read.
        Err(_) => scan_chunks(bytes, Framing::Keyed(key), true),
    }
}

/// Formats 2 and 3: chunk by chunk, keeping a chunk's records only once its
/// commit marker checks. `headerless`: the segment's header could not be
/// read, so `framing` is a guess (this build's).
fn scan_chunks(bytes: &[u8], framing: Framing<'_>, headerless: bool) -> Scan {
    let mut scan = Scan::default();
    let mut position = 0;
    loop {
        match read_chunk(bytes, position, framing) {
            Ok((records, end)) => {
                scan.records.extend(records);
                position = end;
                scan.valid_end = end;
            }
            Err(ChunkError::Unsupported(span) | ChunkError::Forged(span)) => {
                scan.unsupported = Some(span);
                break;
            }
            Err(ChunkError::Damaged(error)) => {
                let Some(last_nonzero) = bytes[position.min(bytes.len())..].iter().rposition(|byte| *byte != 0) else {
                    // Only zeros (or nothing) left: the end of the segment.
                    break;
                };
                let next = next_certified_chunk(bytes, position, framing);
                // A segment of an earlier build whose header is damaged
                // has no keyed chunk to find: keep its bytes, unread,
                // rather than cut them off as a torn tail.
                let unkeyed_found = || {
                    headerless
                        && scan.valid_end == 0
                        && !matches!(next_certified_chunk(bytes, position, Framing::Unkeyed), Err(Resync::NoneFound))
                };
                match next {
                    Ok(next) => {
                        scan.corrupt.push(CorruptSpan { offset: position, length: next - position, error });
                        position = next;
                    }
                    Err(Resync::NoneFound) if !unkeyed_found() => {
                        let length = last_nonzero + 1;
                        scan.torn_tail = Some(CorruptSpan { offset: position, length, error });
                        break;
                    }
                    Err(resync) => {
                        let length = bytes.len() - position;
                        let error = match resync {
                            Resync::GaveUp => RecordError::ResyncAbandoned,
                            Resync::NoneFound => RecordError::UnknownFormat,
                        };
                        scan.corrupt.push(CorruptSpan { offset: position, length, error });
                        break;
                    }
                }
            }
        }
    }
    scan
}

/// The records of the chunk that starts at `start` and the offset just past
/// its commit marker, if the marker is there and certifies it.
fn read_chunk(bytes: &[u8], start: usize, framing: Framing<'_>) -> Result<(Vec<(usize, Record)>, usize), ChunkError> {
    let mut records = Vec::new();
    let mut position = start;
    // The first record this build cannot read, if any: the chunk is then
    // reported as unsupported once (and only if) its marker certifies it.
    let mut unsupported = None;
    loop {
        let rest = bytes.get(position..).unwrap_or_default();
        if rest.len() >= RECORD_HEADER_BYTES && is_zero_padding(rest) {
            return Err(ChunkError::Damaged(RecordError::UncommittedChunk));
        }
        let (record, size) = match decode_record(rest) {
            Ok(decoded) => decoded,
            // The checksum held: the length field is good, so the record
            // can be stepped over to reach the chunk's marker.
            Err(error @ RecordError::Unsupported { .. }) => {
                let length = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
                unsupported.get_or_insert(CorruptSpan {
                    offset: position,
                    length: RECORD_HEADER_BYTES + length,
                    error,
                });
                position += RECORD_HEADER_BYTES + length;
                continue;
            }
            // Records that simply stop: a chunk whose end never arrived.
            Err(RecordError::Truncated | RecordError::BadMagic) if position > start => {
                return Err(ChunkError::Damaged(RecordError::UncommittedChunk))
            }
            Err(other) => return Err(ChunkError::Damaged(other)),
        };
        let (marker_start, crc, signed) = match (record, framing) {
            (Record::ChunkSeal(seal), Framing::Keyed(key)) => {
                (seal.start, seal.crc, key.tag(seal.start, seal.crc) == seal.tag)
            }
            (Record::ChunkEnd(end), Framing::Unkeyed) => (end.start, end.crc, true),
            (Record::ChunkSeal(_) | Record::ChunkEnd(_), _) => return Err(ChunkError::Damaged(RecordError::Framing)),
            (Record::SegmentHeader(header), _) => {
                if position != 0 || (header.format != framing.format() && header.format <= SEGMENT_FORMAT) {
                    return Err(ChunkError::Damaged(RecordError::Framing));
                }
                if header.format > SEGMENT_FORMAT {
                    let error = RecordError::Unsupported { type_byte: header_type_byte(), version: RECORD_VERSION };
                    unsupported.get_or_insert(CorruptSpan { offset: position, length: size, error });
                }
                position += size;
                continue;
            }
            (record, _) => {
                records.push((position, record));
                position += size;
                continue;
            }
        };
        let checks = marker_start == start as u64 && position > start && crc32c::crc32c(&bytes[start..position]) == crc;
        return match (checks, signed, unsupported) {
            (false, _, _) => Err(ChunkError::Damaged(RecordError::UncommittedChunk)),
            // Bytes that pass every check but the key: crafted, or another log's.
            (true, false, _) => Err(ChunkError::Forged(CorruptSpan {
                offset: start,
                length: position + size - start,
                error: RecordError::WrongKey,
            })),
            (true, true, Some(span)) => Err(ChunkError::Unsupported(span)),
            (true, true, None) => Ok((records, position + size)),
        };
    }
}

/// Why a chunk was not read.
enum ChunkError {
    /// Damaged, torn or never finished: skipped (or cut off at the tail).
    Damaged(RecordError),
    /// Certified, but written by a newer build: recovery must stop.
    Unsupported(CorruptSpan),
    /// Whole and checksummed, but its marker's tag is not this key's. Where
    /// a chunk must start, the log was written with another key and
    /// recovery must stop; found while resynchronising, it is a payload
    /// crafted to pass for a chunk and is skipped.
    Forged(CorruptSpan),
}

fn header_type_byte() -> u8 {
    Record::SegmentHeader(SegmentHeader { format: 0, segment: 0 }).type_byte()
}

/// The start of the first chunk after `from` that a commit marker
/// certifies. Only a marker can say where a chunk starts: resuming at any
/// record magic could land inside a chunk (on a record a client embedded in
/// a payload) or on what a failed write left behind. A stale marker names a
/// start at or before `from` (the chunk that replaced it began there), so
/// it is never taken; a chunk a client crafted inside a payload fails the
/// key, so it is never taken either (in format 3; format 2 segments, which
/// have no key, keep that limit: docs/storage.md).
fn next_certified_chunk(bytes: &[u8], from: usize, framing: Framing<'_>) -> Result<usize, Resync> {
    let (type_byte, marker_bytes) = framing.marker();
    let mut pattern = [0u8; 4];
    pattern[..2].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    pattern[2] = type_byte;
    pattern[3] = RECORD_VERSION;
    let finder = memchr::memmem::Finder::new(&pattern);
    let marker_body = marker_bytes - RECORD_HEADER_BYTES;
    // Bytes that candidate chunks may make the scan walk before it gives up:
    // marker-shaped bytes in payloads must not make recovery quadratic.
    let mut budget = bytes.len().saturating_mul(RESYNC_WORK_FACTOR);
    let mut search = from + 1;
    while search < bytes.len() {
        let Some(found) = finder.find(&bytes[search..]) else { break };
        let marker = search + found;
        search = marker + 1;
        // A marker has one length: anything else is not checksummed at all.
        let length =
            bytes.get(marker + 4..marker + 8).map(|field| u32::from_le_bytes(field.try_into().expect("4 bytes")));
        if length != Some(marker_body as u32) {
            continue;
        }
        let start = match decode_record(&bytes[marker..]) {
            Ok((Record::ChunkSeal(seal), _)) => seal.start,
            Ok((Record::ChunkEnd(end), _)) => end.start,
            _ => continue,
        };
        let Ok(start) = usize::try_from(start) else { continue };
        if start <= from || start >= marker {
            continue;
        }
        if budget < marker - start {
            return Err(Resync::GaveUp);
        }
        budget -= marker - start;
        // Only up to this marker: the walk costs what was charged.
        let end = (marker + marker_bytes).min(bytes.len());
        // A certified chunk of a newer build is a place to resume too: the
        // scan then stops there and reports it.
        if matches!(read_chunk(&bytes[..end], start, framing), Ok(_) | Err(ChunkError::Unsupported(_))) {
            return Ok(start);
        }
    }
    Err(Resync::NoneFound)
}

/// Why no chunk to resume at was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// No certified chunk follows: the rest is a torn tail.
    NoneFound,
    /// Too many candidates to check: the rest is left unread (and, unlike a
    /// torn tail, never cut off the file, since it may hold acknowledged
    /// chunks).
    GaveUp,
}

/// How many times its own length one resynchronisation may walk through
/// candidate chunks; genuine damage needs one or two candidates.
const RESYNC_WORK_FACTOR: usize = 64;

/// Format 1: record by record; after an invalid stretch the scan resumes at
/// the next record magic whose record decodes.
fn scan_records(bytes: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut position = 0;
    while position < bytes.len() {
        let rest = &bytes[position..];
        if is_zero_padding(rest) {
            break;
        }
        match decode_record(rest) {
            Ok((Record::ChunkEnd(_) | Record::ChunkSeal(_) | Record::SegmentHeader(_), size)) => position += size,
            Ok((record, size)) => {
                scan.records.push((position, record));
                position += size;
                scan.valid_end = position;
            }
            Err(error) => match next_valid_record(bytes, position + 1) {
                Some(next) => {
                    scan.corrupt.push(CorruptSpan { offset: position, length: next - position, error });
                    position = next;
                }
                None => {
                    scan.torn_tail = Some(CorruptSpan { offset: position, length: bytes.len() - position, error });
                    break;
                }
            },
        }
    }
    scan
}

/// Whether `bytes` is the zero padding that ends a format-1 segment. A zero
/// header is enough: that writer never left anything but zeros after its
/// last record, and a torn tail that happens to start with zeros is handled
/// as an end (its records were never acknowledged).
fn is_zero_padding(bytes: &[u8]) -> bool {
    let header = &bytes[..bytes.len().min(RECORD_HEADER_BYTES)];
    header.iter().all(|byte| *byte == 0)
}

/// Offset of the next record at or after `from` that decodes (format 1).
fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let finder = memchr::memmem::Finder::new(&magic);
    let mut position = from;
    while position + RECORD_HEADER_BYTES <= bytes.len() {
        position += finder.find(&bytes[position..])?;
        if decode_record(&bytes[position..]).is_ok() {
            return Some(position);
        }
        position += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LogKey {
        LogKey::from_secret(&[9; LOG_KEY_BYTES])
    }

    fn sample(index: u64) -> Record {
        Record::MessageStored(MessageStored {
            server_msg_id: index,
            from_user: 1,
            from_device: 2,
            client_msg_id: 100 + index,
            sent_at_ms: 5,
            to_user: 3,
            recipients: vec![RecipientSeq { device: 1, seq: index }, RecipientSeq { device: 2, seq: index }],
            payload: vec![index as u8; 40 + index as usize],
        })
    }

    fn segment(count: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for index in 0..count {
            offsets.push(bytes.len());
            encode_record(&sample(index), &mut bytes);
        }
        (bytes, offsets)
    }

    /// A format-3 segment of `chunks` chunks of `per_chunk` records, as the
    /// writer lays it out; returns it, each chunk's start and each record's offset.
    fn chunked(chunks: u64, per_chunk: u64) -> (Vec<u8>, Vec<usize>, Vec<usize>) {
        let mut header = Vec::new();
        encode_record(&Record::SegmentHeader(SegmentHeader { format: SEGMENT_FORMAT, segment: 1 }), &mut header);
        let mut file = Vec::new();
        let (mut starts, mut offsets) = (Vec::new(), Vec::new());
        for chunk in 0..chunks {
            starts.push(file.len());
            let mut records = Vec::new();
            let base = file.len() + if file.is_empty() { header.len() } else { 0 };
            for index in chunk * per_chunk..(chunk + 1) * per_chunk {
                offsets.push(base + records.len());
                encode_record(&sample(index), &mut records);
            }
            append_chunk(&key(), &mut file, 1, &records);
        }
        (file, starts, offsets)
    }

    fn ids(scan: &Scan) -> Vec<u64> {
        scan.records
            .iter()
            .map(|(_, record)| match record {
                Record::MessageStored(message) => message.server_msg_id,
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    #[test]
    fn chunks_round_trip_and_zeros_end_the_segment() {
        let (mut file, _, offsets) = chunked(4, 3);
        let end = file.len();
        file.resize(end + 8192, 0);
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), (0..12).collect::<Vec<_>>());
        assert_eq!(scan.records.iter().map(|(offset, _)| *offset).collect::<Vec<_>>(), offsets);
        assert_eq!(scan.valid_end, end);
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());
    }

    #[test]
    fn a_chunk_cut_anywhere_contributes_no_record() {
        let (file, starts, _) = chunked(3, 4);
        // Every cut inside the last chunk, up to one byte short of its marker's end.
        for cut in starts[2] + 1..file.len() {
            let mut torn = file[..cut].to_vec();
            torn.resize(cut + 4096, 0);
            let scan = scan_segment(&torn, &key());
            assert_eq!(ids(&scan), (0..8).collect::<Vec<_>>(), "cut at {cut}");
            assert_eq!(scan.valid_end, starts[2]);
            assert!(scan.corrupt.is_empty(), "cut at {cut}: nothing after it is certified");
            assert_eq!(scan.torn_tail.as_ref().map(|tail| tail.offset), Some(starts[2]));
        }
    }

    #[test]
    fn bytes_a_failed_write_left_behind_are_never_replayed() {
        // Chunk A is durable; chunk B (long) failed at A's end and left its
        // bytes; chunk C (short) then went to the same offset and is durable.
        let (a, _, _) = chunked(1, 2);
        let mut b_records = Vec::new();
        for index in 100..110 {
            encode_record(&sample(index), &mut b_records);
        }
        let mut c_records = Vec::new();
        encode_record(&sample(50), &mut c_records);
        let mut with_b = a.clone();
        append_chunk(&key(), &mut with_b, 1, &b_records);
        let mut file = a.clone();
        append_chunk(&key(), &mut file, 1, &c_records);
        let c_end = file.len();
        file.extend_from_slice(&with_b[c_end..]);
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), vec![0, 1, 50], "B's records after C must not come back");
        assert_eq!(scan.valid_end, c_end);
        assert!(scan.corrupt.is_empty());
        assert!(scan.torn_tail.is_some());
    }

    #[test]
    fn a_zeroed_block_mid_segment_is_reported_and_later_chunks_are_kept() {
        let (mut file, starts, _) = chunked(5, 6);
        // Zero a stretch inside chunk 2 that covers a record header.
        let from = starts[2] + 40;
        file[from..from + 300].fill(0);
        let scan = scan_segment(&file, &key());
        let expected: Vec<u64> = (0..12).chain(18..30).collect();
        assert_eq!(ids(&scan), expected, "chunks 3 and 4 survive a zeroed block in chunk 2");
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!((scan.corrupt[0].offset, scan.corrupt[0].length), (starts[2], starts[3] - starts[2]));
        assert!(scan.torn_tail.is_none());
        assert_eq!(scan.valid_end, file.len());
    }

    #[test]
    fn marker_shaped_bytes_after_damage_cost_a_bounded_walk_and_never_a_truncation() {
        let (mut file, starts, _) = chunked(2, 2);
        // Damage in chunk 1, then thousands of well-formed markers naming a
        // start just after the damage (as a crafted payload could hold).
        file[starts[1] + 3] ^= 0xFF;
        for _ in 0..4000 {
            encode_record(&Record::ChunkSeal(ChunkSeal { start: starts[1] as u64 + 1, crc: 7, tag: 0 }), &mut file);
        }
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), vec![0, 1]);
        assert!(scan.torn_tail.is_none(), "the unread rest must not be cut off as a torn tail");
        assert_eq!(scan.corrupt.last().map(|span| span.error.clone()), Some(RecordError::ResyncAbandoned));
    }

    #[test]
    fn a_flipped_bit_loses_its_chunk_only() {
        let (mut file, starts, offsets) = chunked(3, 4);
        file[offsets[5] + RECORD_HEADER_BYTES + 3] ^= 0x04;
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), (0..4).chain(8..12).collect::<Vec<_>>());
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].offset, starts[1]);
    }

    #[test]
    fn records_round_trip_and_zero_padding_ends_the_segment() {
        let (mut bytes, _) = segment(10);
        let end = bytes.len();
        bytes.resize(end + 4096, 0);
        let scan = scan_segment(&bytes, &key());
        assert_eq!(scan.records.len(), 10);
        assert_eq!(scan.valid_end, end);
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());
        assert_eq!(scan.records[3].1, sample(3));
    }

    #[test]
    fn a_torn_tail_is_reported_and_excluded() {
        let (bytes, offsets) = segment(5);
        let cut = offsets[4] + 20;
        let scan = scan_segment(&bytes[..cut], &key());
        assert_eq!(scan.records.len(), 4);
        assert_eq!(scan.valid_end, offsets[4]);
        assert_eq!(scan.torn_tail.as_ref().map(|t| t.offset), Some(offsets[4]));
    }

    #[test]
    fn a_flipped_bit_in_the_middle_skips_one_record() {
        let (mut bytes, offsets) = segment(6);
        bytes[offsets[2] + RECORD_HEADER_BYTES + 5] ^= 0x10;
        let scan = scan_segment(&bytes, &key());
        assert_eq!(scan.records.len(), 5);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].offset, offsets[2]);
        assert_eq!(scan.corrupt[0].error, RecordError::Checksum);
        assert!(scan.torn_tail.is_none());
        assert_eq!(scan.valid_end, bytes.len());
        // A corrupt length field: the scanner resynchronises on the next record.
        let (mut bytes, offsets) = segment(6);
        bytes[offsets[1] + 6] = 0xFF;
        let scan = scan_segment(&bytes, &key());
        assert_eq!(scan.records.len(), 5);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x5EEDu64;
        for round in 0..2000 {
            let (mut bytes, _) = segment(1 + round % 4);
            for _ in 0..(1 + round % 7) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let index = (state >> 33) as usize % bytes.len();
                bytes[index] = (state >> 20) as u8;
            }
            let scan = scan_segment(&bytes, &key());
            assert!(scan.valid_end <= bytes.len());
        }
    }

    #[test]
    fn a_certified_chunk_of_a_newer_build_stops_the_scan_instead_of_being_skipped() {
        let (mut file, _, _) = chunked(1, 3);
        let newer_at = file.len();
        let mut records = Vec::new();
        encode_record(&sample(3), &mut records);
        encode_unknown_record(42, &mut records);
        append_chunk(&key(), &mut file, 1, &records);
        let mut later = Vec::new();
        encode_record(&sample(4), &mut later);
        append_chunk(&key(), &mut file, 1, &later);
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), vec![0, 1, 2], "nothing from the newer chunk or after it");
        let unsupported = scan.unsupported.expect("reported, not skipped");
        assert!(unsupported.offset > newer_at);
        assert!(matches!(unsupported.error, RecordError::Unsupported { type_byte: 42, .. }));
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());

        // The same record in a chunk whose marker does not certify it (a
        // torn write) is damage, not a newer build's data.
        let mut torn = file.clone();
        torn[newer_at + 14] ^= 1;
        let scan = scan_segment(&torn, &key());
        assert!(scan.unsupported.is_none());
        assert_eq!(ids(&scan), vec![0, 1, 2, 4]);
    }

    #[test]
    fn a_segment_header_of_a_newer_format_stops_the_scan() {
        let mut records = Vec::new();
        encode_record(&sample(0), &mut records);
        let mut chunk = Vec::new();
        encode_record(&Record::SegmentHeader(SegmentHeader { format: SEGMENT_FORMAT + 1, segment: 1 }), &mut chunk);
        chunk.extend_from_slice(&records);
        let crc = crc32c::crc32c(&chunk);
        encode_record(&Record::ChunkSeal(ChunkSeal { start: 0, crc, tag: key().tag(0, crc) }), &mut chunk);
        let scan = scan_segment(&chunk, &key());
        assert!(scan.records.is_empty());
        assert!(scan.unsupported.is_some());
    }

    /// Appends `records` as a format-2 chunk (checksum-only marker), as
    /// earlier builds wrote them.
    fn append_unkeyed_chunk(file: &mut Vec<u8>, records: &[u8]) {
        let start = file.len();
        if start == 0 {
            encode_record(&Record::SegmentHeader(SegmentHeader { format: SEGMENT_FORMAT_UNKEYED, segment: 1 }), file);
        }
        file.extend_from_slice(records);
        let crc = crc32c::crc32c(&file[start..]);
        encode_record(&Record::ChunkEnd(ChunkEnd { start: start as u64, crc }), file);
    }

    /// Bytes a client could send as a payload: a whole chunk, checksummed,
    /// that removes device (7, 1), for the segment offset `start`.
    fn crafted_chunk(start: u64, unkeyed: bool) -> Vec<u8> {
        let mut chunk = Vec::new();
        encode_record(&Record::DeviceRemoved(DeviceRemoved { user: 7, device: 1, ordinal: 1 }), &mut chunk);
        let crc = crc32c::crc32c(&chunk);
        let marker = match unkeyed {
            true => Record::ChunkEnd(ChunkEnd { start, crc }),
            // The best a client can do: it cannot compute the tag.
            false => Record::ChunkSeal(ChunkSeal { start, crc, tag: u64::from(crc) }),
        };
        encode_record(&marker, &mut chunk);
        chunk
    }

    /// A segment of three chunks whose middle one holds a message carrying
    /// `crafted` (made for the offset it lands at), with that chunk's first
    /// record damaged so that the scan has to resynchronise over it.
    fn segment_with_crafted_payload(unkeyed: bool) -> Vec<u8> {
        let build = |start: u64| {
            let mut file = Vec::new();
            let append = |file: &mut Vec<u8>, records: &[u8]| match unkeyed {
                true => append_unkeyed_chunk(file, records),
                false => append_chunk(&key(), file, 1, records),
            };
            let mut records = Vec::new();
            encode_record(&sample(0), &mut records);
            append(&mut file, &records);
            let mut records = Vec::new();
            encode_record(&sample(1), &mut records);
            let mut message = sample(2);
            if let Record::MessageStored(stored) = &mut message {
                stored.payload = crafted_chunk(start, unkeyed);
            }
            encode_record(&message, &mut records);
            let damaged_at = file.len();
            append(&mut file, &records);
            let mut records = Vec::new();
            encode_record(&sample(3), &mut records);
            append(&mut file, &records);
            (file, damaged_at)
        };
        // Where the crafted bytes land does not depend on what they say.
        let (probe, _) = build(0);
        let pattern = crafted_chunk(0, unkeyed);
        let at = probe.windows(pattern.len()).position(|window| window == pattern).expect("the payload is in the file");
        let (mut file, damaged_at) = build(at as u64);
        file[damaged_at + 20] ^= 0x01;
        file
    }

    #[test]
    fn a_chunk_a_client_crafted_in_a_payload_never_passes_for_one() {
        let file = segment_with_crafted_payload(false);
        let scan = scan_segment(&file, &key());
        assert_eq!(ids(&scan), vec![0, 3], "the damaged chunk goes, the crafted one inside it is not taken");
        assert!(scan.unsupported.is_none() && scan.torn_tail.is_none());
        // Format 2 had no key: there the same payload becomes a record (the
        // limit this format closes, kept for segments earlier builds wrote).
        let file = segment_with_crafted_payload(true);
        let scan = scan_segment(&file, &key());
        assert!(
            scan.records.iter().any(|(_, record)| matches!(record, Record::DeviceRemoved(_))),
            "format 2 resynchronises onto the crafted chunk"
        );
    }

    #[test]
    fn a_log_read_with_another_key_stops_rather_than_reading_as_damage() {
        let (file, _, _) = chunked(3, 2);
        let scan = scan_segment(&file, &LogKey::from_secret(&[1; LOG_KEY_BYTES]));
        assert!(scan.records.is_empty());
        assert_eq!(scan.unsupported.map(|span| span.error), Some(RecordError::WrongKey));
        assert!(scan.torn_tail.is_none() && scan.corrupt.is_empty(), "nothing is cut or skipped");
    }

    #[test]
    fn segments_of_earlier_builds_stay_readable() {
        let mut file = Vec::new();
        for chunk in 0..3u64 {
            let mut records = Vec::new();
            encode_record(&sample(chunk), &mut records);
            append_unkeyed_chunk(&mut file, &records);
        }
        assert_eq!(ids(&scan_segment(&file, &key())), vec![0, 1, 2]);
        // Its header damaged, the segment's format is unknown: nothing past
        // the damage is replayed, and nothing is cut.
        file[20] ^= 0x01;
        let scan = scan_segment(&file, &key());
        assert!(scan.records.is_empty());
        assert!(scan.torn_tail.is_none());
        assert_eq!(scan.corrupt.last().map(|span| span.error.clone()), Some(RecordError::UnknownFormat));
    }
}
