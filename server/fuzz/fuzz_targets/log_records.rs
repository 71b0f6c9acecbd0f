//! The segment scanner on arbitrary disk bytes: it never panics, its
//! records lie inside the segment in order, and a segment rebuilt from the
//! records it found (as one chunk framed the way the writer frames it)
//! scans back to the same records.

#![no_main]

use irisd::storage::record::{append_chunk, encode_record, scan_segment, LogKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = LogKey::from_secret(&[1; 32]);
    let scan = scan_segment(data, &key);
    assert!(scan.valid_end <= data.len());
    let mut previous_end = 0;
    for (offset, _) in &scan.records {
        assert!(*offset >= previous_end && *offset < data.len(), "records are in order and inside the segment");
        previous_end = *offset;
    }
    if let Some(newer) = &scan.unsupported {
        // The scan stops at a newer build's chunk (or one sealed with
        // another key): nothing read past it.
        assert!(scan.records.iter().all(|(offset, _)| *offset < newer.offset));
    }
    let mut records = Vec::new();
    for (_, record) in &scan.records {
        encode_record(record, &mut records);
    }
    let mut rebuilt = Vec::new();
    if !records.is_empty() {
        append_chunk(&key, &mut rebuilt, 1, &records);
    }
    let again = scan_segment(&rebuilt, &key);
    assert!(again.corrupt.is_empty() && again.torn_tail.is_none());
    let records: Vec<_> = scan.records.into_iter().map(|(_, record)| record).collect();
    let records_again: Vec<_> = again.records.into_iter().map(|(_, record)| record).collect();
    assert_eq!(records, records_again);
});
