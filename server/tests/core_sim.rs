//! Deterministic, seeded, socket-free simulation of the shard message path.
//!
//! Three `ShardCore`s are wired through in-memory FIFO links (one per ordered
//! pair, like the real channels) whose deliveries are interleaved at random.
//! Simulated devices send, retry with the same ids, disconnect, reconnect
//! with resume, acknowledge and pull pushes in random order. At the end every
//! acknowledged message must have reached every recipient device exactly
//! once (after seq dedup), in order per sender device. A failure prints the
//! seed; rerun one with IRIS_SIM_SEED=<seed>.

use iris_protocol::frames::{self, Frame};
use iris_shard_map::{NodeId, ShardId, SlotTable, UserId};
use irisd::auth::{Claims, TokenAuthority};
use irisd::shard::mailbox::StoreLimits;
use irisd::shard::{ConnId, CoreLimits, MemoryStore, Output, ShardCore, ShardIdentity, ShardMessage};
use std::collections::{BTreeMap, HashMap, VecDeque};

const SHARDS: u16 = 3;
const USERS: u64 = 6;
const DEVICES_PER_USER: u32 = 2;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A simulated device (the client side of the protocol).
struct Device {
    user: u64,
    device: u32,
    home: u16,
    conn: Option<ConnId>,
    /// Sends not yet acked, in send order: (client_msg_id, to_user, payload).
    pending: VecDeque<(u64, u64, Vec<u8>)>,
    next_id: u64,
    /// Next message number this device sends (payload = "user/device/number").
    next_number: u64,
    /// Highest seq processed (and the resume point).
    processed_seq: u64,
    /// Payloads received, in order, after seq dedup.
    received: Vec<String>,
}

struct Sim {
    cores: Vec<ShardCore<MemoryStore>>,
    links: HashMap<(u16, u16), VecDeque<ShardMessage>>,
    devices: Vec<Device>,
    conn_owner: HashMap<(u16, ConnId), usize>,
    next_conn: u64,
    now_ms: u64,
    authority: TokenAuthority,
    /// server_msg_id -> (payload, recipient user, sending device) of every acknowledged send.
    acked: BTreeMap<u64, (String, u64, (u64, u32))>,
    rng: Rng,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let authority = TokenAuthority::from_secret([3; 32]);
        let table = SlotTable::single_node(NodeId(0), SHARDS, 1).unwrap();
        let ports: Vec<u16> = (0..SHARDS).map(|k| 7700 + k).collect();
        let cores = (0..SHARDS)
            .map(|shard| {
                let identity = ShardIdentity {
                    node: NodeId(0),
                    shard: ShardId(shard),
                    advertised_host: "127.0.0.1".into(),
                    shard_ports: ports.clone(),
                    boot: 1,
                };
                let limits = CoreLimits {
                    dedup_entries_per_device_max: 64,
                    sends_in_flight_per_device_max: 16,
                    shard_outbox_messages_max: 1000,
                };
                let store = MemoryStore::new(StoreLimits {
                    devices_per_user_max: 5,
                    devices_per_shard_max: 1000,
                    mailbox_messages_max: 100_000,
                    mailbox_bytes_max: 1 << 30,
                    stored_dedup_entries_max: 100_000,
                });
                ShardCore::new(identity, table.clone(), authority.clone(), limits, 65536, store)
            })
            .collect();
        let mut devices = Vec::new();
        for user in 1..=USERS {
            for device in 1..=DEVICES_PER_USER {
                let home = table.home(UserId(user)).shard.0;
                devices.push(Device {
                    user,
                    device,
                    home,
                    conn: None,
                    pending: VecDeque::new(),
                    next_id: 1000,
                    next_number: 0,
                    processed_seq: 0,
                    received: Vec::new(),
                });
            }
        }
        Sim {
            cores,
            links: HashMap::new(),
            devices,
            conn_owner: HashMap::new(),
            next_conn: 1,
            now_ms: 1_700_000_000_000,
            authority,
            acked: BTreeMap::new(),
            rng: Rng(seed),
        }
    }

    fn connect(&mut self, index: usize, may_misroute: bool) {
        if self.devices[index].conn.is_some() {
            return;
        }
        // Sometimes knock on the wrong shard first: it must redirect.
        let device = &self.devices[index];
        let misroute = may_misroute && self.rng.below(4) == 0;
        let shard = if misroute { (device.home + 1) % SHARDS } else { device.home };
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let token =
            self.authority.mint(Claims { user_id: device.user, device_id: device.device, expires_at_s: u64::MAX });
        let hello = Frame::Hello(frames::Hello { token, resume_after_seq: device.processed_seq });
        self.conn_owner.insert((shard, conn), index);
        self.cores[shard as usize].on_connection(conn);
        self.cores[shard as usize].on_frame(conn, hello, self.now_ms);
        if shard == self.devices[index].home {
            self.devices[index].conn = Some(conn);
            // Resend everything unacknowledged with the same ids, in order.
            let pending: Vec<_> = self.devices[index].pending.iter().cloned().collect();
            for (id, to_user, payload) in pending {
                let send = Frame::Send(frames::Send { client_msg_id: id, to_user, payload });
                self.cores[shard as usize].on_frame(conn, send, self.now_ms);
            }
        }
    }

    fn disconnect(&mut self, index: usize) {
        if let Some(conn) = self.devices[index].conn.take() {
            let shard = self.devices[index].home;
            self.cores[shard as usize].on_connection_closed(conn);
            self.conn_owner.remove(&(shard, conn));
        }
    }

    fn send_new(&mut self, index: usize) {
        let Some(conn) = self.devices[index].conn else {
            return;
        };
        if self.devices[index].pending.len() >= 8 {
            return;
        }
        let to_user = 1 + self.rng.below(USERS);
        let device = &mut self.devices[index];
        let payload = format!("{}/{}/{}", device.user, device.device, device.next_number).into_bytes();
        device.next_number += 1;
        let id = device.next_id;
        device.next_id += 1;
        device.pending.push_back((id, to_user, payload.clone()));
        let send = Frame::Send(frames::Send { client_msg_id: id, to_user, payload });
        self.cores[device.home as usize].on_frame(conn, send, self.now_ms);
    }

    fn resend_one(&mut self, index: usize) {
        let Some(conn) = self.devices[index].conn else {
            return;
        };
        let device = &self.devices[index];
        if let Some((id, to_user, payload)) = device.pending.front().cloned() {
            let send = Frame::Send(frames::Send { client_msg_id: id, to_user, payload });
            self.cores[device.home as usize].on_frame(conn, send, self.now_ms);
        }
    }

    fn pull_pushes(&mut self, index: usize) {
        let Some(conn) = self.devices[index].conn else {
            return;
        };
        let home = self.devices[index].home as usize;
        let budget = 1 + self.rng.below(5);
        for _ in 0..budget {
            let Some(Frame::Deliver(deliver)) = self.cores[home].next_push(conn) else {
                break;
            };
            let device = &mut self.devices[index];
            if deliver.seq <= device.processed_seq {
                continue; // seq dedup, as the SDK does
            }
            device.processed_seq = deliver.seq;
            device.received.push(String::from_utf8(deliver.payload).unwrap());
        }
    }

    fn delivery_ack(&mut self, index: usize) {
        let Some(conn) = self.devices[index].conn else {
            return;
        };
        let device = &self.devices[index];
        let ack = Frame::DeliveryAck(frames::DeliveryAck { up_to_seq: device.processed_seq });
        self.cores[device.home as usize].on_frame(conn, ack, self.now_ms);
    }

    fn step_link(&mut self) {
        let busy: Vec<(u16, u16)> = self.links.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return;
        }
        let (from, to) = busy[self.rng.below(busy.len() as u64) as usize];
        let count = 1 + self.rng.below(4);
        for _ in 0..count {
            let Some(message) = self.links.get_mut(&(from, to)).and_then(VecDeque::pop_front) else {
                break;
            };
            self.cores[to as usize].on_shard_message(from, message);
        }
    }

    /// Moves outputs of every core to links and simulated clients.
    fn settle(&mut self) {
        for shard in 0..SHARDS {
            let core = &mut self.cores[shard as usize];
            core.flush_commits();
            for to in 0..SHARDS {
                if to != shard {
                    let batch = core.take_outbox(to, usize::MAX);
                    self.links.entry((shard, to)).or_default().extend(batch);
                }
            }
            while let Some(output) = self.cores[shard as usize].poll_output() {
                self.on_output(shard, output);
            }
            while self.cores[shard as usize].poll_push_ready().is_some() {}
        }
    }

    fn on_output(&mut self, shard: u16, output: Output) {
        match output {
            Output::Frame { conn, frame } => {
                let Some(&index) = self.conn_owner.get(&(shard, conn)) else {
                    return;
                };
                let device = &mut self.devices[index];
                match frame {
                    Frame::Ack(ack) => {
                        if let Some(position) = device.pending.iter().position(|(id, ..)| *id == ack.client_msg_id) {
                            let (_, to_user, payload) = device.pending.remove(position).unwrap();
                            let entry = (String::from_utf8(payload).unwrap(), to_user, (device.user, device.device));
                            if let Some(previous) = self.acked.insert(ack.server_msg_id, entry.clone()) {
                                assert_eq!(previous, entry, "one server_msg_id for two messages");
                            }
                        }
                    }
                    Frame::Welcome(welcome) => assert_eq!(welcome.shard, shard),
                    Frame::Error(error) => panic!("unexpected error {error:?}"),
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            Output::Close { conn, frame, .. } => {
                let redirect = matches!(frame, Some(Frame::Redirect(_)));
                assert!(redirect, "only redirects close connections here, got {frame:?}");
                self.conn_owner.remove(&(shard, conn));
                self.cores[shard as usize].on_connection_closed(conn);
                if let Some(&index) = self.devices.iter().position(|d| d.conn == Some(conn) && d.home == shard).as_ref()
                {
                    self.devices[index].conn = None;
                }
            }
            Output::Authenticated { .. } => {}
            _ => {}
        }
    }

    fn run(&mut self, steps: usize) {
        // Register every device first (a device registers on its first valid Hello).
        for index in 0..self.devices.len() {
            self.connect(index, false);
        }
        self.settle();
        for _ in 0..steps {
            self.now_ms += self.rng.below(3);
            let index = self.rng.below(self.devices.len() as u64) as usize;
            match self.rng.below(100) {
                0..=29 => self.send_new(index),
                30..=49 => self.step_link(),
                50..=64 => self.pull_pushes(index),
                65..=72 => self.delivery_ack(index),
                73..=77 => self.disconnect(index),
                78..=87 => self.connect(index, true),
                _ => self.resend_one(index),
            }
            self.settle();
        }
        // Quiesce: everyone connected, all links drained, all pushes pulled.
        for _ in 0..1000 {
            for index in 0..self.devices.len() {
                self.connect(index, false);
                self.pull_pushes(index);
            }
            while self.links.values().any(|q| !q.is_empty()) {
                self.step_link();
                self.settle();
            }
            self.settle();
            let idle = self.devices.iter().all(|d| d.pending.is_empty());
            if idle {
                break;
            }
        }
        for index in 0..self.devices.len() {
            for _ in 0..10_000 {
                let before = self.devices[index].received.len();
                self.pull_pushes(index);
                if self.devices[index].received.len() == before {
                    break;
                }
            }
        }
    }

    fn check(&self) {
        assert!(self.devices.iter().all(|d| d.pending.is_empty()), "sends never acknowledged");
        assert!(self.acked.len() > 100, "the simulation acknowledged only {} sends", self.acked.len());
        let acked_payloads: std::collections::HashSet<&str> = self.acked.values().map(|(p, ..)| p.as_str()).collect();
        for device in &self.devices {
            let mut last_from: HashMap<(u64, u64), u64> = HashMap::new();
            for payload in &device.received {
                // Only acknowledged messages are delivered.
                assert!(acked_payloads.contains(payload.as_str()), "{payload} delivered but never acked");
                // In order per sending device.
                let parts: Vec<u64> = payload.split('/').map(|p| p.parse().unwrap()).collect();
                if let Some(previous) = last_from.insert((parts[0], parts[1]), parts[2]) {
                    assert!(
                        parts[2] > previous,
                        "reordered from {}/{}: {previous} then {}",
                        parts[0],
                        parts[1],
                        parts[2]
                    );
                }
            }
        }
        // Every acknowledged message reached every device of its recipient
        // (but the sending device itself) exactly once.
        for (payload, to_user, sender) in self.acked.values() {
            for device in self.devices.iter().filter(|d| d.user == *to_user && (d.user, d.device) != *sender) {
                let copies = device.received.iter().filter(|p| *p == payload).count();
                assert_eq!(copies, 1, "device {}/{} got {payload} {copies} times", device.user, device.device);
            }
        }
    }
}

#[test]
fn seeded_message_path_simulation_loses_and_duplicates_nothing() {
    let seeds: Vec<u64> = match std::env::var("IRIS_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("IRIS_SIM_SEED must be a number")],
        Err(_) => (0..24).map(|i| 0xC0FFEE + i * 7919).collect(),
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed);
            sim.run(3000);
            sim.check();
        });
        if outcome.is_err() {
            panic!("simulation failed; reproduce with IRIS_SIM_SEED={seed}");
        }
    }
}
