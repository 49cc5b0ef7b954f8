//! Saved VM state: a `Persist` trait for each part and the [`VmState`] container with its byte encoding.
//!
//! Each live object (`Vcpu`, `MmioTransport`, `NetDevice`, `Serial`) saves into a plain-data `*State` and restores
//! from one, as firecracker's `Persist` does. [`VmState`] gathers them. Its encoding is
//!
//! ```text
//! offset  size  field
//!      0     8  magic    "MIGVMSTA"
//!      8     4  version  (STATE_VERSION, little endian)
//!     12     4  crc32    (IEEE, of the payload)
//!     16     8  length   (payload bytes, at most MAX_STATE_PAYLOAD)
//!     24     …  payload  (JSON of VmState)
//! ```
//!
//! Decoding checks the magic, the version, the length and the checksum before it parses anything, and never panics
//! on bad input.

use serde::{Deserialize, Serialize};

use crate::{
    devices::{net::NetState, serial::SerialState, virtio_mmio::MmioState},
    vcpu::VcpuState,
};

/// Save/restore of one part of the VM.
pub trait Persist {
    /// Plain data: everything needed to rebuild the part on another host.
    type State;
    type Error;
    /// Captures the state (the VM must be paused for it to be consistent).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Loads a saved state into a freshly created part.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// "MIGVMSTA".
pub const STATE_MAGIC: [u8; 8] = *b"MIGVMSTA";
/// Bump on any change of [`VmState`] or the parts' states.
pub const STATE_VERSION: u32 = 1;
/// Largest payload accepted.
pub const MAX_STATE_PAYLOAD: u64 = 16 << 20;
const HEADER: usize = 24;

/// The whole VM except guest RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM size: the destination must have been created with the same.
    pub ram_bytes: u64,
    pub vcpu: VcpuState,
    pub transport: MmioState,
    pub net: NetState,
    pub serial: SerialState,
}

/// Errors decoding or encoding a [`VmState`].
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the VM state is truncated: {have} bytes, at least {need} needed")]
    Truncated { have: usize, need: usize },
    #[error("the data is not a migrator VM state (bad magic)")]
    BadMagic,
    #[error(
        "the VM state has version {found}, this migrator reads version {STATE_VERSION}: use the same migrator build on both sides"
    )]
    Version { found: u32 },
    #[error("the VM state payload length {0} exceeds the limit {MAX_STATE_PAYLOAD}")]
    TooLarge(u64),
    #[error("the VM state has {extra} trailing bytes after its payload")]
    TrailingBytes { extra: usize },
    #[error("the VM state is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("cannot parse the VM state payload")]
    Parse(#[source] serde_json::Error),
    #[error("cannot serialize the VM state")]
    Serialize(#[source] serde_json::Error),
}

impl VmState {
    /// The versioned, checksummed bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = serde_json::to_vec(self).map_err(StateError::Serialize)?;
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Parses bytes made by [`VmState::encode`], checking magic, version, length and checksum first.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let header: &[u8; HEADER] =
            bytes
                .get(..HEADER)
                .and_then(|h| h.try_into().ok())
                .ok_or(StateError::Truncated {
                    have: bytes.len(),
                    need: HEADER,
                })?;
        let field = |range: std::ops::Range<usize>| &header[range];
        if field(0..8) != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != STATE_VERSION {
            return Err(StateError::Version { found: version });
        }
        let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(field(16..24));
        let len = u64::from_le_bytes(len_bytes);
        if len > MAX_STATE_PAYLOAD {
            return Err(StateError::TooLarge(len));
        }
        let need = HEADER + len as usize;
        let payload = bytes.get(HEADER..need).ok_or(StateError::Truncated {
            have: bytes.len(),
            need,
        })?;
        if bytes.len() > need {
            return Err(StateError::TrailingBytes {
                extra: bytes.len() - need,
            });
        }
        let found = crc32fast::hash(payload);
        if found != expected {
            return Err(StateError::Checksum { expected, found });
        }
        serde_json::from_slice(payload).map_err(StateError::Parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        devices::virtio_mmio::QueueSnapshot,
        vcpu::{FpuState, MsrEntry},
    };

    fn sample() -> VmState {
        let mut regs = kvm_bindings::kvm_regs {
            rip: 0x20_1234,
            rsp: 0x40_0000,
            rflags: 0x246,
            ..Default::default()
        };
        regs.rax = 7;
        let mut sregs = kvm_bindings::kvm_sregs::default();
        crate::boot::set_long_mode_sregs(&mut sregs);
        VmState {
            ram_bytes: 256 << 20,
            vcpu: VcpuState {
                regs,
                sregs,
                fpu: FpuState::default(),
                msrs: vec![
                    MsrEntry {
                        index: 0x10,
                        data: 123_456_789,
                    },
                    MsrEntry {
                        index: 0xc000_0080,
                        data: 0x500,
                    },
                ],
                events: kvm_bindings::kvm_vcpu_events::default(),
                mp_state: kvm_bindings::kvm_mp_state::default(),
                sleep_us: Some(1000),
            },
            transport: MmioState {
                status: 0xf,
                driver_features: (1 << 32) | (1 << 5),
                device_features_sel: 1,
                driver_features_sel: 0,
                queue_sel: 1,
                interrupt_status: 1,
                config_generation: 0,
                queues: vec![
                    QueueSnapshot {
                        max_size: 256,
                        size: 256,
                        ready: true,
                        desc_table: 0x30_0000,
                        avail_ring: 0x30_1000,
                        used_ring: 0x30_2000,
                        next_avail: 17,
                        next_used: 17,
                        event_idx_enabled: false,
                    };
                    2
                ],
            },
            net: NetState {
                mac: [2, 0, 0, 0, 0, 1],
                acked_features: 1 << 32,
            },
            serial: SerialState {
                lcr: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn garbage_never_panics() {
        let good = sample().encode().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            // Random bytes, and the good blob with random bytes overwritten (checksum recomputed, so the parser
            // itself sees the damage).
            let len = (next() % 512) as usize;
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(VmState::decode(&junk).is_err());
            let mut payload = good[24..].to_vec();
            for _ in 0..4 {
                let i = (next() as usize) % payload.len();
                payload[i] = next() as u8;
            }
            let mut blob = good[..16].to_vec();
            blob[12..16].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            blob.extend_from_slice(&payload);
            let _ = VmState::decode(&blob);
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(&bytes[..8], b"MIGVMSTA");
        assert_eq!(VmState::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn rejects_truncation_corruption_and_versions() {
        let bytes = sample().encode().unwrap();
        for cut in [0, 7, 23, 24, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(VmState::decode(&bytes[..cut]), Err(StateError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(
            VmState::decode(&extra),
            Err(StateError::TrailingBytes { extra: 1 })
        ));

        let mut magic = bytes.clone();
        magic[0] ^= 1;
        assert!(matches!(VmState::decode(&magic), Err(StateError::BadMagic)));

        let mut version = bytes.clone();
        version[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
        assert!(
            matches!(VmState::decode(&version), Err(StateError::Version { found }) if found == STATE_VERSION + 1)
        );

        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(VmState::decode(&huge), Err(StateError::TooLarge(_))));

        // Flip every payload byte in turn: the checksum catches each one.
        for i in (24..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(VmState::decode(&bad), Err(StateError::Checksum { .. })),
                "byte {i}"
            );
        }

        // A well-formed header around a payload that is not a VmState.
        let payload = b"{\"ram_bytes\": 1}";
        let mut wrong = Vec::new();
        wrong.extend_from_slice(&STATE_MAGIC);
        wrong.extend_from_slice(&STATE_VERSION.to_le_bytes());
        wrong.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        wrong.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        wrong.extend_from_slice(payload);
        assert!(matches!(VmState::decode(&wrong), Err(StateError::Parse(_))));
    }
}
