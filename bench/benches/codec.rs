use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iris_protocol::frames::{Deliver, Send};
use iris_protocol::{encode_into, Frame, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for payload_bytes in [150usize, 4096] {
        let send = Frame::Send(Send { client_msg_id: 42, to_user: 7, after: None, payload: vec![0xA5; payload_bytes] });
        let deliver = Frame::Deliver(Deliver {
            seq: 9,
            from_user: 1,
            from_device: 2,
            server_msg_id: 3,
            sent_at_ms: 1_700_000_000_000,
            payload: vec![0x5A; payload_bytes],
        });
        group.throughput(Throughput::Elements(1));
        let mut out = Vec::with_capacity(8192);
        group.bench_with_input(BenchmarkId::new("encode_send", payload_bytes), &send, |b, frame| {
            b.iter(|| {
                out.clear();
                encode_into(black_box(frame), FRAME_BYTES_MAX_DEFAULT, &mut out).unwrap();
            })
        });
        let wire = iris_protocol::encode(&deliver, FRAME_BYTES_MAX_DEFAULT).unwrap();
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        group.bench_with_input(BenchmarkId::new("decode_deliver", payload_bytes), &wire, |b, wire| {
            b.iter(|| {
                decoder.feed(black_box(wire));
                black_box(decoder.next_frame().unwrap().unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
