//! The whole VM's saved state except guest RAM: [`VmState`] gathers the parts' `*State`s (see [`crate::persist`])
//! and encodes them as one framed blob (magic "MIGVMSTA", version [`STATE_VERSION`], a CRC-32, a length of at most
//! [`MAX_STATE_PAYLOAD`], then the JSON of [`VmState`]).

use serde::{Deserialize, Serialize};

use crate::{
    devices::{net::NetState, serial::SerialState, virtio_mmio::MmioState},
    persist::{Framing, StateError, decode_framed, encode_framed},
    vcpu::VcpuState,
};

/// "MIGVMSTA".
pub const STATE_MAGIC: [u8; 8] = *b"MIGVMSTA";
/// Bump on any change of [`VmState`] or the parts' states.
pub const STATE_VERSION: u32 = 1;
/// Largest payload accepted.
pub const MAX_STATE_PAYLOAD: u64 = 16 << 20;

const FRAMING: Framing = Framing {
    magic: STATE_MAGIC,
    version: STATE_VERSION,
    max_payload: MAX_STATE_PAYLOAD,
};

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

impl VmState {
    /// The versioned, checksummed bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = serde_json::to_vec(self).map_err(StateError::Serialize)?;
        Ok(encode_framed(&FRAMING, &payload))
    }

    /// Parses bytes made by [`VmState::encode`], checking magic, version, length and checksum first.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let payload = decode_framed(&FRAMING, bytes)?;
        serde_json::from_slice(payload).map_err(StateError::Parse)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        devices::virtio_mmio::QueueSnapshot,
        vcpu::{FpuState, MsrEntry},
    };

    pub(crate) fn sample() -> VmState {
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
            matches!(VmState::decode(&version), Err(StateError::Version { found, .. }) if found == STATE_VERSION + 1)
        );

        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(VmState::decode(&huge), Err(StateError::TooLarge { .. })));

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
