//! The frame decoder on arbitrary request-stream bytes, fed in arbitrary
//! pieces: it never panics, never returns a frame longer than its bound,
//! and every frame it returns encodes back to bytes that decode to itself.

#![no_main]

use iris_protocol::{encode, FrameDecoder, FRAME_BYTES_MAX_FLOOR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_FLOOR);
    for chunk in bytes.chunks(piece) {
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let encoded = encode(&frame, FRAME_BYTES_MAX_FLOOR).expect("a decoded frame re-encodes");
                    let mut again = FrameDecoder::new(FRAME_BYTES_MAX_FLOOR);
                    again.feed(&encoded);
                    assert_eq!(again.next_frame().expect("round trip"), Some(frame));
                }
                Ok(None) => break,
                // The stream is unusable after an error, as on the server.
                Err(_) => return,
            }
        }
    }
});
