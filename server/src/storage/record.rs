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
//! protocol) and is validated with checked access on read. A run of zero
//! bytes where a header should be marks the end of a segment, as does the end
//! of the file (segments written by the earlier O_DIRECT writer end in a
//! zero-padded block).

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
}

impl Record {
    fn type_byte(&self) -> u8 {
        match self {
            Record::DeviceRegistered(_) => 1,
            Record::MessageStored(_) => 2,
            Record::Acknowledged(_) => 3,
            Record::DeviceState(_) => 4,
            Record::DedupEntry(_) => 5,
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
}

/// Scans a whole segment. Never panics on any input.
pub fn scan_segment(bytes: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut position = 0;
    while position < bytes.len() {
        let rest = &bytes[position..];
        if is_zero_padding(rest) {
            break;
        }
        match decode_record(rest) {
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

/// Whether `bytes` is the zero padding that ends a segment. A zero header
/// is enough: the writer never leaves anything but zeros after its last
/// record, and a torn tail that happens to start with zeros is handled as
/// an end (its records were never acknowledged).
fn is_zero_padding(bytes: &[u8]) -> bool {
    let header = &bytes[..bytes.len().min(RECORD_HEADER_BYTES)];
    header.iter().all(|byte| *byte == 0)
}

/// Offset of the next record at or after `from` that decodes.
fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut position = from;
    while position + RECORD_HEADER_BYTES <= bytes.len() {
        let window = &bytes[position..];
        let found = window.windows(2).position(|pair| pair == magic)?;
        position += found;
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

    #[test]
    fn records_round_trip_and_zero_padding_ends_the_segment() {
        let (mut bytes, _) = segment(10);
        let end = bytes.len();
        bytes.resize(end + 4096, 0);
        let scan = scan_segment(&bytes);
        assert_eq!(scan.records.len(), 10);
        assert_eq!(scan.valid_end, end);
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());
        assert_eq!(scan.records[3].1, sample(3));
    }

    #[test]
    fn a_torn_tail_is_reported_and_excluded() {
        let (bytes, offsets) = segment(5);
        let cut = offsets[4] + 20;
        let scan = scan_segment(&bytes[..cut]);
        assert_eq!(scan.records.len(), 4);
        assert_eq!(scan.valid_end, offsets[4]);
        assert_eq!(scan.torn_tail.as_ref().map(|t| t.offset), Some(offsets[4]));
    }

    #[test]
    fn a_flipped_bit_in_the_middle_skips_one_record() {
        let (mut bytes, offsets) = segment(6);
        bytes[offsets[2] + RECORD_HEADER_BYTES + 5] ^= 0x10;
        let scan = scan_segment(&bytes);
        assert_eq!(scan.records.len(), 5);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].offset, offsets[2]);
        assert_eq!(scan.corrupt[0].error, RecordError::Checksum);
        assert!(scan.torn_tail.is_none());
        assert_eq!(scan.valid_end, bytes.len());
        // A corrupt length field: the scanner resynchronises on the next record.
        let (mut bytes, offsets) = segment(6);
        bytes[offsets[1] + 6] = 0xFF;
        let scan = scan_segment(&bytes);
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
            let scan = scan_segment(&bytes);
            assert!(scan.valid_end <= bytes.len());
        }
    }
}
