//! Round trips and hostile input for the codec.

use iris_protocol::frames::*;
use iris_protocol::{encode, DecodeError, ErrorCode, Frame, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};

fn all_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello { token: "tok".into(), resume_after_seq: 42 }),
        Frame::Welcome(Welcome { user_id: 7, device_id: 2, shard: 1, epoch: 3, last_seq: 99 }),
        Frame::Redirect(Redirect { epoch: 1, address: "127.0.0.1".into(), port: 7701 }),
        Frame::ShardMapRequest(ShardMapRequest {}),
        Frame::ShardMap(ShardMap {
            epoch: 5,
            nodes: vec![NodeEntry { node_id: 0, address: "::1".into(), shard_ports: vec![7700, 7701] }],
            slots: (0..4096).map(|i| SlotOwner { node: 0, shard: (i % 2) as u16 }).collect(),
        }),
        Frame::Send(Send { client_msg_id: 1, to_user: 2, after: None, payload: vec![0xAB; 1000] }),
        Frame::Ack(Ack { client_msg_id: 1, server_msg_id: u64::MAX }),
        Frame::Deliver(Deliver {
            seq: 3,
            from_user: 4,
            from_device: 5,
            server_msg_id: 6,
            sent_at_ms: 1_700_000_000_000,
            payload: b"hello".to_vec(),
        }),
        Frame::DeliveryAck(DeliveryAck { up_to_seq: 10 }),
        Frame::Error(Error { code: 8, message: "no".into(), retry_after_ms: 5, client_msg_id: Some(9) }),
        Frame::Ping(Ping { nonce: 11 }),
        Frame::Pong(Pong { nonce: 12 }),
        Frame::RemoveDevice(RemoveDevice { device_id: 3 }),
        Frame::DeviceRemoved(DeviceRemoved { device_id: 3 }),
        Frame::PresenceSubscribe(PresenceSubscribe { users: vec![1, 2, u64::MAX] }),
        Frame::PresenceUnsubscribe(PresenceUnsubscribe { users: vec![2] }),
        Frame::PresencePrivacy(PresencePrivacy { privacy: PRIVACY_CONTACTS }),
        Frame::Presence(Presence { user: 2, state: PRESENCE_OFFLINE, last_seen_ms: 1_700_000_000_000 }),
        Frame::Typing(Typing { to_user: 9, active: true }),
        Frame::TypingNotice(TypingNotice { from_user: 9, from_device: 2, active: false }),
    ]
}

#[test]
fn every_frame_round_trips_even_when_fed_one_byte_at_a_time() {
    let frames = all_frames();
    let mut wire = Vec::new();
    for frame in &frames {
        wire.extend(encode(frame, FRAME_BYTES_MAX_DEFAULT).unwrap());
    }
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut decoded = Vec::new();
    for byte in &wire {
        decoder.feed(std::slice::from_ref(byte));
        while let Some(frame) = decoder.next_frame().unwrap() {
            decoded.push(frame);
        }
    }
    assert_eq!(decoded, frames);
    assert_eq!(decoder.buffered_bytes(), 0);
}

#[test]
fn oversized_length_prefix_is_refused_before_the_body_arrives() {
    let mut decoder = FrameDecoder::new(1024);
    decoder.feed(&(1025u32).to_le_bytes());
    let error = decoder.next_frame().unwrap_err();
    assert_eq!(error, DecodeError::FrameTooLarge { length: 1025, limit: 1024 });
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
}

#[test]
fn encoding_refuses_a_frame_over_the_limit() {
    let frame = Frame::Send(Send { client_msg_id: 1, to_user: 2, after: None, payload: vec![0; 2048] });
    assert!(encode(&frame, 1024).is_err());
}

#[test]
fn unknown_kind_and_version_are_typed_errors() {
    let mut good = encode(&Frame::Ping(Ping { nonce: 1 }), FRAME_BYTES_MAX_DEFAULT).unwrap();
    good[5] = 200;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    decoder.feed(&good);
    assert_eq!(decoder.next_frame().unwrap_err(), DecodeError::UnknownFrameKind(200));

    let mut bad_version = encode(&Frame::Ping(Ping { nonce: 1 }), FRAME_BYTES_MAX_DEFAULT).unwrap();
    bad_version[4] = 9;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    decoder.feed(&bad_version);
    assert_eq!(decoder.next_frame().unwrap_err().code(), ErrorCode::UnsupportedVersion);
}

#[test]
fn a_truncated_body_inside_a_valid_header_is_bad_frame() {
    // A Send whose String/Vec pointers point outside the body must not validate.
    let wire =
        encode(&Frame::Send(Send { client_msg_id: 1, to_user: 2, after: None, payload: vec![7; 64] }), 4096).unwrap();
    let body_len = wire.len() - 6;
    let mut cut = Vec::new();
    let short = (body_len / 2) as u32 + 2;
    cut.extend_from_slice(&short.to_le_bytes());
    cut.extend_from_slice(&wire[4..4 + short as usize]);
    let mut decoder = FrameDecoder::new(4096);
    decoder.feed(&cut);
    assert_eq!(decoder.next_frame().unwrap_err().code(), ErrorCode::BadFrame);
}

/// Seeded garbage: the decoder must return frames or typed errors, never panic.
#[test]
fn random_garbage_never_panics() {
    let seed: u64 = std::env::var("IRIS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1215);
    println!("seed = {seed}");
    let mut state = seed;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let templates: Vec<Vec<u8>> = all_frames().iter().map(|f| encode(f, FRAME_BYTES_MAX_DEFAULT).unwrap()).collect();
    let mut errors = 0;
    for round in 0..20_000 {
        let mut bytes = templates[round % templates.len()].clone();
        // Flip a few bytes of the body, keeping the header so the body is validated.
        for _ in 0..(1 + next() % 4) {
            let index = 6 + (next() as usize) % (bytes.len() - 6).max(1);
            if index < bytes.len() {
                bytes[index] ^= (next() & 0xFF) as u8 | 1;
            }
        }
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        decoder.feed(&bytes);
        if decoder.next_frame().is_err() {
            errors += 1;
        }
    }
    // Corrupting pointers and lengths must be caught at least some of the time.
    assert!(errors > 0, "no corruption was detected at all");
}
