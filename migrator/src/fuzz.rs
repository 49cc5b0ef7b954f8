//! Property-based fuzzing of what the migrator reads from a peer or a file: the migration stream (headers,
//! messages, page batches) and the saved VM state.
//!
//! Inputs start from valid encodings and are then damaged: bytes overwritten, the stream cut, junk spliced in. In
//! half of the cases the checksums are recomputed afterwards, as an on-path attacker could do on a plain channel, so
//! the parsers behind the checksums see the damage too. The oracle: no panic, every page write inside the RAM
//! layout, and a decoded state that encodes back to what was decoded.
//!
//! `cargo test` runs each target with 256 cases from a fixed seed; `MIGMON_FUZZ_CASES` and `MIGMON_FUZZ_SEED`
//! change that (`./x fuzz` runs them longer, with fresh seeds).

use std::io::Cursor;

use migevents::Mode;
use migmon_base::fuzz::runner;
use proptest::{collection::vec, prelude::*};

use crate::{
    persist::{FRAME_HEADER, Framing, decode_framed, encode_framed},
    protocol::{
        Ack, Command, HEADER_SIZE, HELLO_VERIFY, Header, Hello, Incoming, Message, MessageReader, PAGE_ZERO,
        PageSink, RoundEnd, VERSION,
    },
    ram::{PAGE_SIZE, RamError, RamLayout, RamRegion},
    vm_state::VmState,
};

/// Two regions with a hole between them: 32 pages at 0, 16 pages at 1 MiB.
fn layout() -> RamLayout {
    RamLayout::new(&[
        RamRegion {
            gpa: 0,
            size: 32 * PAGE_SIZE as u64,
        },
        RamRegion {
            gpa: 1 << 20,
            size: 16 * PAGE_SIZE as u64,
        },
    ])
    .unwrap()
}

/// Guest RAM as a vector; a write outside the layout is a bug of the reader (it promises to check every run first).
struct CheckedRam {
    bytes: Vec<u8>,
}

impl PageSink for CheckedRam {
    fn write(&mut self, page: u64, offset: usize, data: &[u8]) -> Result<(), RamError> {
        let at = usize::try_from(page).unwrap() * PAGE_SIZE + offset;
        assert!(
            at + data.len() <= self.bytes.len(),
            "page write outside guest RAM: page {page} offset {offset} len {}",
            data.len()
        );
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, page: u64, npages: u64) -> Result<(), RamError> {
        let at = usize::try_from(page).unwrap() * PAGE_SIZE;
        let len = usize::try_from(npages).unwrap() * PAGE_SIZE;
        assert!(
            at + len <= self.bytes.len(),
            "zero run outside guest RAM: page {page} npages {npages}"
        );
        self.bytes[at..at + len].fill(0);
        Ok(())
    }
}

/// One message as it goes on the wire: command, flags and payload (its header is made when the stream is built).
#[derive(Clone, Debug)]
struct Frame {
    command: u32,
    flags: u32,
    payload: Vec<u8>,
}

fn message(m: &Message) -> Frame {
    let (flags, payload) = m.encode();
    Frame {
        command: m.command() as u32,
        flags,
        payload,
    }
}

/// A page batch: (page, npages, zero) runs, data runs filled with a byte.
fn pages(round: u32, runs: &[(u64, u32, bool)], fill: u8) -> Frame {
    let mut payload = Vec::new();
    payload.extend_from_slice(&u32::try_from(runs.len()).unwrap().to_le_bytes());
    payload.extend_from_slice(&round.to_le_bytes());
    for &(page, npages, zero) in runs {
        payload.extend_from_slice(&page.to_le_bytes());
        payload.extend_from_slice(&npages.to_le_bytes());
        payload.extend_from_slice(&(if zero { PAGE_ZERO } else { 0 }).to_le_bytes());
    }
    for &(_, npages, zero) in runs {
        if !zero {
            payload.extend(std::iter::repeat_n(fill, npages as usize * PAGE_SIZE));
        }
    }
    Frame {
        command: Command::Pages as u32,
        flags: 0,
        payload,
    }
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let hello = (
        any::<[u8; 6]>(),
        "[a-z0-9-]{0,24}",
        vec(any::<u8>(), 0..64),
        prop_oneof![Just(Mode::Live), Just(Mode::Quick)],
    )
        .prop_map(|(mac, id, config, mode)| {
            message(&Message::Hello(Hello {
                version: VERSION,
                mode,
                flags: HELLO_VERIFY,
                regions: layout().regions(),
                mac,
                migration_id: id,
                config,
            }))
        });
    let runs = vec((0u64..56, 1u32..4, any::<bool>()), 1..4);
    prop_oneof![
        hello,
        (any::<u32>(), runs, any::<u8>()).prop_map(|(round, runs, fill)| pages(round, &runs, fill)),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(round, pages, bytes, bandwidth)| {
                message(&Message::RoundEnd(RoundEnd {
                    round,
                    pages,
                    bytes,
                    bandwidth,
                }))
            }
        ),
        vec(any::<u8>(), 0..256).prop_map(|s| message(&Message::State(s))),
        vec(vec(any::<u8>(), 0..80), 0..4).prop_map(|f| message(&Message::Frames(f))),
        any::<u128>().prop_map(|h| message(&Message::Verify(h))),
        (any::<u64>(), any::<u64>()).prop_map(|(paused_ns, commit_within_ns)| message(&Message::Complete {
            paused_ns,
            commit_within_ns
        })),
        Just(message(&Message::Ready)),
        Just(message(&Message::Commit)),
        any::<u32>().prop_map(|r| message(&Message::RoundAck(r))),
        Just(message(&Message::HelloAck)),
        Just(message(&Message::Close)),
        (any::<u64>(), any::<u64>()).prop_map(|(resumed_ns, restore_us)| message(&Message::Ack(Ack {
            resumed_ns,
            restore_us
        }))),
        "[ -~]{0,40}".prop_map(|r| message(&Message::Abort(r))),
        // A payload no encoder makes, under any command number.
        (0u32..17, any::<u32>(), vec(any::<u8>(), 0..64)).prop_map(|(command, flags, payload)| Frame {
            command,
            flags,
            payload
        }),
    ]
}

/// How a stream is damaged.
#[derive(Clone, Debug)]
struct Damage {
    /// (frame index, byte index in header + payload, XOR mask): applied before the checksums are recomputed.
    flips: Vec<(usize, usize, u8)>,
    /// Recompute the payload and header checksums after the flips (an attacker on a plain channel).
    reseal: bool,
    /// Cut the whole stream at this fraction (per mille) of its length.
    cut: Option<u16>,
    /// Insert junk at this fraction (per mille) of the stream.
    splice: Option<(u16, Vec<u8>)>,
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    (
        vec((any::<usize>(), any::<usize>(), 1u8..=255), 0..4),
        any::<bool>(),
        proptest::option::of(0u16..1000),
        proptest::option::of((0u16..1000, vec(any::<u8>(), 1..48))),
    )
        .prop_map(|(flips, reseal, cut, splice)| Damage {
            flips,
            reseal,
            cut,
            splice,
        })
}

/// The bytes of `frames` on the wire, damaged.
fn stream(frames: &[Frame], d: &Damage) -> Vec<u8> {
    let mut wire: Vec<Vec<u8>> = frames
        .iter()
        .enumerate()
        .map(|(seq, f)| {
            let mut h = Header {
                command: f.command,
                flags: f.flags,
                length: f.payload.len() as u64,
                sequence: u32::try_from(seq).unwrap(),
                crc: crc32fast::hash(&f.payload),
                header_crc: 0,
                reserved: 0,
            };
            h.seal();
            let mut b = h.encode().to_vec();
            b.extend_from_slice(&f.payload);
            b
        })
        .collect();
    for &(fi, at, mask) in &d.flips {
        let f = &mut wire[fi % frames.len()];
        let at = at % f.len();
        f[at] ^= mask;
    }
    if d.reseal {
        for f in &mut wire {
            let mut hb = [0u8; HEADER_SIZE];
            hb.copy_from_slice(&f[..HEADER_SIZE]);
            let mut h = Header::decode(&hb);
            h.crc = crc32fast::hash(&f[HEADER_SIZE..]);
            h.reserved = 0;
            h.seal();
            f[..HEADER_SIZE].copy_from_slice(&h.encode());
        }
    }
    let mut bytes = wire.concat();
    if let Some((at, junk)) = &d.splice {
        let at = bytes.len() * usize::from(*at) / 1000;
        bytes.splice(at..at, junk.iter().copied());
    }
    if let Some(cut) = d.cut {
        bytes.truncate(bytes.len() * usize::from(cut) / 1000);
    }
    bytes
}

/// Reads a stream as the destination does, up to the first error.
fn read_stream(bytes: &[u8]) {
    let layout = layout();
    let mut ram = CheckedRam {
        bytes: vec![0; usize::try_from(layout.total_bytes()).unwrap()],
    };
    // A small buffer, so page runs arrive in pieces.
    let mut reader = MessageReader::new(std::io::BufReader::with_capacity(1000, Cursor::new(bytes)));
    for _ in 0..64 {
        match reader.recv() {
            Ok(Incoming::Pages(h)) => {
                if reader.read_pages(&h, &layout, &mut ram).is_err() {
                    return;
                }
            }
            Ok(Incoming::Message(_)) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn fuzz_migration_stream_reader() {
    runner()
        .run(
            &(vec(frame_strategy(), 1..6), damage_strategy()),
            |(frames, d)| {
                read_stream(&stream(&frames, &d));
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn fuzz_message_payload_decoder() {
    runner()
        .run(
            &(1u32..=14, any::<u32>(), vec(any::<u8>(), 0..512)),
            |(command, flags, payload)| {
                let command = Command::try_from(command).unwrap();
                if let Ok(m) = Message::decode(command, flags, &payload) {
                    // What decodes encodes again, and the same way.
                    let (f, p) = m.encode();
                    prop_assert_eq!(Message::decode(command, f, &p).ok(), Some(m));
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn fuzz_state_decoder() {
    let good = crate::vm_state::tests::sample().encode().unwrap();
    let payload = good[FRAME_HEADER..].to_vec();
    let framing = Framing {
        magic: good[..8].try_into().unwrap(),
        version: u32::from_le_bytes(good[8..12].try_into().unwrap()),
        max_payload: 1 << 20,
    };
    runner()
        .run(
            &(
                vec((any::<usize>(), 1u8..=255), 0..6),
                any::<bool>(),
                proptest::option::of(any::<usize>()),
                vec(any::<u8>(), 0..64),
            ),
            |(flips, reframe, cut, junk)| {
                // Random bytes alone.
                prop_assert!(VmState::decode(&junk).is_err());
                let _ = decode_framed(&framing, &junk);
                // The good state with bytes changed, the frame rebuilt (or not) around the damaged payload.
                let mut p = payload.clone();
                for &(at, mask) in &flips {
                    let at = at % p.len();
                    p[at] ^= mask;
                }
                if let Some(cut) = cut {
                    p.truncate(cut % (p.len() + 1));
                }
                let blob = if reframe {
                    encode_framed(&framing, &p)
                } else {
                    let mut b = good[..FRAME_HEADER].to_vec();
                    b.extend_from_slice(&p);
                    b
                };
                if let Ok(s) = VmState::decode(&blob) {
                    prop_assert_eq!(VmState::decode(&s.encode().unwrap()).ok(), Some(s));
                }
                Ok(())
            },
        )
        .unwrap();
}
