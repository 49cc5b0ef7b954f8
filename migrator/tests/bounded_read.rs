//! The stream reader does not trust a message's declared length with memory: an authenticated peer that declares
//! an 80 MiB payload and sends a few bytes makes the reader hold about what arrived, not what was declared.
//!
//! This binary counts, per thread, the most bytes held at once, with its own global
//! allocator, while the reader reads one message. `fuzz_declared_lengths_cost_what_arrives` is also a target of
//! `./x fuzz` (cases and seed from `MIGMON_FUZZ_CASES` / `MIGMON_FUZZ_SEED`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    io::Cursor,
};

use migmon_base::fuzz::runner;
use migrator::protocol::{
    Command, HEADER_SIZE, Header, Incoming, MAX_PAYLOAD, MAX_STATE, Message, MessageReader, PAYLOAD_CHUNK,
    ProtocolError,
};
use proptest::prelude::*;

/// The system allocator, with per-thread accounting while [`measure`] runs.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) {
    if TRACKING.with(Cell::get) {
        let held = HELD.with(|h| {
            h.set(h.get() + size);
            h.get()
        });
        PEAK.with(|p| p.set(p.get().max(held)));
    }
}

fn on_free(size: usize) {
    if TRACKING.with(Cell::get) {
        HELD.with(|h| h.set(h.get().saturating_sub(size)));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the accounting touches only const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_free(layout.size());
        on_alloc(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread held at once during it.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    HELD.with(|h| h.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get))
}

/// A sealed header of `command` declaring `length` payload bytes (the payload checksum is that of `payload`).
fn header(command: Command, length: u64, payload: &[u8]) -> [u8; HEADER_SIZE] {
    let mut h = Header {
        command: command as u32,
        flags: 0,
        length,
        sequence: 0,
        crc: crc32fast::hash(payload),
        header_crc: 0,
        reserved: 0,
    };
    h.seal();
    h.encode()
}

/// Reads one message from a header declaring `declared` bytes followed by `sent` bytes; returns the result and the
/// most bytes the reader held meanwhile.
fn read_declared(command: Command, declared: u64, sent: usize) -> (Result<Incoming, ProtocolError>, usize) {
    let payload = vec![0x5au8; sent];
    let mut wire = header(command, declared, &payload).to_vec();
    wire.extend_from_slice(&payload);
    let mut reader = MessageReader::new(Cursor::new(wire.as_slice()));
    measure(|| reader.recv())
}

#[test]
fn a_huge_declared_payload_that_never_comes_costs_little() {
    for (command, declared) in [(Command::Frames, MAX_PAYLOAD), (Command::State, MAX_STATE as u64)] {
        let (res, peak) = read_declared(command, declared, 1000);
        assert!(
            matches!(res, Err(ProtocolError::Closed { .. })),
            "{command:?}: a payload cut short is a closed stream: {res:?}"
        );
        assert!(
            peak <= 2 * PAYLOAD_CHUNK,
            "{command:?} declaring {declared} bytes and sending 1000 made the reader hold {peak} bytes"
        );
    }
}

#[test]
fn a_large_payload_that_arrives_is_read_whole() {
    let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 30_000]).collect();
    let (_, payload) = Message::Frames(frames.clone()).encode();
    let mut wire = header(Command::Frames, payload.len() as u64, &payload).to_vec();
    wire.extend_from_slice(&payload);
    let mut reader = MessageReader::new(Cursor::new(wire.as_slice()));
    let (res, peak) = measure(|| reader.recv());
    match res.unwrap() {
        Incoming::Message(Message::Frames(got)) => assert_eq!(got, frames),
        other => panic!("expected the frames back, got {other:?}"),
    }
    // The payload buffer grew by doubling (at most twice the payload), plus the decoded frames.
    assert!(
        peak <= 4 * payload.len() + PAYLOAD_CHUNK,
        "{peak} bytes held for a {} byte payload",
        payload.len()
    );
}

#[test]
fn fuzz_declared_lengths_cost_what_arrives() {
    runner()
        .run(
            &(
                prop_oneof![Just(Command::Frames), Just(Command::State), Just(Command::Abort)],
                0u64..=MAX_PAYLOAD,
                0usize..(512 << 10),
            ),
            |(command, declared, sent)| {
                let (res, peak) = read_declared(command, declared, sent);
                let sent_of_it = sent.min(usize::try_from(declared).unwrap());
                // Whatever the outcome (refused as too long, cut short, a bad checksum, a bad payload, or a
                // message decoded from it), the reader held a small multiple of what arrived: the payload buffer
                // grows by doubling, and a decoded message copies it once.
                prop_assert!(
                    peak <= 3 * sent_of_it + 2 * PAYLOAD_CHUNK,
                    "{:?} declaring {} bytes, {} sent: {} bytes held ({:?})",
                    command,
                    declared,
                    sent,
                    peak,
                    res.map(|_| ())
                );
                Ok(())
            },
        )
        .unwrap();
}
